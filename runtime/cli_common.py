"""Flags and set-up shared by the runtime CLIs."""
from __future__ import annotations

import argparse
import logging

from kernels.fp8 import WEIGHT_FORMATS


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engines")
    g.add_argument("--engines", required=True, help="artifact folder made by python -m export.build")
    g.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt", "torch"], default="auto")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    g.add_argument("--tokenizer", help="tokenizer.json (default: the one in --engines)")
    g.add_argument("--verify-hashes", action="store_true", help="sha256 every engine file before loading")
    g.add_argument("--decode-weights", choices=list(WEIGHT_FORMATS), default=None,
                   help="weights streamed per image token by the torch backend's fast path (fp8: SM 8.9+; "
                        "default: as the folder's compiled steps, else bf16)")
    g.add_argument("--compiled", choices=["auto", "aot", "jit", "off"], default="auto",
                   help="the fast path's LLM/semantic steps: the folder's AOTInductor packages (aot), torch.compile "
                        "at the first request (jit), eager (off); auto: packages when they suit this machine")
    p.add_argument("-v", "--verbose", action="store_true")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s | %(levelname)-8s | %(name)s | %(message)s")


def open_runtime(a):
    import runtime

    return runtime.load(a.engines, a.backend, a.device, tokenizer=a.tokenizer, verify_hashes=a.verify_hashes,
                        decode_weights=a.decode_weights, compiled=a.compiled)
