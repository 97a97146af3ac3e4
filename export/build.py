"""python -m export.build: export the pieces to ONNX (+ TensorRT, torch.export), quantize, and verify.

Each piece is exported from the reference model, quantized when the precision asks for it, run through
onnxruntime on fresh inputs produced by the model itself and compared with the eager reference; the
build fails if any piece is outside its precision's bound (export/verify.py says why each bound).
The artifact folder is self-describing (manifest.json) and re-running skips pieces that did not change.
"""
from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger("export.build")

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8")
FLOAT_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
               "fp8": torch.float32, "int8": torch.float32}  # fp8/int8: Q/DQ around linears, fp32 elsewhere
QUANT_BASES = ("auto", "fp32", "bf16")
LARGE_PIECES = ("llm_prefill", "llm_step")  # 16.8 B parameters in the full model: 67 GB as an fp32 graph
TARGETS = ("onnx", "tensorrt", "torch", "aoti")  # aoti: the GPU fast path's compiled steps (export/compiled_steps.py)
EPILOG = """examples:
  python -m export.build --precision fp8                      # built-in tiny model, CPU, minutes
  python -m export.build --precision int8 --pieces flow_head,llm_step
  python -m export.build --precision bf16 --model full --device cuda --out artifacts/full-bf16
  python -m export.build --precision fp8 --model full --device cuda --targets aoti   # compiled fast path only
  python -m export.build --precision fp8 --checkpoint ./Ming-UniVision-16B-A3B --mingtok-checkpoint ./MingTok-Vision \\
      --device cuda --targets onnx,tensorrt --timing-cache ./trt.cache
"""


class BuildError(RuntimeError):
    """A build that cannot go on; the message says what to change."""


def layer_policy(bc: "BuildConfig"):
    """The default policy (quant/policy.py) plus the user's --keep-high-precision patterns."""
    from quant.policy import KEEP_HIGH_PRECISION, LayerPolicy

    extra = {p: "kept by --keep-high-precision" for p in bc.keep_high_precision}
    return LayerPolicy(keep={**KEEP_HIGH_PRECISION, **extra}).validate()


def piece_dtype(precision: str, piece: str, model: str, quant_base: str = "auto") -> torch.dtype:
    """The float type of a piece's graph. fp8/int8 put Q/DQ around the linears of an fp32 graph, which
    onnxruntime's CPU provider can run and verify; the full model's LLM pieces get a bf16 graph instead
    (DequantizeLinear to bf16, what strongly typed TensorRT takes), because as fp32 they would be 67 GB.
    bf16 graphs cannot be verified by the CPU provider."""
    if precision not in ("fp8", "int8"):
        return FLOAT_DTYPE[precision]
    if quant_base == "bf16" or (quant_base == "auto" and model == "full" and piece in LARGE_PIECES):
        return torch.bfloat16
    return torch.float32


