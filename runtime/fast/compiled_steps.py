"""Ahead-of-time compiled decode steps: AOTInductor packages of the fast path's two compiled pieces.

The image-token graph (runtime/fast/graph.py) runs two torch-level steps around the Triton kernels:
the LLM step over the CFG rows and the semantic-decoder step. By default they are torch.compile'd
at run time (a minute or more of warm-up for the full model). `python -m export.build --targets aoti`
compiles them once instead (torch.export + AOTInductor) and this module loads them:

  compiled_llm_step.pt2        LLMHiddenStatic:       embeds (R, 1, H), mask (R, S), positions (R, 1),
                               image_mask (R, 1), cache_position (1,), k0, v0, k1, ... (R, KV, S, d)
                               -> hidden (R, 1, H); caches written in place
  compiled_semantic_step.pt2   SemanticDecoderStatic: latents (B, 1, C), cache_position (1,), caches
                               (B, Hd, N, d) -> features (B, 1, D), LLM embeddings (B, 1, H)

R (rows = prompts x CFG rows) and S (the static cache length) are dynamic. The packages hold code
only (`package_constants_in_so=False`): the weights are the live model's tensors, handed over by name
without a copy (`user_managed`), so a 33 GB LLM is not duplicated. A package is tied to the torch
version, device kind and GPU architecture that built it, and to the weight layout (dtype, bf16/FP8
decode weights), all recorded in the manifest and checked here before anything loads.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from kernels.skinny import MAX_ROWS  # the decode kernels' row limit: up to 32 prompts x 2 CFG rows

from ..errors import EngineError

logger = logging.getLogger(__name__)

SCHEMA = 2  # 2: the skinny ops take their output dtype by name (a schema-1 package passes a dtype)
STEP_FILES = {"llm_step": "compiled_llm_step.pt2", "semantic_step": "compiled_semantic_step.pt2"}


def step_modules(gen) -> dict[str, nn.Module]:
    """The eager modules a GraphImageGenerator runs (what the packages replace)."""
    return {"llm_step": gen.llm, "semantic_step": gen.sem}


def sample_inputs(gen, rows_per_prompt: int = 2, prompts: int = 2, s_max: int = 128) -> dict[str, tuple]:
    """Example inputs for torch.export, from a bucket's static buffers (sizes chosen away from 0/1,
    which torch.export would specialise)."""
    k = gen._new_bucket(prompts, rows_per_prompt, s_max)
    latent = torch.zeros(prompts, 1, gen.cfg.mingtok.latent_dim, dtype=gen.dtype, device=gen.device)
    return {"llm_step": (k.embeds, k.mask, k.positions, k.no_image, k.cache_pos, *k.llm_caches),
            "semantic_step": (latent, k.sem_pos, *k.sem_caches)}


def num_caches(gen, name: str) -> int:
    """How many cache tensors end each step's inputs (a key and a value per layer)."""
    return 2 * (gen.cfg.llm.num_layers if name == "llm_step" else gen.cfg.mingtok.semantic_depth)


def dynamic_shapes(gen, max_sequence: int) -> dict[str, tuple]:
    from torch.export import Dim

    rows = Dim("rows", min=1, max=MAX_ROWS)
    s_max = Dim("s_max", min=2, max=max_sequence)
    batch = Dim("batch", min=1, max=MAX_ROWS)
    return {"llm_step": ({0: rows}, {0: rows, 1: s_max}, {0: rows}, {0: rows}, None,
                         tuple({0: rows, 2: s_max} for _ in range(num_caches(gen, "llm_step")))),
            "semantic_step": ({0: batch}, None, tuple({0: batch} for _ in range(num_caches(gen, "semantic_step"))))}


def constants_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a package may ask for, by the fully qualified name torch.export gives it."""
    out = {n: p.detach() for n, p in module.named_parameters(remove_duplicate=False)}
    out.update((n, b) for n, b in module.named_buffers(remove_duplicate=False) if b is not None)
    return out


def constants_signature(module: nn.Module, names) -> list[list]:
    """(name, dtype, shape) of the tensors a package takes: recorded at build, compared at load."""
    consts = constants_of(module)
    return [[n, str(consts[n].dtype), list(consts[n].shape)] if n in consts else [n, None, None] for n in sorted(names)]


def device_key(device: torch.device) -> dict:
    """What a package's machine code is tied to besides torch: the device kind and GPU architecture."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"device": "cuda", "sm": f"{major}{minor}"}  # as the manifest's environment block
    return {"device": device.type, "sm": None}


def mismatch(entry: dict, device: torch.device, dtype: torch.dtype, weights: str, kernels: bool) -> str | None:
    """Why `entry` (the manifest's "compiled" block) cannot run here, or None."""
    if entry.get("schema") != SCHEMA:
        return f"compiled-step schema {entry.get('schema')} (this runtime reads {SCHEMA})"
    want = {"torch": torch.__version__, **device_key(device), "dtype": str(dtype).removeprefix("torch."),
            "weights": weights, "kernels": bool(kernels)}
    for key, value in want.items():
        if entry.get(key) != value:
            return f"the packages were built for {key}={entry.get(key)!r}, this run has {value!r}"
    return None


