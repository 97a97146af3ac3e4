"""benchmarks/router_ab.py: the LLM routers' GEMM on the skinny kernel against cuBLAS, in the token step.

    python benchmarks/router_ab.py --out OUT [--formats fp8,bf16]     # a GPU; writes OUT/router_ab.json

Every MoE layer routes the decode rows with both routers stacked (`fused_router`, 128 x 2048 bf16).
runtime.fast.decode_weights now runs that GEMM on the skinny kernel (`router_linear`, ROUTER_ON_KERNEL);
before, F.linear sent it to cuBLAS (~5 us a layer on an H200, in a kernel outside the PDL chain of the
kernels around it). Both builds read the same `fused_router` buffer (prepare_decode refreshes it in place),
and the first build's MoE kernels are kept alive, so the first graph still reads live weights when timed. The whole image-token step
(runtime.fast.graph, compiled; full-size shapes, random weights, batch 1 with its 2 CFG rows) is built
both ways in one process, one compile each, and timed in --rounds rounds in turn (every round's median kept,
and the best); each way's
image from one seed is generated twice (`repeats`), and the two ways' images are compared (`identical`:
a router logit can differ in its last bit, so they may part).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import runtime.fast.decode_weights as decode_weights  # noqa: E402
from benchmarks import pdl_check  # noqa: E402
from benchmarks.speed import environment  # noqa: E402


def token_step_ab(model, dev, fmt: str, runs: int, rounds: int) -> dict:
    def on_kernel(on: bool):
        return lambda: setattr(decode_weights, "ROUTER_ON_KERNEL", on)

    try:
        return pdl_check.token_step_ab(model, dev, fmt, {"router on the skinny kernel": on_kernel(True),
                                                         "router on cuBLAS": on_kernel(False)}, runs, rounds)
    finally:
        decode_weights.ROUTER_ON_KERNEL = True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--formats", default="fp8,bf16")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    dev, model = pdl_check.full_model_on_gpu("router_ab.py", a.out)
    res = {"env": environment(dev)}
    path = a.out / "router_ab.json"
    with torch.no_grad():
        for fmt in a.formats.split(","):
            res[fmt] = token_step_ab(model, dev, fmt, a.runs, a.rounds)
            path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