@dataclass
class BuildConfig:
    precision: str
    model: str = "tiny"
    checkpoint: Path | None = None
    mingtok_checkpoint: Path | None = None
    seed: int = 0
    out: Path | None = None
    device: str = "auto"
    pieces: list[str] = field(default_factory=list)
    targets: list[str] | None = None
    opset: int = 19
    calib_images: int = 2
    calib_seed: int = 1234
    calib_image_dir: Path | None = None
    max_prompts: int = 4
    max_sequence: int = 4096
    t2i_check: str = "auto"
    timing_cache: Path | None = None
    workspace_gib: float = 8.0
    force: bool = False
    threads: int | None = None
    quantizer: str = "auto"
    quant_base: str = "auto"
    keep_high_precision: list[str] = field(default_factory=list)  # extra regexes over linear paths

    def validate(self) -> BuildConfig:
        """Every flag combination is checked here, before any work starts."""
        from models.contract import PIECE_NAMES

        if self.precision not in PRECISIONS:
            raise BuildError(f"--precision must be one of {PRECISIONS}")
        if self.checkpoint is not None and not Path(self.checkpoint).is_dir():
            raise BuildError(f"--checkpoint {self.checkpoint} is not a directory")
        if self.mingtok_checkpoint is not None and self.checkpoint is None:
            raise BuildError("--mingtok-checkpoint only makes sense with --checkpoint")
        if self.model not in ("tiny", "full"):
            raise BuildError("--model must be tiny or full")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cpu", "cuda"):
            raise BuildError("--device must be cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BuildError("--device cuda, but PyTorch sees no CUDA GPU on this machine")
        if self.precision == "fp8" and self.device == "cuda":
            major, minor = torch.cuda.get_device_capability()
            from kernels.fp8 import FP8_MIN_CAPABILITY

            if (major, minor) < FP8_MIN_CAPABILITY:
                raise BuildError(f"FP8 needs compute capability 8.9 or newer (Ada, Hopper, Blackwell); "
                                 f"{torch.cuda.get_device_name()} is {major}.{minor}. Use --precision int8 or fp16.")
        unknown = [p for p in self.pieces if p not in PIECE_NAMES]
        if unknown:
            raise BuildError(f"unknown piece(s) {unknown}; choose from {list(PIECE_NAMES)}")
        self.pieces = self.pieces or list(PIECE_NAMES)
        if self.targets is None:
            self.targets = ["onnx"] + (["tensorrt"] if self.device == "cuda" and _trt_available() else [])
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise BuildError(f"unknown target(s) {bad}; choose from {list(TARGETS)}")
        if "aoti" in self.targets:
            from .compiled_steps import plan

            try:
                plan(self.precision, self.device)
            except ValueError as exc:
                raise BuildError(str(exc)) from None
            if self.device == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
                raise BuildError("--targets aoti on the CPU compiles C++: install a C++ compiler (g++ or clang++)")
        if "tensorrt" in self.targets:
            if not _trt_available():
                raise BuildError("--targets tensorrt, but TensorRT is not installed: pip install 'mingrt[tensorrt]'")
            if self.device != "cuda":
                raise BuildError("--targets tensorrt needs --device cuda")
            if "onnx" not in self.targets:
                self.targets.insert(0, "onnx")  # TensorRT builds from the ONNX file
        if self.model == "full" and self.device == "cpu" and self.checkpoint is None:
            raise BuildError("--model full has 18.8 B parameters (75 GB in fp32): build it with --device cuda on a "
                             "large-memory GPU machine, or use --model tiny")
        for pattern in self.keep_high_precision:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise BuildError(f"--keep-high-precision {pattern!r} is not a regular expression: {exc}") from None
        if self.keep_high_precision and self.precision not in ("fp8", "int8"):
            raise BuildError("--keep-high-precision chooses linears to leave out of fp8/int8: use it with those precisions")
        if self.quant_base not in QUANT_BASES:
            raise BuildError(f"--quant-base must be one of {QUANT_BASES}")
        if self.quant_base != "auto" and self.precision not in ("fp8", "int8"):
            raise BuildError("--quant-base is the float type around fp8/int8 Q/DQ: use it with --precision fp8 or int8")
        if self.quantizer not in ("auto", "ours", "modelopt"):
            raise BuildError("--quantizer must be auto, ours or modelopt")
        if self.quantizer == "modelopt":
            from quant.modelopt_path import modelopt_available

            if not modelopt_available():
                raise BuildError("--quantizer modelopt, but nvidia-modelopt is not installed: pip install 'mingrt[quant]'")
        if self.t2i_check not in ("auto", "on", "off"):
            raise BuildError("--t2i-check must be auto, on or off")
        if self.calib_images < 1:
            raise BuildError("--calib-images must be >= 1")
        if self.calib_image_dir is not None and not Path(self.calib_image_dir).is_dir():
            raise BuildError(f"--calib-image-dir {self.calib_image_dir} is not a directory")
        if self.out is None:
            name = Path(self.checkpoint).name if self.checkpoint else self.model
            self.out = Path("artifacts") / f"{name}-{self.precision}"
        return self


def _trt_available() -> bool:
    try:
        from .tensorrt_build import trt_available
    except ImportError:
        return False
    return trt_available()


def parse_args(argv=None) -> BuildConfig:
    p = argparse.ArgumentParser("python -m export.build", description=__doc__.splitlines()[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=["tiny", "full"], default="tiny", help="built-in seeded random weights (default tiny)")
    g.add_argument("--checkpoint", type=Path, help="released Ming-UniVision directory (overrides --model)")
    g.add_argument("--mingtok-checkpoint", type=Path, help="MingTok-Vision directory, loaded under the checkpoint's vision.*")
    g.add_argument("--seed", type=int, default=0, help="seed of the built-in random weights")
    g = p.add_argument_group("build")
    g.add_argument("--precision", choices=PRECISIONS, required=True)
    g.add_argument("--out", type=Path, help="artifact folder (default artifacts/<model>-<precision>)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--pieces", default="", help="comma-separated subset (default: all)")
    g.add_argument("--targets", default=None, help="comma-separated: onnx,tensorrt,torch,aoti (default: what this machine can build; aoti = AOTInductor packages of the fast path's LLM and semantic-decoder steps)")
    g.add_argument("--opset", type=int, default=19)
    g.add_argument("--max-prompts", type=int, default=4, help="largest batch of prompts the engines must accept")
    g.add_argument("--max-sequence", type=int, default=4096, help="longest LLM cache the engines must accept")
    g.add_argument("--force", action="store_true", help="rebuild every piece even if unchanged")
    g = p.add_argument_group("calibration (fp8/int8) and verification")
    g.add_argument("--calib-images", type=int, default=2, help="generations whose tensors calibrate the pieces")
    g.add_argument("--calib-seed", type=int, default=1234)
    g.add_argument("--quantizer", choices=["auto", "ours", "modelopt"], default="auto",
                   help="Q/DQ from nvidia-modelopt (auto: when installed, for the pieces it can export) or ours")
    g.add_argument("--keep-high-precision", action="append", default=[], metavar="REGEX",
                   help="also keep the linears whose path matches REGEX high precision (repeatable), e.g. "
                        "'encoder\\.blocks\\.[0-8]\\.' for the early blocks of a sensitive encoder")
    g.add_argument("--quant-base", choices=QUANT_BASES, default="auto",
                   help="float type around fp8/int8 Q/DQ (auto: bf16 for the full model's LLM pieces, else fp32)")
    g.add_argument("--calib-image-dir", type=Path, help="user images to add to the encoders' calibration set")
    g.add_argument("--t2i-check", choices=["auto", "on", "off"], default="auto",
                   help="run a whole text-to-image through the exported pieces (auto: on for the tiny model)")
    g = p.add_argument_group("TensorRT")
    g.add_argument("--timing-cache", type=Path, help="timing cache file (one per TensorRT version and GPU)")
    g.add_argument("--workspace-gib", type=float, default=8.0)
    p.add_argument("--threads", type=int, help="CPU threads for onnxruntime")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s | %(levelname)-8s | %(name)s | %(message)s")
    for noisy in ("torch", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    return BuildConfig(
        precision=a.precision, model=a.model, checkpoint=a.checkpoint, mingtok_checkpoint=a.mingtok_checkpoint,
        seed=a.seed, out=a.out, device=a.device, pieces=[s for s in a.pieces.split(",") if s],
        targets=[s for s in a.targets.split(",") if s] if a.targets else None, opset=a.opset,
        calib_images=a.calib_images, calib_seed=a.calib_seed, calib_image_dir=a.calib_image_dir,
        max_prompts=a.max_prompts, max_sequence=a.max_sequence, t2i_check=a.t2i_check,
        timing_cache=a.timing_cache, workspace_gib=a.workspace_gib, force=a.force, threads=a.threads,
        quantizer=a.quantizer, quant_base=a.quant_base,
        keep_high_precision=a.keep_high_precision,
    ).validate()


def main(argv=None) -> int:
    try:
        bc = parse_args(argv)
        from .runner import run_build

        report = run_build(bc)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
