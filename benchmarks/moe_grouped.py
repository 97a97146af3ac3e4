"""The fused MoE decode at several row counts: one program per routing slot against one per expert (grouped).

At batch 8 the LLM step took 8.4 ms (bf16) against 2.8 at batch 1 (benchmarks/results/h200_session9.md):
16 rows make 96 routing slots over ~34 distinct experts, and the per-slot kernels read an expert's
weights once per slot that chose it. The grouped kernels read each chosen expert once. This times both
at the LLM's shapes (64 experts, top-6, H 2048, I 1408), on two routings:

* "independent": every row draws its own 6 experts;
* "cfg pairs": rows 2j and 2j+1 choose the same experts, which is what the random-weight model does with
  a prompt's two CFG rows (benchmarks/routing_census.py counted 6.0 distinct experts per layer at batch 1).

Each time is one call inside a CUDA graph of 20, over 12 rotating routings (more expert bytes than L2).
Also checks each grouped result against the per-slot one and that two grouped calls agree to the bit.

    python benchmarks/moe_grouped.py --out benchmarks/results [--rows 2,4,8,16] [--sweep | --sweep-fine]

--sweep-fine searches the grouped tiles more widely, in two stages on the "cfg pairs" routing: the
gate_up kernel's tile with the stages and warps of both kernels (they share them) and the default down
tile, then the down kernel's tile with the best of those. Batch 1 runs 2 rows, where the grouped kernels
took as long as the per-slot ones, which read twice the bytes (session 10, before the grouped grid held
slots instead of experts at few rows).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.kernels import fastest, graph_time_us, moe_weights, time_configs  # noqa: E402
from benchmarks.speed import environment  # noqa: E402
from kernels.moe import GROUPED_MIN_ROWS, GROUPED_MIN_ROWS_FP8, moe_decode, pick_config  # noqa: E402
from models import full_config  # noqa: E402

SWEEP = [{"BLOCK_N": bn, "BLOCK_K": bk, "DOWN_BLOCK_N": dbn, "DOWN_BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
         for bn, bk, dbn in ((32, 256, 32), (64, 128, 64), (64, 256, 64), (128, 64, 64), (128, 128, 128), (64, 64, 128))]


def fine_sweep(default: dict, run) -> list[dict]:
    """The two stages of --sweep-fine (module docstring)."""
    down = {key: v for key, v in default.items() if key.startswith("DOWN_")}
    first = time_configs([dict(down, BLOCK_N=bn, BLOCK_K=bk, num_stages=st, num_warps=nw) for bn, bk in
                          ((16, 256), (16, 512), (32, 128), (32, 256), (32, 512), (64, 128), (64, 256))
                          for st in (3, 4, 6) for nw in (2, 4)], run)
    best = fastest(first, (float("inf"), default))[1]
    return first + time_configs([dict(best, DOWN_BLOCK_N=bn, DOWN_BLOCK_K=bk) for bn, bk in
                                 ((16, 128), (16, 256), (32, 64), (32, 128), (32, 256), (64, 64), (64, 128), (64, 256))], run)


def routings(e: int, k: int, rows: int, pattern: str, g: torch.Generator, n: int = 12) -> list[torch.Tensor]:
    out = []
    for _ in range(n):
        if pattern == "cfg pairs":
            ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range((rows + 1) // 2)])
            ids = ids.repeat_interleave(2, dim=0)[:rows]
        else:
            ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(rows)])
        out.append(ids.cuda())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rows", default="2,4,8,16")
    p.add_argument("--formats", default="bf16,fp8")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--sweep", action="store_true", help="also time the grouped kernels at the SWEEP configs")
    p.add_argument("--sweep-fine", action="store_true", help="a wider two-stage search of the grouped tiles (docstring)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_grouped.py needs a GPU", file=sys.stderr)
        return 2
    llm = full_config().llm
    e, i, h, k = llm.num_experts, llm.moe_intermediate_size, llm.hidden_size, llm.num_experts_per_tok
    a.out.mkdir(parents=True, exist_ok=True)
    res = {"env": environment(torch.device("cuda")), "shapes": {"experts": e, "top_k": k, "hidden": h, "intermediate": i},
           "grouped_min_rows": {"bf16": GROUPED_MIN_ROWS, "fp8": GROUPED_MIN_ROWS_FP8}, "rows": []}
    path = a.out / "moe_grouped.json"
    g = torch.Generator().manual_seed(0)
    for fmt in a.formats.split(","):
        ws, scales = moe_weights(llm, fmt)
        expert_bytes = 3 * i * h * (1 if fmt == "fp8" else 2)
        default, default_grouped = (pick_config(h, i, fmt == "fp8", grouped) for grouped in (False, True))
        for rows in (int(r) for r in a.rows.split(",")):
            # the rows as the runtime hands them: fp16 next to FP8 weights (kernels.fp8.fp16_rows), else bf16
            x = torch.randn(rows, h, device="cuda", dtype=torch.float16 if fmt == "fp8" else torch.bfloat16)
            topw = torch.rand(rows, k, device="cuda")
            out = torch.empty(rows, h, device="cuda")
            for pattern in ("independent", "cfg pairs"):
                id_sets = routings(e, k, rows, pattern, g)
                distinct = sum(len(torch.unique(s)) for s in id_sets) / len(id_sets)

                def run(config, grouped, xs=x):
                    return graph_time_us(lambda j: moe_decode(xs, id_sets[j], topw, *ws, scales, out=out, config=config,
                                                              grouped=grouped), len(id_sets), a.reps)

                per_slot = moe_decode(x, id_sets[0], topw, *ws, scales, config=default, grouped=False).clone()
                grouped = [moe_decode(x, id_sets[0], topw, *ws, scales, config=default_grouped, grouped=True).clone()
                           for _ in range(2)]
                row = {"fmt": fmt, "rows": rows, "routing": pattern, "distinct_experts": distinct,
                       "slots": rows * k, "distinct_mb": distinct * expert_bytes / 1e6,
                       "grouped_repeats": bool(torch.equal(grouped[0], grouped[1])),
                       "grouped_vs_per_slot_max_abs": float((grouped[0] - per_slot).abs().max()),
                       "per_slot_us": run(default, False), "grouped_us": run(default_grouped, True)}
                if fmt == "fp8":  # bf16 rows, which the kernels convert in their main loops (before session 11)
                    xb = x.to(torch.bfloat16)  # compared below with its own fp16 rounding
                    row["per_slot_bf16_rows_us"] = run(default, False, xb)
                    row["grouped_bf16_rows_us"] = run(default_grouped, True, xb)
                    row["bf16_rows_same_bits"] = bool(torch.equal(
                        moe_decode(x.to(torch.bfloat16).to(torch.float16), id_sets[0], topw, *ws, scales,
                                   config=default_grouped, grouped=True),
                        moe_decode(xb, id_sets[0], topw, *ws, scales, config=default_grouped, grouped=True)))
                if a.sweep_fine and pattern == "cfg pairs":
                    row["grouped_sweep"] = fine_sweep(default_grouped, lambda c: run(c, True))
                elif a.sweep:
                    row["grouped_sweep"] = time_configs(SWEEP, lambda c: run(c, True))
                if "grouped_sweep" in row:
                    us, config = fastest(row["grouped_sweep"], (float("inf"), None))
                    if config is not None:
                        row["grouped_best_us"], row["grouped_best_config"] = us, config
                for key in ("per_slot", "grouped"):
                    row[f"{key}_tbps_over_distinct"] = distinct * expert_bytes / (row[f"{key}_us"] * 1e-6) / 1e12
                res["rows"].append(row)
                path.write_text(json.dumps(res, indent=1))
                print(f"{fmt:5s} {rows:3d} rows {pattern:12s} {distinct:5.1f} experts  per-slot {row['per_slot_us']:7.1f} us  "
                      f"grouped {row['grouped_us']:7.1f} us"
                      + (f" (best {row['grouped_best_us']:.1f})" if "grouped_best_us" in row else "")
                      + f"  repeats {row['grouped_repeats']}  max|diff| {row['grouped_vs_per_slot_max_abs']:.2e}"
                      + (f"  bf16 rows: per-slot {row['per_slot_bf16_rows_us']:.1f} grouped {row['grouped_bf16_rows_us']:.1f} us"
                         f" same bits {row['bf16_rows_same_bits']}" if "per_slot_bf16_rows_us" in row else ""), flush=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
