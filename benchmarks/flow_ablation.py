"""benchmarks/flow_ablation.py: what each launch kind of the kernel flow head costs inside its CUDA graph.

    python benchmarks/flow_ablation.py --out OUT       # a GPU; writes OUT/flow_ablation.json

Full-size flow head (random weights of the released shapes), 2 CFG rows, the whole 16-step head from one
CUDA graph. Each variant leaves one kind of launch out of the capture (the LayerNorm + modulation, the
w12 GEMMs, the w3 GEMMs) and times what is left, after 2 s of warm-up (an idle GPU reads ~10% slow
at first), the variants in turn, --rounds times, keeping each one's best median. The saving is an upper bound on what fusing that launch
away could give. The variants' latents are wrong by construction; only the full one is a result, and
full_no_pdl (--no-pdl-too), which only moves launches in time, must give its latent bit for bit.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import runtime.fast.kernel_flow_head as kfh_module  # noqa: E402
from benchmarks.pdl_check import flow_head_bench  # noqa: E402
from benchmarks.speed import capture, settle, timed  # noqa: E402
from kernels._triton import set_pdl  # noqa: E402
from kernels.skinny import GATED_RESIDUAL, SWIGLU  # noqa: E402

REAL = kfh_module.ln_modulate, kfh_module.skinny_gemm, kfh_module.skinny_partials


def patched(skip: set[str]):
    """(ln_modulate, skinny_gemm, skinny_partials) that leave out the launch kinds in `skip` (w3 is a
    skinny_partials launch with the head's deferred residual, a gated-residual skinny_gemm without)."""
    real_ln, real_gemm, real_partials = REAL

    def ln(x, shift, scale, out, **kw):
        if "w3" in skip:  # no partials were written: nothing to merge
            kw["residual"] = None
        return out if "ln" in skip else real_ln(x, shift, scale, out, **kw)

    def gemm(x, w, out, **kw):
        kind = {SWIGLU: "w12", GATED_RESIDUAL: "w3"}.get(kw.get("epilogue"), "other")
        return out if kind in skip else real_gemm(x, w, out, **kw)

    def partials(x, w, parts, **kw):
        return 1 if "w3" in skip else real_partials(x, w, parts, **kw)
    return ln, gemm, partials


VARIANTS = {"full": set(), "no_ln": {"ln"}, "no_w12": {"w12"}, "no_w3": {"w3"}, "gemms_only_w12_w3": {"ln", "other"}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--formats", default="fp8")
    p.add_argument("--rounds", type=int, default=2, help="time the variants this many times in turn, keep the best")
    p.add_argument("--no-pdl-too", action="store_true", help="also time the full head without PDL")
    p.add_argument("--merge-in-w3", action="store_true", help="the head whose w3 merges its own split-K sums (a ticket)")
    a = p.parse_args(argv)
    dev, model, (hid, noise, sc), res = flow_head_bench("flow_ablation.py", a.out)
    res["deferred_residual"] = not a.merge_in_w3
    cfg = model.cfg
    for fmt in a.formats.split(","):
        head = kfh_module.KernelFlowHead(model, weights=fmt, deferred_residual=not a.merge_in_w3)
        out = torch.empty(1, cfg.flow_head.latent_dim, device=dev)
        head(hid, noise, *sc)  # scratch before any capture
        row, latents = {}, {}
        variants = dict(VARIANTS, **({"full_no_pdl": set()} if a.no_pdl_too else {}))
        settle(lambda: head(hid, noise, *sc), dev)
        for name, skip in [*variants.items()] * a.rounds:  # rounds: each variant's best median
            kfh_module.ln_modulate, kfh_module.skinny_gemm, kfh_module.skinny_partials = patched(skip)
            set_pdl(False if name == "full_no_pdl" else None)
            try:
                replay = capture(lambda: out.copy_(head(hid, noise, *sc)))
                ms = timed(replay, dev, warmup=3, runs=30)["median_ms"]
                row[name] = min(ms, row.get(name, ms))
            finally:
                kfh_module.ln_modulate, kfh_module.skinny_gemm, kfh_module.skinny_partials = REAL
                set_pdl(None)
            if name.startswith("full"):  # real latents: must be the same bits
                latents.setdefault(name, out.clone())
            print(fmt, name, f"{ms:.3f} ms", flush=True)
        row["saving_ms"] = {k: row["full"] - v for k, v in row.items() if k != "full"}
        row["latent_identical_to_full"] = {k: bool(torch.equal(latents["full"], v)) for k, v in latents.items() if k != "full"}
        res["formats"][fmt] = row
        (a.out / "flow_ablation.json").write_text(json.dumps(res, indent=1))
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
