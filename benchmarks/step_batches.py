"""benchmarks/step_batches.py: the kernel path's image-token step at several batch sizes, in one process.

    python benchmarks/step_batches.py --out OUT [--formats fp8] [--batches 1,8] [--moe-min-rows 2,3]

Full-size shapes, random weights, 2 CFG rows per prompt. One generator per weight format; for each batch
size a seeded prefill, one text-to-image request (captures the bucket's graph), then the token graph's
median over --runs replays after 1 s of warm-up. The batch ratio then divides two timings of one process
and one warm GPU, not two runs (speed.py's batch section times more and takes minutes). --moe-min-rows
also times batch 1 with the fused MoE's grouped kernels from each of these row counts (GROUPED_MIN_ROWS and
GROUPED_MIN_ROWS_FP8, recaptured): the per-slot against the grouped kernels at 2 rows in one process.
Writes OUT/step_batches.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pdl_check import full_model_on_gpu  # noqa: E402
from benchmarks.speed import environment, prompt, settle, step_of, t2i_kwargs, timed  # noqa: E402
from kernels import moe  # noqa: E402
from runtime import loop  # noqa: E402
from runtime.backends.torch_eager import TorchBackend  # noqa: E402
from runtime.fast.graph import GraphImageGenerator  # noqa: E402

ROWS = 2  # CFG rows per prompt, as upstream's text-to-image


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--formats", default="fp8")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--moe-min-rows", default="", help="batch 1 again with the grouped MoE from each of these row counts")
    p.add_argument("--runs", type=int, default=30)
    a = p.parse_args(argv)
    dev, model = full_model_on_gpu("step_batches.py", a.out)
    cfg = model.cfg
    backend = TorchBackend(model)
    gen = torch.Generator().manual_seed(0)
    res = {"env": environment(dev), "grouped_min_rows_default": {"bf16": moe.GROUPED_MIN_ROWS, "fp8": moe.GROUPED_MIN_ROWS_FP8}, "formats": {}}
    inputs = {}
    for b in [int(x) for x in a.batches.split(",")]:
        ids = [prompt(cfg, 24, gen) for _ in range(b)]
        inputs[b] = (loop.prefill(backend, cfg, backend.embed(torch.tensor(ids, device=dev))), t2i_kwargs(cfg, ids, gen, dev))
    for fmt in a.formats.split(","):  # each generator prepares the shared model for its format (prepare_decode)
        g = GraphImageGenerator(model, kernels=True, weights=fmt)
        row = res["formats"][fmt] = {}

        def time_step(g, b: int) -> float:
            cache, kw = inputs[b]
            p_len = cache.kv[0].shape[2]
            k = g.bucket_for(b, ROWS, p_len)
            g.generate(cache, **kw)
            step = step_of(g, k, p_len)
            settle(step, dev, 1.0)
            return timed(step, dev, warmup=3, runs=a.runs)["median_ms"]

        for b in inputs:
            row[f"batch {b}"] = time_step(g, b)
            print(f"{fmt} batch {b}: {row[f'batch {b}']:.3f} ms", flush=True)
        first = min(inputs)
        for b in inputs:
            if b != first:
                row[f"ratio {b}/{first}"] = row[f"batch {b}"] / row[f"batch {first}"]
        for n in [int(x) for x in a.moe_min_rows.split(",") if x]:
            default = moe.GROUPED_MIN_ROWS, moe.GROUPED_MIN_ROWS_FP8
            moe.GROUPED_MIN_ROWS = moe.GROUPED_MIN_ROWS_FP8 = n
            try:
                g.reset_graphs()
                row[f"batch {first}, moe grouped from {n} rows"] = time_step(g, first)
            finally:
                moe.GROUPED_MIN_ROWS, moe.GROUPED_MIN_ROWS_FP8 = default
                g.reset_graphs()
            print(f"{fmt} batch {first}, grouped MoE from {n} rows: {row[f'batch {first}, moe grouped from {n} rows']:.3f} ms",
                  flush=True)
        (a.out / "step_batches.json").write_text(json.dumps(res, indent=1))
        del g
        torch.cuda.empty_cache()
    print(json.dumps(res["formats"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
