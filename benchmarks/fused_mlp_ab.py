"""benchmarks/fused_mlp_ab.py: the kernel flow head with and without the fused MLP blocks, in one process.

    python benchmarks/fused_mlp_ab.py --out OUT [--formats fp8,bf16] [--sweep] [--rows 2]

Full-size flow head (random weights of the released shapes), --rows CFG rows, its 16 Euler steps from
one CUDA graph: the three launches per block (LayerNorm, w12, w3) against kernels/fused_mlp.py's two, with
its default tiles or, with --sweep, every candidate config. Each graph is timed in turn for --rounds
rounds after 2 s of warm-up and keeps its best median. Each fused latent is compared with the launches'
(relative L2; the sum over the hidden dimension is split differently, so not bit for bit) and with its
own second replay (bit for bit). Writes OUT/fused_mlp_ab.json and OUT/fused_mlp_best.json (the fastest
config of each format, which benchmarks/step_batches.py --fused-mlp takes).
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
from kernels.fused_mlp import candidate_configs, default_config  # noqa: E402
from runtime.fast.kernel_flow_head import KernelFlowHead  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--formats", default="fp8,bf16")
    p.add_argument("--sweep", action="store_true", help="every candidate config, not only the default")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    dev, model, (hid, noise, sc), res = flow_head_bench("fused_mlp_ab.py", a.out, rows=a.rows)
    best = {}
    for fmt in a.formats.split(","):
        head = KernelFlowHead(model, weights=fmt, fused_mlp=False)
        fh = model.cfg.flow_head
        fp8 = fmt == "fp8"
        configs = candidate_configs(fp8) if a.sweep else [default_config(fh.width, fh.mlp_hidden, fp8)]
        variants = {"launches": None} | {json.dumps(c, sort_keys=True): c for c in configs}
        replays, outs, row = {}, {}, {}
        for name, config in variants.items():
            head.set_fused_mlp(config is not None, config)
            head(hid, noise, *sc)  # scratch and compilation before the capture
            out = outs[name] = torch.empty(hid.shape[0], fh.latent_dim, device=dev)
            replays[name] = capture(lambda out=out, head=head: out.copy_(head(hid, noise, *sc)))
        settle(replays["launches"], dev)
        for _ in range(a.rounds):
            for name, replay in replays.items():
                ms = timed(replay, dev, warmup=3, runs=30)["median_ms"]
                row.setdefault(name, {})["ms"] = min(ms, row.get(name, {}).get("ms", ms))
        ref = outs["launches"]
        for name, replay in replays.items():
            replay()
            again = outs[name].clone()
            replay()
            row[name]["repeats"] = bool(torch.equal(again, outs[name]))
            row[name]["rel_l2_vs_launches"] = ((outs[name] - ref).norm() / ref.norm()).item()
        fastest = min((n for n in variants if n != "launches"), key=lambda n: row[n]["ms"])
        best[fmt] = variants[fastest]
        res["formats"][fmt] = dict(variants=row, fastest=fastest, speedup=row["launches"]["ms"] / row[fastest]["ms"])
        print(f"{fmt}: launches {row['launches']['ms']:.3f} ms, fused {row[fastest]['ms']:.3f} ms ({fastest}), "
              f"rel L2 {row[fastest]['rel_l2_vs_launches']:.2e}, repeats {row[fastest]['repeats']}", flush=True)
        (a.out / "fused_mlp_ab.json").write_text(json.dumps(res, indent=1))
        (a.out / "fused_mlp_best.json").write_text(json.dumps(best, indent=1))
        del head, replays
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
