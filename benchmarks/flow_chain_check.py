"""benchmarks/flow_chain_check.py: the experimental one-launch Euler step against the per-block launches.

    python benchmarks/flow_chain_check.py --out OUT       # a GPU; writes OUT/flow_chain_check.json

Full-size flow head (random weights of the released shapes), 2 CFG rows: the whole 16-step head from a
CUDA graph, with kernels/flow_chain.py (every block of an Euler step in one persistent launch, grid-wide
barriers between the phases) and with the production launches (LayerNorm, w12, w3 per block). Reports
the median time of each, how far the chain's latent is from the launches' (relative L2), whether the
chain repeats bit for bit over --replays replays, and whether any barrier timed out (a deadlock guard:
then the result is wrong). --programs overrides the grid (default: one program per SM).

--sweep also times the chain at other launch configs (FP8: more pipeline stages, wider tiles; session 8
found the default 2x slower than the launches, with a quarter of their weight bytes in flight per SM),
each checked against the launches' latent, the fastest named in the JSON (`sweep_best`). The JSON is
written after every measurement, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pdl_check import flow_head_bench  # noqa: E402
from benchmarks.speed import capture, repeats, timed  # noqa: E402
from runtime.fast.kernel_flow_head import KernelFlowHead  # noqa: E402

# chain launch overrides --sweep tries (shared memory per stage: BLOCK_N12 x BLOCK_K x 2 halves of FP8 plus a
# 16-row activation tile; 227 KB per SM is the limit, and the kernel reports a config that does not fit)
SWEEP = [{"num_stages": 5}, {"num_stages": 7}, {"PREFETCH": False, "num_stages": 7},
         {"BLOCK_K": 128, "num_stages": 8},
         # two programs per SM: registers capped (ptxas then spills 120-324 bytes, kernel_ir_check)
         {"PREFETCH": False, "BLOCK_K": 128, "num_stages": 5, "maxnreg": 128, "programs_per_sm": 2},
         {"PREFETCH": False, "num_stages": 3, "maxnreg": 128, "programs_per_sm": 2},
         {"BLOCK_N12": 64, "BLOCK_N3": 64, "BLOCK_K": 128, "num_stages": 5}]


def sweep(model, fmt: str, hid, noise, sc, ref, dev, programs, rows: list, save) -> None:
    """The chain at each SWEEP override, appended to `rows` (save() after each): median ms, distance from
    the launches' latent, barrier flag."""
    head = KernelFlowHead(model, weights=fmt, chain=True)
    out = torch.empty_like(ref)
    for over in SWEEP:
        head.set_chain(True, over)
        try:
            head(hid, noise, *sc)  # compile and scratch before the capture
            if programs is not None:
                head.chains()[0].programs = programs
            replay = capture(lambda: out.copy_(head(hid, noise, *sc)))
            ms = timed(replay, dev, warmup=3, runs=20)["median_ms"]
        except Exception as exc:  # noqa: BLE001 - a config that does not compile or fit is reported, not fatal
            rows.append({"override": over, "error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"})
            print(fmt, "sweep", over, rows[-1]["error"], flush=True)
            save()
            continue
        ch = head.chains()[0]
        rows.append({"override": over, "median_ms": ms, "rel_l2_to_launches": float((out - ref).norm() / ref.norm()),
                     "barrier_timed_out": ch.failed()})
        print(fmt, "sweep", over, f"{ms:.3f} ms", flush=True)
        save()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--formats", default="fp8,bf16")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--programs", type=int, default=None, help="grid size of the chain (default: the SM count)")
    p.add_argument("--sweep", action="store_true", help="also time the chain at the SWEEP configs")
    a = p.parse_args(argv)
    dev, model, (hid, noise, sc), res = flow_head_bench("flow_chain_check.py", a.out)
    cfg = model.cfg
    for fmt in a.formats.split(","):
        row = {}
        for name, chain in (("launches", False), ("chain", True)):
            head = KernelFlowHead(model, weights=fmt, chain=chain)
            out = torch.empty(1, cfg.flow_head.latent_dim, device=dev)
            head(hid, noise, *sc)  # scratch (and the chain's stacked weights) before the capture
            if chain and a.programs is not None:
                head.chains()[0].programs = a.programs
            replay = capture(lambda head=head: out.copy_(head(hid, noise, *sc)))
            first, differing, _ = repeats(replay, out, a.replays)
            t = timed(replay, dev, warmup=3, runs=20)
            row[name] = {"median_ms": t["median_ms"], "p90_ms": t["p90_ms"], "replays": a.replays,
                         "differing_from_first": differing, "latent": first}
            if chain:
                ch = head.chains()[0]
                row[name].update(programs=ch.programs, barrier_timed_out=ch.failed(),
                                 barrier_rearmed=int(ch.barrier.abs().sum()) == 0, config=ch.config)
            del head
            torch.cuda.empty_cache()
        ref, got = row["launches"].pop("latent"), row["chain"].pop("latent")
        row["chain_rel_l2_to_launches"] = float((got - ref).norm() / ref.norm())
        res["formats"][fmt] = row

        def save():
            (a.out / "flow_chain_check.json").write_text(json.dumps(res, indent=1))

        save()
        print(fmt, json.dumps(row), flush=True)
        if a.sweep:
            row["sweep"] = []
            sweep(model, fmt, hid, noise, sc, ref, dev, a.programs, row["sweep"], save)
            timed_ok = [r for r in row["sweep"] if "median_ms" in r and not r["barrier_timed_out"]]
            if timed_ok:
                row["sweep_best"] = min(timed_ok, key=lambda r: r["median_ms"])
                print(fmt, "sweep best", row["sweep_best"], flush=True)
            save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
