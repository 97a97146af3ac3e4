"""benchmarks/flow_mods_ab.py: the flow head's modulation GEMMs at many rows, stacked into one against one per block.

    python benchmarks/flow_mods_ab.py --out OUT [--formats fp8,bf16] [--prompts 8]   # a GPU; writes OUT/flow_mods_ab.json

Above 64 modulation rows (3 prompts or more, 16 steps x 2 CFG rows each) KernelFlowHead computes the adaLN
modulations of all 16 Euler steps with cuBLAS. At 8 prompts that is 256 rows x 3072 against 12 matrices of
9216 and one of 6144 columns: 13 compute-bound GEMMs of a few waves of tiles each, and an FP8 scale-and-bias
pass over a (12, 256, 9216) fp32 view with a broadcast in the middle. merge_mods (FP8's
default, forced here for both formats) stacks the 13 matrices into one GEMM with one contiguous pass;
merge_mods=False is the per-block form.

Full-size flow head (random weights of the released shapes), --prompts prompts with 2 CFG rows each. For each
format both heads are built; each is timed two ways from CUDA graphs, in --rounds rounds in turn (best median
kept): the modulations alone (`_mods_cublas` on the same input) and the whole 16-step head. Their latents are
compared (the stacked GEMM may sum in another order: close, not necessarily equal).
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
from benchmarks.speed import capture, environment, settle, timed  # noqa: E402
from runtime.fast.kernel_flow_head import KernelFlowHead  # noqa: E402


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--formats", default="fp8,bf16")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=30)
    a = p.parse_args(argv)
    dev, model = full_model_on_gpu("flow_mods_ab.py", a.out)
    cfg = model.cfg
    g = torch.Generator(device=dev).manual_seed(0)
    hid = torch.randn(a.prompts, 2, cfg.llm.hidden_size, device=dev, generator=g).to(torch.bfloat16)
    noise = torch.randn(a.prompts, cfg.flow_head.latent_dim, device=dev, generator=g)
    sc = [torch.tensor([v], device=dev) for v in (3.0, 1.0, 1.0)]
    res = {"env": environment(dev), "prompts": a.prompts, "rows": 2 * a.prompts, "steps": cfg.flow_head.num_steps,
           "formats": {}}
    for fmt in a.formats.split(","):
        heads = {"stacked": KernelFlowHead(model, weights=fmt, merge_mods=True),
                 "per_block": KernelFlowHead(model, weights=fmt, merge_mods=False)}
        row, latents, graphs = {}, {}, {}
        for name, head in heads.items():
            latents[name] = head(hid, noise, *sc).clone()  # warm-up: scratch and widened weights before capture
            buf = next(iter(head._scratch.values()))
            sy = head.modulation_rows(hid)
            out = torch.empty_like(noise)
            graphs[name] = {"mods": capture(lambda h=head, b=buf, x=sy: h._mods_cublas(x, b)),
                            "head": capture(lambda h=head, o=out: o.copy_(h(hid, noise, *sc)))}
            graphs[name]["head"]()
            torch.cuda.synchronize()
            row[name] = {"replay_equals_eager": bool(torch.equal(out, latents[name]))}
        settle(graphs["stacked"]["head"], dev)
        for _ in range(a.rounds):
            for name in heads:
                for part, replay in graphs[name].items():
                    ms = timed(replay, dev, warmup=3, runs=a.runs)["median_ms"]
                    key = f"{part}_ms"
                    row[name][key] = min(ms, row[name].get(key, ms))
        ref = latents["per_block"]
        row["latent_rel_l2"] = ((latents["stacked"] - ref).norm() / ref.norm()).item()
        row["latents_identical"] = bool(torch.equal(latents["stacked"], ref))
        for part in ("mods", "head"):
            row[f"{part}_saved_us"] = round((row["per_block"][f"{part}_ms"] - row["stacked"][f"{part}_ms"]) * 1e3, 1)
        res["formats"][fmt] = row
        print(fmt, json.dumps(row), flush=True)
        del heads, graphs
        torch.cuda.empty_cache()
        (a.out / "flow_mods_ab.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
