"""benchmarks/flow_sweep.py: the flow head's w12 / w3 launch configs chosen inside the head's own CUDA graph.

    python benchmarks/flow_sweep.py --out OUT [--formats fp8,bf16] [--install]

benchmarks/kernels.py times each GEMM alone, launch after launch of the same kernel. In the head the
w12 and w3 GEMMs alternate with a LayerNorm between them, each waiting for the one before, so the
ramp-up, the last wave and the split-K merge could weigh differently. Here every candidate config of the w12 (SwiGLU)
and w3 (gated residual) shapes is put in the GPU's table in turn and the whole 16-step head (2 CFG rows of
--prompts prompts, full-size shapes, random weights) is captured and timed: w3's candidates with w12 at its tabled config,
then w12's with the best w3. --install writes the table with the winners into OUT/<gpu>.json (copy it to
kernels/configs/ to adopt it). Each variant's latent is compared with the tabled configs' (relative L2:
split-K changes the summation order, nothing else).

First, at the tabled configs, the head with w3 merging its own splits (a ticket, `deferred_residual=False`)
against the default, where the next LayerNorm merges them (w3 stores raw partials, table key `..._e3`, which
falls back to the ticket GEMM's `_e2` config when untabled): both times and whether the latents are equal.
The sweep then tunes the default head (--merge-in-w3: the ticket head). --only w3 sweeps w3 alone.
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
from benchmarks.pdl_check import flow_head_bench  # noqa: E402
from benchmarks.speed import capture, settle, timed  # noqa: E402
from kernels._triton import set_pdl  # noqa: E402
from kernels.skinny import GATED_RESIDUAL, PARTIALS, SWIGLU, candidate_configs, config_key, gpu_slug  # noqa: E402
from runtime.fast.kernel_flow_head import KernelFlowHead  # noqa: E402


def shapes(model, fmt: str, rows: int, deferred: bool = True) -> dict[str, tuple[str, int, int, int]]:
    """{'w12': (table key, N, K, epilogue), 'w3': ...} of the head's block GEMMs."""
    fh = model.cfg.flow_head
    hidden = model.model.diffloss.net.res_blocks[0].mlp.w3.weight.shape[1]
    fp8 = fmt == "fp8"
    gemms = {"w12": (hidden, fh.width, SWIGLU), "w3": (fh.width, hidden, PARTIALS if deferred else GATED_RESIDUAL)}
    return {name: (config_key(rows, n, k, fp8, epi), n, k, epi) for name, (n, k, epi) in gemms.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--formats", default="fp8,bf16")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--wide", action="store_true", help="FP8: also the wide candidates (kernels.skinny.candidate_configs)")
    p.add_argument("--install", action="store_true", help="write the table with the winners to OUT/<gpu>.json")
    p.add_argument("--merge-in-w3", action="store_true", help="tune the head whose w3 merges its own splits")
    p.add_argument("--only", choices=("w3", "w12"), help="sweep this GEMM alone")
    p.add_argument("--warps", default="4", help="each candidate with each of these warp counts")
    p.add_argument("--prompts", type=int, default=1, help="prompts in the batch (2 CFG rows each): the row count tuned")
    a = p.parse_args(argv)
    deferred = not a.merge_in_w3
    dev, model, (hid, noise, sc), res = flow_head_bench("flow_sweep.py", a.out, prompts=a.prompts)
    rows = 2 * a.prompts  # the GEMMs' row count
    cfg = model.cfg
    table = skinny.launch_table().setdefault("skinny", {})  # the live entries pick_config reads
    out_path = a.out / "flow_sweep.json"
    for fmt in a.formats.split(","):
        heads = {d: KernelFlowHead(model, weights=fmt, deferred_residual=d) for d in (True, False)}
        head = heads[deferred]
        out = torch.empty(a.prompts, cfg.flow_head.latent_dim, device=dev)
        for h in heads.values():
            h(hid, noise, *sc)  # scratch before any capture

        def run(h=None) -> tuple[float, torch.Tensor]:
            h = h or head
            replay = capture(lambda: out.copy_(h(hid, noise, *sc)))
            return timed(replay, dev, warmup=3, runs=a.runs)["median_ms"], out.clone()

        settle(lambda: head(hid, noise, *sc), dev)
        run()  # the first graph timed in a process reads up to 10% slow on the H200, warm GPU or not
        merge, latents = {}, {}
        for _ in range(2):  # in turn, twice: each placement's best
            for d, h in heads.items():
                ms, latents[d] = run(h)
                name = "merge_in_next_layernorm_ms" if d else "merge_in_w3_ms"
                merge[name] = min(ms, merge.get(name, ms))
        merge["latents_equal"] = torch.equal(latents[True], latents[False])
        merge["latent_rel_l2"] = float((latents[True] - latents[False]).norm() / latents[False].norm())
        print(fmt, "w3 split-K merge:", merge, flush=True)
        keys = shapes(model, fmt, rows, deferred)
        tabled = {name: table.get(key) for name, (key, _, _, _) in keys.items()}
        in_use = {name: skinny.pick_config(rows, n, k, fmt == "fp8", epi, dev)
                  for name, (_, n, k, epi) in keys.items()}  # untabled e3: the e2 config
        base_ms, ref = run()
        row = {"merge_placement": merge, "deferred_residual": deferred, "tabled": tabled, "in_use": in_use, "tabled_ms": base_ms,
               "candidates": {}}
        print(fmt, "tabled", tabled, "in use", in_use, f"{base_ms:.3f} ms", flush=True)
        best, best_ms = dict(tabled), base_ms
        for name in ("w3", "w12") if a.only is None else (a.only,):
            key, n, k, _ = keys[name]
            tried = row["candidates"][name] = []
            for c in candidate_configs(n, k, fp8=fmt == "fp8", wide=a.wide and fmt == "fp8",
                                       warps=tuple(int(w) for w in a.warps.split(","))):
                table[key] = c
                try:
                    ms, lat = run()
                except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
                    tried.append({"config": c, "error": type(exc).__name__})
                    continue
                rel = float((lat - ref).norm() / ref.norm())
                tried.append({"config": c, "ms": ms, "rel_l2_to_tabled": rel})
                print(f"  {fmt} {name} {c} {ms:.3f} ms rel {rel:.1e}", flush=True)
                if ms < best_ms:
                    best[name], best_ms = c, ms
            table[key] = best[name]
            if name == "w3":
                row["after_w3_ms"] = best_ms
        row["best"], row["best_ms"] = best, run()[0]
        set_pdl(False)  # the same configs without programmatic dependent launch
        row["best_no_pdl_ms"] = run()[0]
        set_pdl(None)
        print(fmt, "best", best, f"{row['best_ms']:.3f} ms (tabled {base_ms:.3f}; best without PDL "
              f"{row['best_no_pdl_ms']:.3f})", flush=True)
        res["formats"][fmt] = row
        out_path.write_text(json.dumps(res, indent=1))
        torch.cuda.empty_cache()
    if a.install:
        full = json.loads(skinny.launch_table_path().read_text())
        full["skinny"].update({k: v for k, v in table.items() if v is not None})
        (a.out / f"{gpu_slug()}.json").write_text(json.dumps(full, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
