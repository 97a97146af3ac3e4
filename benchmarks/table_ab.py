"""benchmarks/table_ab.py: the kernel flow head under two launch-config tables, in one process.

    python benchmarks/table_ab.py --out OUT --old OLD.json [--new NEW.json] [--formats fp8,bf16]

Full-size flow head (random weights of the released shapes), 2 CFG rows per prompt (--prompts), its 16 Euler steps from one
CUDA graph, captured once with each table (kernels/configs/<gpu>.json format; --new defaults to the
installed one). The two graphs are timed in turn for --rounds rounds after 2 s of warm-up, each keeping
its best median, so a slow GPU phase does not fall on one side only; the latents of the two are compared
bit for bit (tables that change only warp counts keep the summation order). Writes OUT/table_ab.json.
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
from benchmarks.speed import capture, settle, timed  # noqa: E402
from kernels import skinny  # noqa: E402
from runtime.fast.kernel_flow_head import KernelFlowHead  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--old", type=Path, required=True)
    p.add_argument("--new", type=Path, default=None)
    p.add_argument("--formats", default="fp8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompts", type=int, default=1, help="prompts in the batch (2 CFG rows each)")
    a = p.parse_args(argv)
    dev, model, (hid, noise, sc), res = flow_head_bench("table_ab.py", a.out, prompts=a.prompts)
    new = a.new or skinny.launch_table_path()
    tables = {"old": json.loads(a.old.read_text()), "new": json.loads(new.read_text())}
    res.update(old=str(a.old), new=str(new))
    for fmt in a.formats.split(","):
        head = KernelFlowHead(model, weights=fmt)
        head(hid, noise, *sc)  # scratch before any capture
        replays, outs, row = {}, {}, {}
        for name, table in tables.items():
            skinny.use_launch_table(table)  # graphs captured earlier keep their launches
            out = outs[name] = torch.empty(a.prompts, model.cfg.flow_head.latent_dim, device=dev)
            replays[name] = capture(lambda out=out, head=head: out.copy_(head(hid, noise, *sc)))
        skinny.use_launch_table(tables["new"])
        settle(replays["new"], dev)
        for _ in range(a.rounds):
            for name, replay in replays.items():
                ms = timed(replay, dev, warmup=3, runs=30)["median_ms"]
                row[name] = min(ms, row.get(name, ms))
                print(f"{fmt} {name} {ms:.3f} ms", flush=True)
        row["same_bits"] = bool(torch.equal(outs["old"], outs["new"]))
        res["formats"][fmt] = row
        print(fmt, row, flush=True)
        (a.out / "table_ab.json").write_text(json.dumps(res, indent=1))
        del head, replays
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
