"""Open an artifact folder: check manifest.json first, then make the backend that runs its pieces.

Nothing is deserialized before the manifest says the folder is complete, intact (file sizes, and
sha256 when asked) and runnable here (precision vs device, TensorRT version and SM for plans).
Every refusal is an EngineError whose message says how to rebuild.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from kernels.fp8 import FP8_MIN_CAPABILITY
from models.config import ModelConfig
from models.contract import piece_specs

from .errors import EngineError, PrecisionUnsupportedError

logger = logging.getLogger(__name__)

SUPPORTED_SCHEMA = (1,)
FLOAT_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float32,
               "int8": torch.float32}
RUNTIME_PIECES = ("semantic_decoder", "pixel_decoder", "llm_prefill", "llm_step", "flow_head")


def fast_path_layout(precision: str, device_type: str) -> tuple[torch.dtype, str]:
    """(model dtype, decode weights) of the torch fast path for engines built at `precision`. On a GPU,
    fp8/int8 engines run a bf16 model (not a 75 GB fp32 one) and fp8 engines stream FP8 copies of the
    decode weights; `export.build --targets aoti` compiles this same layout."""
    if device_type == "cuda" and precision in ("fp8", "int8"):
        return torch.bfloat16, "fp8" if precision == "fp8" else "bf16"
    return FLOAT_DTYPE[precision], "bf16"


def rebuild_hint(man: dict | None, folder: Path) -> str:
    prec = (man or {}).get("precision", "fp8")
    model = (man or {}).get("model", {})
    src = f"--checkpoint {model['checkpoint']}" if model.get("checkpoint") else f"--model {model.get('builtin', 'tiny')}"
    return f"rebuild with: python -m export.build --precision {prec} {src} --out {folder}"


def read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not folder.is_dir():
        raise EngineError(f"engine folder {folder} does not exist; build one with: python -m export.build --precision fp8 --out {folder}")
    if not path.exists():
        raise EngineError(f"{folder} has no manifest.json (not an export.build folder); {rebuild_hint(None, folder)}")
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EngineError(f"{path} is corrupted ({exc}); {rebuild_hint(None, folder)}") from exc
    if man.get("schema_version") not in SUPPORTED_SCHEMA:
        raise EngineError(f"{path} has schema version {man.get('schema_version')}, this runtime reads {SUPPORTED_SCHEMA}; "
                          f"{rebuild_hint(man, folder)}")
    return man


def check_device(man: dict, device: torch.device, backend: str) -> None:
    prec = man["precision"]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if prec == "fp8" and (major, minor) < FP8_MIN_CAPABILITY:
            raise PrecisionUnsupportedError(
                f"these engines are FP8, which needs compute capability 8.9+; {torch.cuda.get_device_name(device)} is "
                f"{major}.{minor}. Build int8 or fp16 engines instead: python -m export.build --precision int8")
        if prec == "bf16" and major < 8:
            raise PrecisionUnsupportedError(f"bf16 needs compute capability 8.0+; {torch.cuda.get_device_name(device)} is {major}.{minor}")
    elif prec == "bf16" and backend == "onnxruntime":
        raise PrecisionUnsupportedError("onnxruntime's CPU provider has no bf16 kernels: use fp32/fp16/int8/fp8 engines "
                                        "on the CPU, or run bf16 on a GPU")


def check_files(man: dict, folder: Path, target: str, pieces, verify_hashes: bool) -> dict[str, str]:
    """{piece: main file} after checking every file the manifest lists for `target`."""
    from export.manifest import sha256_file

    out = {}
    for piece in pieces:
        entry = man["pieces"].get(piece)
        if entry is None or target not in entry.get("targets", {}):
            raise EngineError(f"{folder}: piece {piece!r} has no {target} engine; {rebuild_hint(man, folder)}")
        if entry.get("verification", {}).get("passed") is False:
            raise EngineError(f"{folder}: piece {piece!r} failed verification at build time; {rebuild_hint(man, folder)}")
        t = entry["targets"][target]
        for name, digest in t["sha256"].items():
            p = folder / name
            if not p.exists():
                raise EngineError(f"{folder}: {name} is missing; {rebuild_hint(man, folder)}")
            if verify_hashes and sha256_file(p) != digest:
                raise EngineError(f"{folder}: {name} does not match its manifest hash (altered or corrupted); "
                                  f"{rebuild_hint(man, folder)}")
        if target == "onnx" and t.get("bytes") is not None:
            size = sum((folder / f).stat().st_size for f in t["files"])
            if size != t["bytes"]:
                raise EngineError(f"{folder}: {piece} files are {size} bytes, the manifest says {t['bytes']} "
                                  f"(altered or truncated); {rebuild_hint(man, folder)}")
        if target == "tensorrt":
            import tensorrt as trt  # checked by the caller

            if t.get("trt_version") != trt.__version__ or t.get("sm") != "".join(map(str, torch.cuda.get_device_capability())):
                raise EngineError(f"{folder}: {piece}.plan was built with TensorRT {t.get('trt_version')} for SM "
                                  f"{t.get('sm')}; this machine has TensorRT {trt.__version__}, SM "
                                  f"{''.join(map(str, torch.cuda.get_device_capability()))}; {rebuild_hint(man, folder)}")
        out[piece] = t["files"][0]
    return out


def choose_backend(requested: str, device: torch.device, man: dict) -> str:
    """auto: TensorRT plans on a GPU with TensorRT; the torch fast path when the folder's compiled steps
    suit this machine, or on a GPU that onnxruntime cannot use; else onnxruntime."""
    if requested != "auto":
        return requested
    first = next(iter(man["pieces"].values()), {})
    if device.type == "cuda" and "tensorrt" in first.get("targets", {}):
        try:
            import tensorrt  # noqa: F401

            return "tensorrt"
        except ImportError:
            pass
    packages = man.get("compiled")
    if packages and packages.get("device") == device.type and packages.get("torch") == torch.__version__:
        return "torch"  # the compiled fast path, built for this machine
    if not man["pieces"] and packages:
        return "torch"  # a folder of compiled steps only (export.build --targets aoti)
    if device.type == "cuda" and not ort_has_cuda() and _weights_reachable(man):
        return "torch"  # no GPU engine can run here: the compiled torch path, not onnxruntime's CPU provider
    return "onnxruntime"


def ort_has_cuda() -> bool:
    """Whether the installed onnxruntime has its CUDA provider (onnxruntime-gpu)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _weights_reachable(man: dict) -> bool:
    """The torch backend rebuilds the model: from the built-in seed, or the checkpoint folder named."""
    src = man.get("model", {})
    return "builtin" in src or bool(src.get("checkpoint")) and Path(src["checkpoint"]).is_dir()