_PROBED: dict[tuple, str | None] = {}
_ROOT = Path(__file__).resolve().parents[2]
_PROBE = ("import sys, torch\n"
          "sys.path.insert(0, sys.argv[3])\n"
          "try:\n"
          "    import kernels.ops  # packages of the kernel path call its custom ops: register them first\n"
          "except ImportError:\n"
          "    pass\n"
          "torch._inductor.aoti_load_package(sys.argv[1], run_single_threaded=True, device_index=int(sys.argv[2]))\n")


def _device_index(device: torch.device) -> int:
    if device.type != "cuda":
        return -1
    return device.index if device.index is not None else torch.cuda.current_device()


def probe_load(path: Path, device: torch.device, timeout: float = 300.0) -> str | None:
    """Load a package in a child process first; None when it loads, else why not.

    AOTInductor's loader can take the whole process down, which a service must not inherit: on the H200 machine
    we were lent, every package segfaulted at load, GPU and CPU alike, because its compiler linked a static
    libstdc++ into the package (export/aoti_toolchain.py now links the shared one; a package built elsewhere,
    or another toolchain fault, can still crash). A few seconds (a Python child importing torch) once per package,
    device and process; where sys.executable is not a Python interpreter (some embedded servers) the probe fails
    and the caller falls back."""
    path = Path(path)
    key = (str(path.resolve()), path.stat().st_mtime_ns, device.type, _device_index(device))
    if key not in _PROBED:
        try:
            r = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(_device_index(device)), str(_ROOT)],
                               capture_output=True, text=True, timeout=timeout)
            if r.returncode == 0:
                why = None
            elif r.returncode < 0:
                why = (f"AOTInductor's loader crashed a test process (signal {-r.returncode}) "
                       f"with torch {torch.__version__} on {device.type}")
            else:
                why = f"AOTInductor's loader failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
        except subprocess.TimeoutExpired:
            why = f"loading {path.name} took over {timeout:.0f}s in a test process"
        _PROBED[key] = why
    return _PROBED[key]


def probe_packages(folder: Path, entry: dict, device: torch.device) -> str | None:
    for info in entry["steps"].values():
        path = Path(folder) / info["file"]
        if path.exists():
            why = probe_load(path, device)
            if why:
                return why
    return None


class CompiledStep:
    """One loaded package with the live model's tensors attached; called like the eager module."""

    def __init__(self, path: Path, module: nn.Module, expected: list[list] | None, device: torch.device):
        """expected: the manifest's constants_signature, checked before anything loads. None: the package's own
        tensor names are taken (a benchmark's packages, built for this very model): only that the model has them
        all is checked, and the package is still loaded once."""
        if expected is not None:
            have = constants_signature(module, [n for n, _, _ in expected])
            if have != expected:
                bad = [e[0] for e, h in zip(expected, have) if e != h][:3]
                raise EngineError(f"{path.name} was compiled for other weights ({bad} differ in name, dtype or "
                                  "shape); rebuild with python -m export.build --targets aoti")
        # single-threaded: the default container hands each call a model from a pool and first asks (cudaEventQuery)
        # whether the previous call finished, which a CUDA graph capture refuses ("operation not permitted when
        # stream is capturing"); the runtime serialises its steps itself (one lock per generator)
        self.runner = torch._inductor.aoti_load_package(str(path), run_single_threaded=True,
                                                        device_index=_device_index(device))
        names = self.runner.get_constant_fqns()
        consts = constants_of(module)
        missing = [n for n in names if n not in consts]
        if missing:
            raise EngineError(f"{path.name} needs tensors the model lacks: {missing[:3]}")
        # user_managed: the package uses these very tensors (no copy, updates are seen)
        self.runner.load_constants({n: consts[n] for n in names}, check_full_update=True, user_managed=True)
        self.expected = constants_signature(module, names) if expected is None else expected

    def __call__(self, *args: torch.Tensor):
        return self.runner(*args)  # the module's own output structure (a tensor, or a tuple)


def check_package_files(folder: Path, entry: dict, *, verify_hashes: bool = False) -> None:
    """EngineError unless every package the manifest lists is there with its size (and sha256, if asked): a damaged
    folder is an error before any loader (or probe) sees it."""
    from export import manifest as mf

    for info in entry["steps"].values():
        path = Path(folder) / info["file"]
        if not path.exists():
            raise EngineError(f"{path} is missing; rebuild with python -m export.build --targets aoti")
        if path.stat().st_size != info["bytes"] or (verify_hashes and mf.sha256_file(path) != info["sha256"]):
            raise EngineError(f"{path} differs from the manifest (size or sha256); rebuild it")


def load_compiled_steps(folder: Path, entry: dict, gen, *, verify_hashes: bool = False) -> dict[str, CompiledStep]:
    """Open the packages in `folder` for the generator `gen` (whose modules supply the weights)."""
    check_package_files(folder, entry, verify_hashes=verify_hashes)
    modules = step_modules(gen)
    steps = {}
    for name, info in entry["steps"].items():
        steps[name] = CompiledStep(Path(folder) / info["file"], modules[name], info["constants"], gen.device)
    logger.info("loaded AOTInductor steps %s from %s", sorted(steps), folder)
    return steps


__all__ = [
    "MAX_ROWS",
    "STEP_FILES",
    "CompiledStep",
    "check_package_files",
    "constants_signature",
    "device_key",
    "dynamic_shapes",
    "load_compiled_steps",
    "mismatch",
    "num_caches",
    "probe_load",
    "probe_packages",
    "sample_inputs",
    "step_modules",
]
