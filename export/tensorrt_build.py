"""Build one TensorRT engine (.plan) per piece from its ONNX file.

Networks are strongly typed: the precision lives in the ONNX graph (casts, Q/DQ), so no FP16/FP8/INT8
builder flags are set (TensorRT 11 removed them). Written against the documented TensorRT 10.x/11.x
Python API; TensorRT cannot be installed on our development or CI machines, so this module has not
been run there (the README says so). Everything around it is tested.
"""
from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

INSTALL_HINT = "TensorRT is not installed: pip install 'mingrt[tensorrt]' (needs an NVIDIA GPU and Linux)"


def trt_available() -> bool:
    try:
        return importlib.util.find_spec("tensorrt") is not None
    except (ImportError, ValueError):
        return False


def import_trt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return trt


@dataclass
class Profile:
    """{input name: (min, opt, max) shape} for one optimization profile."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def validate(self) -> "Profile":
        for name, (lo, opt, hi) in self.shapes.items():
            if not (len(lo) == len(opt) == len(hi)):
                raise ValueError(f"profile for {name}: min/opt/max have different ranks {lo}, {opt}, {hi}")
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise ValueError(f"profile for {name}: need min <= opt <= max per axis, got {lo}, {opt}, {hi}")
        return self


def timing_cache_path(cache_dir: Path, trt_version: str, sm: str) -> Path:
    """One timing cache per (TensorRT version, GPU architecture): caches do not transfer between them."""
    return Path(cache_dir) / f"timing_trt{trt_version}_sm{sm}.cache"


def _logger(trt, verbose: bool):
    class ToLogging(trt.ILogger):
        LEVELS = {trt.ILogger.INTERNAL_ERROR: logging.CRITICAL, trt.ILogger.ERROR: logging.ERROR,
                  trt.ILogger.WARNING: logging.WARNING, trt.ILogger.INFO: logging.INFO,
                  trt.ILogger.VERBOSE: logging.DEBUG}

        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if verbose or severity <= trt.ILogger.ERROR:
                logging.getLogger("tensorrt").log(self.LEVELS.get(severity, logging.INFO), msg)

    return ToLogging()


def build_engine(onnx_path: Path, plan_path: Path, profiles: list[Profile], *, timing_cache: Path | None = None,
                 workspace_gib: float = 8.0, version_compatible: bool = False, hardware_compat_ampere_plus: bool = False,
                 verbose: bool = False) -> dict:
    trt = import_trt()
    t0 = time.time()
    name = Path(onnx_path).stem
    logger.info("Building TensorRT engine for %s (can take minutes)", name)
    log = _logger(trt, verbose)
    builder = trt.Builder(log)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # accepted but implied on TensorRT 11
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so external weight data next to it loads
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n  " + "\n  ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if hardware_compat_ampere_plus:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    for prof in profiles:
        p = builder.create_optimization_profile()
        for tensor, (lo, opt, hi) in prof.validate().shapes.items():
            p.set_shape(tensor, lo, opt, hi)
        config.add_optimization_profile(p)
    cache_state = None
    if timing_cache is not None:
        blob = Path(timing_cache).read_bytes() if Path(timing_cache).exists() else b""
        cache = config.create_timing_cache(blob)
        cache_state = "loaded" if blob else "created"
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            logger.warning("the timing cache %s does not match this TensorRT/GPU; building with a fresh one", timing_cache)
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
            cache_state = "rejected-recreated"
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path} (see the tensorrt log above)")
    Path(plan_path).write_bytes(bytes(serialized))
    if timing_cache is not None:
        Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
        Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    seconds = time.time() - t0
    logger.info("TensorRT engine for %s built in %.1fs", name, seconds)
    return {"plan": str(plan_path), "trt_version": trt.__version__, "build_seconds": round(seconds, 1),
            "timing_cache": cache_state,
            "profiles": [{k: [list(s) for s in v] for k, v in p.shapes.items()} for p in profiles]}
