"""benchmarks/router_ab.py: the LLM routing on our kernels against the libraries', in the token step.

    python benchmarks/router_ab.py --out OUT [--formats fp8,bf16] [--setting gemm|route|kv|rows[,...]] [--table NEW.json]
                                               # a GPU; writes OUT/router_ab_SETTINGS.json

Every MoE layer routes the decode rows with both routers stacked (`fused_router`, 128 x 2048 bf16). Settings
of runtime.fast.decode_weights, each timed on against off:
  gemm  (ROUTER_ON_KERNEL) that GEMM on the skinny kernel (`router_linear`), or F.linear (cuBLAS, ~5 us a layer
        on an H200, in a kernel outside the PDL chain of the kernels around it);
  route (ROUTE_ON_KERNEL) the softmax, top-k, router choice and shared-expert slots in one kernel
        (`fused_route`, kernels/routing.py), or as PyTorch ops compiled by Inductor (a sort and 2-3 more
        launches);
  kv    (KV_WRITE_ON_KERNEL) the LLM attention's RoPE and KV-cache write in one kernel (`fused_kv_write`,
        kernels/rope.py), or as PyTorch ops compiled by Inductor (three launches a layer), and the semantic
        decoder's cache writes likewise (two launches a layer, and its causal mask: none needed then);
  rows  (ATTENTION_FP8_ROWS, FP8 only) the decode-attention kernel writes its output as the FP8 output
        projection's fp16 rows, or Inductor converts it in a launch of its own.
Both builds read the same `fused_router` buffer (prepare_decode refreshes it in place),
and the first build's MoE kernels are kept alive, so the first graph still reads live weights when timed. The whole image-token step
(runtime.fast.graph, compiled; full-size shapes, random weights, batch 1 with its 2 CFG rows) is built
both ways in one process, one compile each, and timed in --rounds rounds in turn (every round's median kept,
and the best); each way's
image from one seed is generated twice (`repeats`), and the two ways' images are compared (`identical`:
a router logit or weight can differ in its last bit, so they may part).
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
from kernels import skinny  # noqa: E402

SETTINGS = {"gemm": ("ROUTER_ON_KERNEL", "router on the skinny kernel", "router on cuBLAS"),
            "route": ("ROUTE_ON_KERNEL", "softmax-top-k in one kernel", "softmax-top-k by Inductor"),
            "kv": ("KV_WRITE_ON_KERNEL", "cache writes (+ RoPE) in one kernel", "cache writes (+ RoPE) by Inductor"),
            "rows": ("ATTENTION_FP8_ROWS", "attention writes FP8 rows", "FP8 rows converted apart")}


def token_step_ab(model, dev, fmt: str, runs: int, rounds: int, settings: tuple[str, ...] = ("gemm",),
                  table: Path | None = None) -> dict:
    """Every setting in `settings` on, then each one off alone (the others on), under the installed launch-config
    table; with `table`, also all on under that table (kernels/configs/<gpu>.json format, e.g. a fresh
    benchmarks/kernels.py sweep). One build per variant."""
    installed = skinny.launch_table()

    def variant(off: str | None = None, tuned: dict = installed):
        def setup():
            for name in settings:
                setattr(decode_weights, SETTINGS[name][0], name != off)
            skinny.use_launch_table(tuned)  # read at launch: each build captures its graph under its own table
        return setup

    all_on = " + ".join(SETTINGS[n][1] for n in settings)
    variants = {all_on: variant()}
    variants.update((SETTINGS[n][2], variant(off=n)) for n in settings)
    if table is not None:
        variants[f"{all_on}, table {table.name}"] = variant(tuned=json.loads(table.read_text()))
    try:
        return pdl_check.token_step_ab(model, dev, fmt, variants, runs, rounds)
    finally:
        for name in settings:
            setattr(decode_weights, SETTINGS[name][0], True)
        skinny.use_launch_table(installed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--formats", default="fp8,bf16")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--setting", default="gemm", help=f"what is timed on against off, comma-separated: {sorted(SETTINGS)} "
                   "(several: all on, and each off alone)")
    p.add_argument("--table", type=Path, help="also time all settings on under this launch-config table")
    a = p.parse_args(argv)
    settings = tuple(a.setting.split(","))
    if not settings or any(n not in SETTINGS for n in settings):
        p.error(f"--setting {a.setting!r}: choose from {sorted(SETTINGS)}")
    dev, model = pdl_check.full_model_on_gpu("router_ab.py", a.out)
    res = {"env": environment(dev)}
    res["settings"] = list(settings)
    path = a.out / f"router_ab_{'_'.join(settings)}.json"
    with torch.no_grad():
        for fmt in a.formats.split(","):
            res[fmt] = token_step_ab(model, dev, fmt, a.runs, a.rounds, settings, a.table)
            path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
