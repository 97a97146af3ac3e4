"""benchmarks/moe_down_groups.py: the batch-8 MoE down GEMM with each program streaming a group of experts.

    python benchmarks/moe_down_groups.py --out OUT [--rows 16] [--layers 8]   # a GPU; writes OUT/moe_down_groups.json

At 16 rows (8 prompts, 2 CFG rows) the FP8 step's grouped down kernel (kernels/moe.py) runs one program per
(expert, 64-wide H block): ~36 chosen experts x 32 blocks, each streaming 64 x 1408 FP8 weights (90 KB) in 11 K
steps, then storing per-slot partials, taking a ticket per row and block, and the last of a row's 8 slot programs
summing them. It streams at ~2.3 TB/s (session 17's profile: 45.2 us a layer), the slowest part of the batch-8
step. An experiment, nothing in the runtime uses it: here one program takes an H block and GROUP of the chosen
experts (ascending ids), accumulates every row's weighted products of those experts in its (BLOCK_N, rows) tile,
stores one partial per group, and the last group to arrive at its H block sums the groups in order: fewer, longer
programs and one ticket per block. Deterministic (a fixed order), but not the production kernel's order (that sums
a row's slots in routing order), so the two agree to fp32 rounding, not bit for bit.

Layers of the LLM's MoE shapes (66 experts: 64 routed + the 2 shared as slots, H 2048, I 1408, FP8 per-channel),
their own random weights each (past L2), routed in CFG pairs (a prompt's rows choose the same 6 experts) plus the
2 shared slots. Each variant runs the production grouped gate/up kernel, then a down kernel, per layer, all layers
in one CUDA graph; "gate_up only" is subtracted to give the down kernel's time.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from benchmarks.speed import capture, environment, settle, timed  # noqa: E402
from kernels import moe  # noqa: E402
from kernels._triton import arrive, fp8_widen, mma, next_pow2, pdl_enter, pdl_launch, pdl_main_loop_done, rearm, unwiden  # noqa: E402, E501
from kernels.fp8 import quantize_rows_fp8  # noqa: E402


@triton.jit
def _down_groups_kernel(act_ptr, ids_ptr, topw_ptr, wd_ptr, sd_ptr, y_ptr, part_ptr, ticket_ptr, T, H, I, stride_y,
                        TOPK: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
                        GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                        WIDEN: tl.constexpr):
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    pdl_enter(PDL)
    rm = tl.arange(0, BLOCK_M)
    rj = tl.arange(0, BLOCK_J)
    re = tl.arange(0, BLOCK_E)
    row_ok = rm < T
    ids2 = tl.load(ids_ptr + rm[:, None] * TOPK + rj[None, :], mask=row_ok[:, None] & (rj[None, :] < TOPK), other=-1)
    # the chosen experts, ascending: present[e], and each one's rank among them
    hit = (tl.reshape(ids2, (BLOCK_M * BLOCK_J,))[None, :] == re[:, None]).to(tl.int32)  # (BLOCK_E, BM * BJ)
    present = tl.max(hit, axis=1)
    count = tl.sum(present, axis=0)
    rank = tl.cumsum(present, axis=0) - 1
    used = tl.cdiv(count, GROUP)  # groups with work; the grid holds the most there can be
    if g < used:
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < H
        y = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        for jj in range(GROUP):
            j = g * GROUP + jj
            if j < count:
                e = tl.sum(tl.where((rank == j) & (present > 0), re, 0), axis=0)
                match = ids2 == e  # (BM, BJ): the row's slot that chose e, if any
                has = tl.max(match.to(tl.int32), axis=1) > 0
                slot = rm * TOPK + tl.sum(tl.where(match, rj[None, :], 0), axis=1)
                rows = (e.to(tl.int64) * H + rn).to(tl.int64) * I
                acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
                for k0 in range(0, I, BLOCK_K):
                    kk = k0 + rk
                    k_ok = kk < I
                    at = tl.load(act_ptr + slot[None, :].to(tl.int64) * I + kk[:, None], mask=k_ok[:, None] & has[None, :],
                                 other=0.0)  # (BK, BM)
                    acc += mma(tl.load(wd_ptr + rows[:, None] + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0),
                               at, False, WIDEN)
                acc = unwiden(acc, WIDEN) * tl.load(sd_ptr + e * H + rn, mask=n_ok, other=0.0)[:, None]
                y += acc * tl.load(topw_ptr + slot, mask=has, other=0.0).to(tl.float32)[None, :]
        pdl_main_loop_done(PDL)
        ok = n_ok[:, None] & row_ok[None, :]
        tl.store(part_ptr + (g * T + rm[None, :]).to(tl.int64) * H + rn[:, None], y, mask=ok)
        ticket = arrive(ticket_ptr + pid_n, None)
        if ticket == used - 1:  # the last group at this block sums the groups in order
            total = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
            for gg in range(used):
                total += tl.load(part_ptr + (gg * T + rm[None, :]).to(tl.int64) * H + rn[:, None], mask=ok, other=0.0,
                                 cache_modifier=".cg")
            tl.store(y_ptr + rm[None, :].to(tl.int64) * stride_y + rn[:, None], total, mask=ok)
            rearm(ticket_ptr + pid_n, ticket == used - 1)


def make_layers(n: int, e: int, h: int, i: int, dev) -> list[dict]:
    out = []
    for _ in range(n):
        q = [quantize_rows_fp8(torch.randn(*shape, device=dev) * 0.02) for shape in ((e, i, h), (e, i, h), (e, h, i))]
        out.append({"w": [w for w, _ in q], "s": [s.to(dev).reshape(w.shape[0], w.shape[1]) for w, s in q]})
    return out


def routing(prompts: int, routed: int, k: int, shared: int, gen) -> torch.Tensor:
    rows = []
    for _ in range(prompts):
        pick = torch.randperm(routed, generator=gen)[:k].tolist() + list(range(routed, routed + shared))
        rows += [pick, pick]
    return torch.tensor(rows, dtype=torch.int32)


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--groups", default="2,3,4,6,9")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("moe_down_groups.py needs a CUDA GPU")
    dev = torch.device("cuda")
    a.out.mkdir(parents=True, exist_ok=True)
    routed, k_routed, shared, h, i = 64, 6, 2, 2048, 1408
    e, k, t = routed + shared, k_routed + shared, a.rows
    layers = make_layers(a.layers, e, h, i, dev)
    gen = torch.Generator().manual_seed(0)
    ids = [routing(t // 2, routed, k_routed, shared, gen).to(dev) for _ in range(a.layers)]
    topw = [torch.rand(t, k, generator=gen).to(dev) for _ in range(a.layers)]
    x = torch.randn(t, h, generator=gen).to(dev).to(torch.float16)
    distinct = sum(len(set(r.flatten().tolist())) for r in ids) / a.layers
    act = torch.empty(t * k, i, dtype=torch.float16, device=dev)
    y = torch.empty(t, h, dtype=torch.float32, device=dev)
    cfg = moe.pick_config(h, i, True, True, k, rows=t)
    up, down = moe.split_config(cfg)
    down.pop("SPLIT_E")
    common = dict(UPCAST=False, WIDEN=fp8_widen(torch.float8_e4m3fn), **pdl_launch(dev))
    programs, slots = moe.grouped_grid(t, k, e)  # as moe_decode launches them
    part = torch.empty(max(t * k, min(t * k, e) * t) * h, dtype=torch.float32, device=dev)  # per slot / per group
    prod_tickets = moe.reserve_tickets(dev, h, t)

    def gate_up(li):
        L = layers[li]
        moe._gate_up_grouped_kernel[(programs, triton.cdiv(i, up["BLOCK_N"]))](
            x, ids[li], L["w"][0], L["w"][1], L["s"][0], L["s"][1], act, t * k, h, i, x.stride(0), TOPK=k, HAS_SCALE=True,
            **slots, **common, **up)

    def prod_down(li):
        L = layers[li]
        moe._down_grouped_kernel[(programs, triton.cdiv(h, down["BLOCK_N"]))](
            act, ids[li], topw[li], L["w"][2], L["s"][2], y, part, prod_tickets, t * k, h, i, y.stride(0), TOPK=k,
            HAS_SCALE=True, **slots, **common, **down)

    def groups_down(li, c):
        L = layers[li]
        n_groups = triton.cdiv(min(t * k, e), c["GROUP"])
        _down_groups_kernel[(triton.cdiv(h, c["BLOCK_N"]), n_groups)](
            act, ids[li], topw[li], L["w"][2], L["s"][2], y, part, c["tickets"], t, h, i, y.stride(0), TOPK=k,
            BLOCK_J=next_pow2(k), BLOCK_E=next_pow2(e), BLOCK_M=max(16, next_pow2(t)), GROUP=c["GROUP"],
            BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], num_warps=c["num_warps"], num_stages=c["num_stages"],
            PDL=common["PDL"], **({"launch_pdl": True} if "launch_pdl" in common else {}), WIDEN=common["WIDEN"])

    def graph_ms(body) -> float:
        replay = capture(lambda: [body(li) for li in range(a.layers)])
        return timed(replay, dev, warmup=3, runs=a.runs)["median_ms"]

    # reference outputs of the last layer from the production kernels
    gate_up(a.layers - 1)
    prod_down(a.layers - 1)
    ref = y.clone()
    settle(lambda: [gate_up(li) for li in range(a.layers)], dev)
    res = {"env": environment(dev), "rows": t, "layers": a.layers, "distinct_experts_per_layer": distinct,
           "production_config": cfg, "variants": []}
    gu = min(graph_ms(gate_up) for _ in range(2))
    both = min(graph_ms(lambda li: (gate_up(li), prod_down(li))) for _ in range(2))
    res.update(gate_up_us=gu * 1e3 / a.layers, production_down_us=(both - gu) * 1e3 / a.layers)
    mb = distinct * h * i / 1e6
    res["down_mb_per_layer"] = mb
    print(f"gate_up {res['gate_up_us']:.1f} us, production down {res['production_down_us']:.1f} us a layer "
          f"({mb / res['production_down_us']:.2f} TB/s over {distinct:.2f} experts)", flush=True)
    best = None
    for group in (int(v) for v in a.groups.split(",")):
        for bn in (32, 64, 128):
            for warps in (2, 4):
                for stages in (3, 4):
                    c = {"GROUP": group, "BLOCK_N": bn, "BLOCK_K": 128, "num_warps": warps, "num_stages": stages}
                    c["tickets"] = torch.zeros(triton.cdiv(h, bn), dtype=torch.int32, device=dev)
                    try:
                        gate_up(a.layers - 1)
                        y.zero_()
                        groups_down(a.layers - 1, c)
                        torch.cuda.synchronize()
                        rel = ((y - ref).norm() / ref.norm()).item()
                        us = (min(graph_ms(lambda li, c=c: (gate_up(li), groups_down(li, c))) for _ in range(2)) - gu) \
                            * 1e3 / a.layers
                        rearmed = not c["tickets"].any().item()
                    except Exception as exc:  # noqa: BLE001 - out of resources and the like
                        print(f"  {c}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                        continue
                    c.pop("tickets")
                    row = {"config": c, "down_us": us, "tbps": mb / us, "rel_l2_to_production": rel, "tickets_rearmed": rearmed}
                    res["variants"].append(row)
                    if rel < 1e-4 and rearmed and (best is None or us < best["down_us"]):
                        best = row
                    print(f"  {c} {us:.1f} us {mb / us:.2f} TB/s rel {rel:.1e} rearmed {rearmed}", flush=True)
        (a.out / "moe_down_groups.json").write_text(json.dumps(dict(res, best=best), indent=1))
    print("best", json.dumps(best), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
