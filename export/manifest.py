"""manifest.json: what an artifact folder holds, what built it, and how well it matched the reference.

The runtime reads it before touching any engine. A piece is rebuilt when its fingerprint (everything
that determines its files: model config, weights, precision, targets, opset, shape limits, calibration,
library versions and our own source) changes, or when one of its files is missing or altered.
"""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("models", "export", "quant")


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def weights_sha256(state: dict) -> str:
    """Hash of every tensor (name, dtype, shape, bytes), in name order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.device.type == "meta":
            continue
        h.update(t.contiguous().view(torch.uint8).flatten().cpu().numpy().tobytes())
    return h.hexdigest()


def weights_fingerprint(model, source: dict) -> str:
    """What identifies the weights, cheaply: built-in weights are a function of (config, seed, device
    kind); a checkpoint of its files' names, sizes and times (hashing 37 GB would take minutes);
    small models are hashed in full."""
    n = sum(p.numel() for p in model.parameters())
    if n < 200_000_000:
        return weights_sha256(model.state_dict())
    dev = next(model.parameters()).device.type
    if "builtin" in source:
        return sha256_json({"builtin": source, "config": model.cfg.to_dict(), "device": dev})
    files = []
    for key in ("checkpoint", "mingtok_checkpoint"):
        if source.get(key):
            for p in sorted(Path(source[key]).glob("*")):
                if p.is_file():
                    st = p.stat()
                    files.append([str(p), st.st_size, st.st_mtime_ns])
    return sha256_json(files)


def source_sha256() -> str:
    h = hashlib.sha256()
    for d in SOURCE_DIRS:
        for p in sorted((ROOT / d).rglob("*.py")):
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "unknown")
    except Exception:
        return None


def gpu_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"cuda": None, "gpu": None, "sm": None}
    major, minor = torch.cuda.get_device_capability()
    return {"cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(), "sm": f"{major}{minor}"}


def environment() -> dict:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        sha = proc.stdout.strip() if proc.returncode == 0 else None  # None: not a git checkout
    except Exception:
        sha = None
    return {
        "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": _version("torch"), "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime"),
        "tensorrt": _version("tensorrt"), "modelopt": _version("modelopt"), "git_sha": sha, **gpu_info(),
    }


def load(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def save(folder: Path, manifest: dict) -> None:
    """Write atomically: a crash never leaves half a manifest behind."""
    path = Path(folder) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False, default=str))
    tmp.replace(path)


def new(precision: str, model: dict, limits: dict) -> dict:
    return {"schema_version": SCHEMA_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "environment": environment(), "precision": precision, "model": model, "limits": limits,
            "pieces": {}, "verification": {}}


def files_intact(folder: Path, entry: dict) -> bool:
    for target in entry.get("targets", {}).values():
        for name, digest in target.get("sha256", {}).items():
            p = Path(folder) / name
            if not p.exists() or sha256_file(p) != digest:
                return False
    return True


def up_to_date(folder: Path, old: dict | None, piece: str, fingerprint: str, targets: list[str]) -> bool:
    if not old or old.get("schema_version") != SCHEMA_VERSION:
        return False
    entry = old.get("pieces", {}).get(piece)
    if not entry or entry.get("fingerprint") != fingerprint or not entry.get("verification", {}).get("passed"):
        return False
    return set(targets) <= set(entry.get("targets", {})) and files_intact(folder, entry)
