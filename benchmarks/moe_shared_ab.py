"""benchmarks/moe_shared_ab.py: FP8 shared experts as extra MoE slots against their own launches.

    python benchmarks/moe_shared_ab.py --out OUT [--token-step]     # a GPU; writes OUT/moe_shared_ab.json

Every MoE layer of the LLM has two always-on shared experts (a SwiGLU MLP of 2 x 1408 channels). With FP8
weights they ran as two skinny launches of their own (gate+up with the SwiGLU epilogue, then down) next to
the routed experts' two MoE launches; runtime.fast.decode_weights now stacks them after the routed experts
as slots every row takes with weight 1 (FusedMoEDecode.shared_slots), so each layer's FFN is the two MoE
launches. Full-size shapes, random weights, 2 rows (batch 1 with its 2 CFG rows), routing from the
layers' own routers.

Part 1, the layers alone: the 28 MoE layers' FFNs (routed + shared) back to back in one CUDA graph, per
variant: the shared experts apart, and as slots with the down kernel's experts split 2, 4 (the fallback
of the H200's table, tabled 6 for 6 routed slots) or 8 ways. Each variant's median over --runs replays,
--rounds rounds in turn, best kept; outputs against the apart variant (relative L2: rounding only).
The apart variant adds the two outputs in a separate launch, which the compiled step fuses away: part 2
is the fair comparison.
Part 2 (--token-step): the whole FP8 image-token step (runtime.fast.graph, compiled) with
MINGRT_MOE_SHARED=1 and =0, one compile each, timed in rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kernels.skinny as skinny  # noqa: E402
from benchmarks.pdl_check import full_model_on_gpu, token_step_ab  # noqa: E402
from benchmarks.speed import capture, environment, settle, timed  # noqa: E402
from models.llm import MoE  # noqa: E402
from runtime.fast.decode_weights import SHARED_IN_MOE_ENV, FusedMoEDecode, FusedSwiGLUDecode  # noqa: E402


def layers_part(model, dev, runs: int, rounds: int) -> dict:
    moes = [m for m in model.model.model.modules() if isinstance(m, MoE)]
    h = model.cfg.llm.hidden_size
    x = torch.randn(2, h, generator=torch.Generator(device=dev).manual_seed(0), device=dev).to(torch.bfloat16)
    routes = [m.gate(x)[:2] for m in moes]  # (ids, weights) of each layer
    apart = [(FusedMoEDecode(m, "fp8", shared=False), FusedSwiGLUDecode(m.shared_experts)) for m in moes]
    slots = [FusedMoEDecode(m, "fp8", shared=True) for m in moes]
    outs = torch.empty(len(moes), 2, h, device=dev, dtype=torch.bfloat16)
    moe_table = skinny.launch_table().setdefault("moe", {})  # the live entries moe.pick_config reads
    i = moes[0].w_gate.shape[1]
    k = moes[0].gate.top_k + slots[0].shared_slots
    key = f"h{h}_i{i}_fp8_k{k}"

    def run_apart():
        for j, ((fused, shared), (ids, w)) in enumerate(zip(apart, routes)):
            torch.add(fused(x, ids, w).to(torch.bfloat16), shared(x), out=outs[j])

    def run_slots():
        for j, (fused, (ids, w)) in enumerate(zip(slots, routes)):
            outs[j].copy_(fused(x, ids, w))

    variants = {"shared apart (4 launches)": (run_apart, None)}
    for split in (2, 4, 8):
        variants[f"shared as slots, down split {split}"] = (run_slots, split)
    res, ref = {}, None
    settle(run_apart, dev)
    tabled = moe_table.get(key)  # put back afterwards: the token step (part 2) runs the table as it is
    base = dict(moe_table.get(f"h{h}_i{i}_fp8", {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3}))
    for _ in range(rounds):
        for name, (fn, split) in variants.items():
            if split is not None:
                moe_table[key] = dict(base, DOWN_SPLIT=split)
            replay = capture(fn)
            replay()
            got = outs.float().clone()
            ref = got if ref is None else ref
            ms = timed(replay, dev, 3, runs)["median_ms"]
            row = res.setdefault(name, {"ms": ms})
            row["ms"] = min(row["ms"], ms)
            row["per_layer_us"] = row["ms"] * 1e3 / len(moes)
            row["rel_l2_to_apart"] = float((got - ref).norm() / ref.norm())
            print(f"{name:40s} {ms:7.3f} ms ({row['per_layer_us']:.1f} us a layer)  rel {row['rel_l2_to_apart']:.1e}",
                  flush=True)
    if tabled is None:
        moe_table.pop(key, None)
    else:
        moe_table[key] = tabled
    apart.clear(), slots.clear()  # their FP8 copies
    torch.cuda.empty_cache()
    return {"layers": len(moes), "rows": 2, "slots_per_row": k, "variants": res}


def token_step_part(model, dev, runs: int, rounds: int) -> dict:
    was = os.environ.get(SHARED_IN_MOE_ENV)

    def shared(flag: str):
        return lambda: os.environ.__setitem__(SHARED_IN_MOE_ENV, flag)

    try:
        return token_step_ab(model, dev, "fp8", {f"shared as slots={f}": shared(f) for f in ("1", "0")}, runs, rounds)
    finally:
        if was is None:
            os.environ.pop(SHARED_IN_MOE_ENV, None)
        else:
            os.environ[SHARED_IN_MOE_ENV] = was


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--token-step", action="store_true", help="also the compiled FP8 token step, both ways (2 compiles)")
    a = p.parse_args(argv)
    dev, model = full_model_on_gpu("moe_shared_ab.py", a.out)
    res = {"env": environment(dev)}
    path = a.out / "moe_shared_ab.json"
    with torch.no_grad():
        res["layers"] = layers_part(model, dev, a.runs, a.rounds)
        path.write_text(json.dumps(res, indent=1))
        if a.token_step:
            res["token_step"] = token_step_part(model, dev, a.runs, a.rounds)
            path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
