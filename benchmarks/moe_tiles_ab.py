"""benchmarks/moe_tiles_ab.py: the FP8 MoE layers of the token step under launch-config variants, in one process.

    python benchmarks/moe_tiles_ab.py --out OUT [--rows 2,16] [--variants "num_warps=2;num_warps=2,BLOCK_N=64"]

--layers MoE layers of the LLM's full-size shapes (random weights, FP8 with the shared experts as slots, as
runtime.fast.decode_weights builds them) run back to back in one CUDA graph, routed by their own routers from
rows that come in CFG pairs (a prompt's two rows choose the same experts with random weights,
benchmarks/routing_census.py). Each row count runs the form moe_decode picks (kernels.moe.grouped_by_default:
per-slot at 2 rows, grouped from 3; MINGRT_MOE_GROUPED_MIN_ROWS=2 runs 2 rows grouped) with the launch config it
reads (kernels.moe.pick_config: table "moe" or "moe_grouped", entry h{H}_i{I}_fp8_k{slots}_m{rows bucket}, else
..._k{slots}, else GROUPED_DEFAULT or the per-slot default). Each variant overrides keys of that config, written
as the row bucket's entry (the one to table if it wins: it serves only that bucket); the graphs are captured per
variant and timed in --rounds rounds in turn (best median kept), and each variant's outputs are compared with
the first's bit for bit. Writes OUT/moe_tiles_ab.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kernels.skinny as skinny  # noqa: E402
from benchmarks.speed import capture, environment, settle, timed  # noqa: E402
from kernels._triton import next_pow2  # noqa: E402
from kernels.moe import grouped_by_default, pick_config  # noqa: E402
from models import full_config  # noqa: E402
from models.llm import MoE  # noqa: E402
from runtime.fast.decode_weights import FusedMoEDecode  # noqa: E402


def parse_variants(text: str) -> list[dict]:
    """'num_warps=2;num_warps=2,BLOCK_N=64' -> [{}, {"num_warps": 2}, {"num_warps": 2, "BLOCK_N": 64}] (the
    tabled entry first)."""
    out = [{}]
    for spec in filter(None, (s.strip() for s in text.split(";"))):
        out.append({k.strip(): int(v) for k, v in (kv.split("=") for kv in spec.split(","))})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rows", default="2,16")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--variants", default="num_warps=2")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("moe_tiles_ab.py needs a CUDA GPU")
    dev = torch.device("cuda")
    llm = full_config().llm
    torch.manual_seed(0)
    moes, fused = [], []
    for _ in range(a.layers):  # one layer's bf16 weights at a time: each is ~1.1 GB
        with dev:
            m = MoE(llm)
            for w in m.parameters():  # the router is left uninitialised by its constructor
                torch.nn.init.normal_(w, std=0.02)
            m = m.to(torch.bfloat16).eval()
        moes.append(m)
        fused.append(FusedMoEDecode(m, "fp8", shared=True))
    h, i = llm.hidden_size, llm.moe_intermediate_size
    slots = llm.num_experts_per_tok + fused[0].shared_slots
    live = skinny.launch_table()  # the installed table, edited in place: the kernels read it at each launch
    tables = {kind: live.setdefault(kind, {}) for kind in ("moe", "moe_grouped")}
    key = f"h{h}_i{i}_fp8_k{slots}"
    variants = parse_variants(a.variants)
    res = {"env": environment(dev), "layers": a.layers, "slots_per_row": slots, "key": key, "cases": []}
    path = a.out / "moe_tiles_ab.json"
    a.out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for rows in (int(r) for r in a.rows.split(",")):
            g = torch.Generator(device=dev).manual_seed(rows)
            half = torch.randn((rows + 1) // 2, h, generator=g, device=dev).to(torch.bfloat16)
            x = half.repeat_interleave(2, dim=0)[:rows]  # CFG pairs
            routes = [m.gate(x)[:2] for m in moes]
            distinct = sum(len(torch.unique(ids)) for ids, _ in routes) / len(routes)
            outs = torch.empty(a.layers, rows, h, device=dev)
            grouped = grouped_by_default(rows, True)  # what moe_decode runs for these rows
            kind = "moe_grouped" if grouped else "moe"
            table = tables[kind]
            row_key = f"{key}_m{next_pow2(rows)}"  # the most specific entry pick_config reads
            tabled = table.get(row_key)
            base = pick_config(h, i, True, grouped, slots, rows=rows)  # what the step launches now

            def run():
                for j, (f, (ids, w)) in enumerate(zip(fused, routes)):
                    outs[j].copy_(f(x, ids, w))

            case = {"rows": rows, "grouped": grouped, "table": kind, "entry": row_key,
                    "distinct_experts_per_layer": distinct, "base": base, "variants": []}
            replays, ref = [], None
            for over in variants:
                table[row_key] = dict(base, **over)
                try:
                    replay = capture(run)
                except Exception as exc:  # e.g. a tile that does not fit in shared memory
                    case["variants"].append({"override": over, "error": f"{type(exc).__name__}: {exc}"[:300]})
                    replays.append(None)
                    continue
                replay()
                got = outs.clone()
                ref = got if ref is None else ref
                case["variants"].append({"override": over, "identical_to_first": bool(torch.equal(got, ref)),
                                         "rel_l2_to_first": float((got - ref).norm() / ref.norm())})
                replays.append(replay)
            if tabled is None:
                table.pop(row_key, None)
            else:
                table[row_key] = tabled
            settle(run, dev)
            for _ in range(a.rounds):
                for v, replay in zip(case["variants"], replays):
                    if replay is None:
                        continue
                    ms = timed(replay, dev, 3, a.runs)["median_ms"]
                    v.setdefault("round_ms", []).append(ms)
                    v["ms"] = min(v["round_ms"])
                    v["per_layer_us"] = v["ms"] * 1e3 / a.layers
            for v in case["variants"]:
                print(f"{rows:3d} rows {'grouped' if grouped else 'per-slot':8s} {str(v['override']):48s} "
                      + (f"{v['per_layer_us']:7.2f} us a layer  identical {v['identical_to_first']}" if "ms" in v
                         else v.get("error", "")), flush=True)
            res["cases"].append(case)
            path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
