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
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import runtime.fast.decode_weights as decode_weights  # noqa: E402
from benchmarks.pdl_check import full_model_on_gpu, token_inputs  # noqa: E402
from benchmarks.speed import environment, step_of, timed  # noqa: E402
from models.llm import MoE  # noqa: E402


def token_step_ab(model, dev, fmt: str, runs: int, rounds: int) -> dict:
    from runtime.fast.graph import GraphImageGenerator

    cache, kw = token_inputs(model, dev)
    p_len = cache.kv[0].shape[2]
    gens, res, images = {}, {}, {}
    try:
        for on in (True, False):
            decode_weights.ROUTER_ON_KERNEL = on
            name = "router on the skinny kernel" if on else "router on cuBLAS"
            t0 = time.perf_counter()
            g = GraphImageGenerator(model, kernels=True, weights=fmt)
            k = g.bucket_for(1, 2, p_len)
            images[name] = g.generate(cache, **kw).image
            # the next prepare_decode installs other MoE kernels: keep these (the weights the graphs read) alive
            gens[name] = (g, k, [m.fused_decode for m in model.model.model.modules() if isinstance(m, MoE)])
            res[name] = {"setup_seconds": time.perf_counter() - t0,
                         "repeats": bool(torch.equal(images[name], g.generate(cache, **kw).image))}
    finally:
        decode_weights.ROUTER_ON_KERNEL = True
    a, b = images.values()
    res["identical"] = bool(torch.equal(a, b))
    for _ in range(rounds):
        for name, (g, k, _) in gens.items():
            ms = timed(step_of(g, k, p_len), dev, 3, runs)["median_ms"]
            res[name].setdefault("round_medians_ms", []).append(ms)
            res[name]["median_ms"] = min(res[name]["round_medians_ms"])
            print(f"token step {fmt}, {name}: {ms:.3f} ms", flush=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--formats", default="fp8,bf16")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    dev, model = full_model_on_gpu("router_ab.py", a.out)
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