def open_backend(folder: Path, man: dict, backend: str, device: torch.device, verify_hashes: bool, threads=None):
    cfg = ModelConfig.from_dict(man["model"]["config"])
    specs = piece_specs(cfg)
    for name in RUNTIME_PIECES:
        entry = man["pieces"].get(name)
        if entry is not None and [t["name"] for t in entry["io"]["inputs"]] != specs[name].input_names:
            raise EngineError(f"{folder}: {name} was built for another piece contract; {rebuild_hint(man, folder)}")
    dtype = FLOAT_DTYPE[man["precision"]]
    if backend == "torch":
        packages = man.get("compiled")
        if packages and packages.get("device") == device.type:
            dtype = getattr(torch, packages["dtype"])  # the weights the compiled steps were built for
        else:
            dtype = fast_path_layout(man["precision"], device.type)[0]
        from models import build, load_checkpoint
        from models.univision import MingUniVision

        from .backends.torch_eager import TorchBackend

        src = man["model"]
        if src.get("checkpoint"):
            model = load_checkpoint(MingUniVision(cfg), src["checkpoint"], src.get("mingtok_checkpoint") or None)
        else:
            model = build(cfg, seed=src.get("seed", 0))
        return cfg, TorchBackend(model.to(device=device, dtype=dtype).eval())
    pieces = [p for p in (*RUNTIME_PIECES, "encoder", "encoder_understanding") if p in man["pieces"]]
    missing = [p for p in RUNTIME_PIECES if p not in man["pieces"]]
    if missing:
        raise EngineError(f"{folder}: pieces {missing} were not built; {rebuild_hint(man, folder)}")
    emb = man.get("embeddings", {})
    if not emb or not (folder / emb["file"]).exists():
        raise EngineError(f"{folder}: the embedding table is missing; {rebuild_hint(man, folder)}")
    from safetensors.torch import load_file

    table = load_file(str(folder / emb["file"]))["word_embeddings"]
    if backend == "onnxruntime":
        from .backends.onnxruntime_backend import OrtBackend

        files = check_files(man, folder, "onnx", pieces, verify_hashes)
        return cfg, OrtBackend(folder, cfg, files, table, device.type, dtype, threads=threads)
    if backend == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except ImportError as exc:
            raise ImportError("TensorRT is not installed: pip install 'mingrt[tensorrt]'") from exc
        if device.type != "cuda":
            raise EngineError("the tensorrt backend needs device='cuda'")
        from .backends.tensorrt_backend import TensorRTBackend

        files = check_files(man, folder, "tensorrt", pieces, verify_hashes)
        return cfg, TensorRTBackend(folder, cfg, files, table, device, dtype)
    raise ValueError(f"unknown backend {backend!r}; choose auto, onnxruntime, tensorrt or torch")
