"""Fused MoE decode: read only the routed experts' weights, straight from the stacked tensors.

At decode every token (CFG row) picks k of E experts. A per-expert loop launches E small GEMMs (and
syncs to find which experts are used); gathering the routed weights first copies them (read + write
+ read). These kernels index the stacked weights (E, I, H) / (E, H, I) with the device-side routing,
and nothing is synchronised. Two forms:

per routing slot (below GROUPED_MIN_ROWS rows: one row, two with FP8 weights; each slot reads its expert's weights, so an expert
two rows chose is read twice):
  gate_up: grid (T*k slots, I blocks)   act[s] = silu(x[t] @ Wg[e]^T) * (x[t] @ Wu[e]^T)
  down:    grid (T, H blocks[, splits])  y[t]   = sum_j w[t, j] * (act[t*k + j] @ Wd[e_j]^T)
grouped (from GROUPED_MIN_ROWS rows: each chosen expert's weights cross HBM once per call):
  gate_up: grid (E, I blocks)   every slot that chose e in the columns of one tile; unchosen experts exit
  down:    grid (E, H blocks)   part[s] = w[s] * (act[s] @ Wd[e]^T); the last of a row's k programs to
                                arrive (a ticket per row and H block) sums its k partials in slot order
  with fewer slots than experts (T*k < E) the grid's first axis is the slots instead: a slot's program
  takes its expert if it is that expert's first slot, so no program waits on the E - T*k idle experts

The k-sum runs in a fixed order in every form: inside one program, or (DOWN_SPLIT > 1, grouped) over
programs whose last to arrive adds the shares in order (kernels._triton.arrive, as the skinny GEMM's
split-K): deterministic either way. A row is a column of a 16-wide (or wider) tile so the tensor cores
do the products (CUDA-core FMAs after widening FP8 to fp32 made the FP8 kernel compute-bound at
1.9 TB/s); FP8 weights carry a per-(expert, output channel) fp32 scale applied after the reduction.
"""
from __future__ import annotations

import functools
import os
import re

import torch

from ._triton import fp8_widen, interpreting, next_pow2, pdl_launch, require, scratch, tickets, tl, triton

if triton is not None:
    from ._triton import arrive, mma, pdl_enter, pdl_main_loop_done, rearm, store_cast, unwiden

    @triton.jit
    def _gate_up_kernel(x_ptr, ids_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, act_ptr, H, I, stride_x,
                        TOPK: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        UPCAST: tl.constexpr, PDL: tl.constexpr, WIDEN: tl.constexpr = 0):
        pdl_enter(PDL)  # the routing (which experts) comes from the previous kernel: nothing to prefetch
        s = tl.program_id(0)
        t = s // TOPK
        e = tl.load(ids_ptr + s).to(tl.int64)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        col = tl.arange(0, 16)
        n_ok = rn < I
        rows = (e * I + rn).to(tl.int64) * H
        acc_g = tl.zeros((BLOCK_N, 16), tl.float32)
        acc_u = tl.zeros((BLOCK_N, 16), tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < H
            # the row in column 0 of a (BK, 16) tile: the tensor cores' smallest N; the rest are zeros
            xt = tl.load(x_ptr + t * stride_x + kk[:, None] + col[None, :] * 0, mask=k_ok[:, None] & (col[None, :] == 0),
                         other=0.0)
            ok = n_ok[:, None] & k_ok[None, :]
            acc_g += mma(tl.load(wg_ptr + rows[:, None] + kk[None, :], mask=ok, other=0.0), xt, UPCAST, WIDEN)
            acc_u += mma(tl.load(wu_ptr + rows[:, None] + kk[None, :], mask=ok, other=0.0), xt, UPCAST, WIDEN)
        pdl_main_loop_done(PDL)
        g = tl.sum(acc_g, axis=1)
        u = tl.sum(acc_u, axis=1)
        g, u = unwiden(g, WIDEN), unwiden(u, WIDEN)
        if HAS_SCALE:
            g = g * tl.load(sg_ptr + e * I + rn, mask=n_ok, other=0.0)
            u = u * tl.load(su_ptr + e * I + rn, mask=n_ok, other=0.0)
        store_cast(act_ptr + s * I + rn, g / (1.0 + tl.exp(-g)) * u, n_ok)

    @triton.jit
    def _down_kernel(act_ptr, ids_ptr, topw_ptr, wd_ptr, sd_ptr, y_ptr, part_ptr, ticket_ptr, H, I, stride_y,
                     TOPK: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_E: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr, WIDEN: tl.constexpr = 0):
        pdl_enter(PDL)
        t = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_e = tl.program_id(2)  # SPLIT_E > 1: this program's share of the row's experts
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        col = tl.arange(0, 16)
        n_ok = rn < H
        y = tl.zeros((BLOCK_N,), tl.float32)
        for jj in range(TOPK // SPLIT_E):  # this row's experts in routing order: a fixed summation order
            s = t * TOPK + pid_e * (TOPK // SPLIT_E) + jj
            e = tl.load(ids_ptr + s).to(tl.int64)
            rows = (e * H + rn).to(tl.int64) * I
            acc = tl.zeros((BLOCK_N, 16), tl.float32)
            for k0 in range(0, I, BLOCK_K):
                kk = k0 + rk
                k_ok = kk < I
                at = tl.load(act_ptr + s * I + kk[:, None] + col[None, :] * 0, mask=k_ok[:, None] & (col[None, :] == 0),
                             other=0.0)
                acc += mma(tl.load(wd_ptr + rows[:, None] + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0),
                           at, UPCAST, WIDEN)
            part = tl.sum(acc, axis=1)
            part = unwiden(part, WIDEN)
            if HAS_SCALE:
                part = part * tl.load(sd_ptr + e * H + rn, mask=n_ok, other=0.0)
            y += tl.load(topw_ptr + s).to(tl.float32) * part
        pdl_main_loop_done(PDL)
        out_ok = n_ok
        if SPLIT_E > 1:
            # each share writes its partial (T, SPLIT_E, H); the last to arrive (a ticket per output block)
            # sums them in share order: deterministic, as the skinny GEMM's split-K
            tl.store(part_ptr + (t * SPLIT_E + pid_e) * H + rn, y, mask=n_ok)
            slot = ticket_ptr + t * tl.num_programs(1) + pid_n
            ticket = arrive(slot, None)
            out_ok = n_ok & ((tl.zeros((BLOCK_N,), tl.int32) + ticket) == SPLIT_E - 1)
            y = tl.zeros((BLOCK_N,), tl.float32)
            for sp in range(SPLIT_E):
                y += tl.load(part_ptr + (t * SPLIT_E + sp) * H + rn, mask=out_ok, other=0.0, cache_modifier=".cg")
            rearm(slot, ticket == SPLIT_E - 1)
        tl.store(y_ptr + t * stride_y + rn, y.to(y_ptr.dtype.element_ty), mask=out_ok)


    @triton.jit
    def _expert_slots(ids_ptr, e, S, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr):
        """The routing slots (row * k + j) that chose expert e, packed in slot order into BLOCK_M columns:
        (slot of each column, whether the column is used, how many are)."""
        rs = tl.arange(0, BLOCK_S)
        match = ((tl.load(ids_ptr + rs, mask=rs < S, other=-1) == e) & (rs < S)).to(tl.int32)  # never a padding lane
        rank = tl.cumsum(match, axis=0) - 1
        cols = tl.arange(0, BLOCK_M)
        sel = (rank[None, :] == cols[:, None]) & (match[None, :] == 1)  # (BLOCK_M, BLOCK_S): column c <- its slot
        slot = tl.sum(tl.where(sel, rs[None, :], 0), axis=1)
        used = tl.sum(sel.to(tl.int32), axis=1) > 0
        return slot, used, tl.sum(match, axis=0)

    @triton.jit
    def _program_expert(ids_ptr, S, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BY_SLOT: tl.constexpr):
        """This program's expert, the slots that chose it (_expert_slots) and whether it has work. BY_SLOT
        (fewer slots than experts): program p takes the expert of slot p, and works only if p is that expert's
        first slot, so the grid holds the slots, not every expert. Else program p takes expert p."""
        p = tl.program_id(0)
        e = tl.load(ids_ptr + p).to(tl.int32) if BY_SLOT else p
        slot, used, count = _expert_slots(ids_ptr, e, S, BLOCK_S, BLOCK_M)
        if BY_SLOT:
            work = tl.min(tl.where(used, slot, S), axis=0) == p  # column 0 holds the first slot
        else:
            work = count > 0
        return e, slot, used, work

    @triton.jit
    def _gate_up_grouped_kernel(x_ptr, ids_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, act_ptr, S, H, I, stride_x,
                                TOPK: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BY_SLOT: tl.constexpr, UPCAST: tl.constexpr,
                                PDL: tl.constexpr, WIDEN: tl.constexpr = 0):
        """One working program per (chosen expert, I block): every row that chose the expert in one tile, so its weights
        cross HBM once per call however many rows share it. Programs without an expert exit at once."""
        pdl_enter(PDL)
        e, slot, used, work = _program_expert(ids_ptr, S, BLOCK_S, BLOCK_M, BY_SLOT)
        if work:
            t = slot // TOPK
            rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            rk = tl.arange(0, BLOCK_K)
            n_ok = rn < I
            rows = (e.to(tl.int64) * I + rn).to(tl.int64) * H
            acc_g = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
            acc_u = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
            for k0 in range(0, H, BLOCK_K):
                kk = k0 + rk
                k_ok = kk < H
                xt = tl.load(x_ptr + t[None, :].to(tl.int64) * stride_x + kk[:, None], mask=k_ok[:, None] & used[None, :],
                             other=0.0)  # (BK, BM): the rows as columns
                ok = n_ok[:, None] & k_ok[None, :]
                acc_g += mma(tl.load(wg_ptr + rows[:, None] + kk[None, :], mask=ok, other=0.0), xt, UPCAST, WIDEN)
                acc_u += mma(tl.load(wu_ptr + rows[:, None] + kk[None, :], mask=ok, other=0.0), xt, UPCAST, WIDEN)
            pdl_main_loop_done(PDL)
            acc_g, acc_u = unwiden(acc_g, WIDEN), unwiden(acc_u, WIDEN)
            if HAS_SCALE:
                acc_g = acc_g * tl.load(sg_ptr + e * I + rn, mask=n_ok, other=0.0)[:, None]
                acc_u = acc_u * tl.load(su_ptr + e * I + rn, mask=n_ok, other=0.0)[:, None]
            store_cast(act_ptr + slot[None, :].to(tl.int64) * I + rn[:, None], acc_g / (1.0 + tl.exp(-acc_g)) * acc_u,
                       n_ok[:, None] & used[None, :])

    @triton.jit
    def _down_grouped_kernel(act_ptr, ids_ptr, topw_ptr, wd_ptr, sd_ptr, y_ptr, part_ptr, ticket_ptr, S, H, I, stride_y,
                             TOPK: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BY_SLOT: tl.constexpr, UPCAST: tl.constexpr,
                             PDL: tl.constexpr, WIDEN: tl.constexpr = 0):
        """One working program per (chosen expert, H block): part[slot] = topw[slot] * (act[slot] @ Wd[e]^T) for the slots
        that chose e. A row's k slots sit in k programs; the last of them to arrive (a ticket per row and
        H block) sums the row's k partials in routing order: the sum does not depend on scheduling."""
        pdl_enter(PDL)
        pid_n = tl.program_id(1)
        e, slot, used, work = _program_expert(ids_ptr, S, BLOCK_S, BLOCK_M, BY_SLOT)
        if work:
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            rk = tl.arange(0, BLOCK_K)
            n_ok = rn < H
            rows = (e.to(tl.int64) * H + rn).to(tl.int64) * I
            acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
            for k0 in range(0, I, BLOCK_K):
                kk = k0 + rk
                k_ok = kk < I
                at = tl.load(act_ptr + slot[None, :].to(tl.int64) * I + kk[:, None], mask=k_ok[:, None] & used[None, :],
                             other=0.0)
                acc += mma(tl.load(wd_ptr + rows[:, None] + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0),
                           at, UPCAST, WIDEN)
            pdl_main_loop_done(PDL)
            acc = unwiden(acc, WIDEN)
            if HAS_SCALE:
                acc = acc * tl.load(sd_ptr + e * H + rn, mask=n_ok, other=0.0)[:, None]
            acc = acc * tl.load(topw_ptr + slot, mask=used, other=0.0).to(tl.float32)[None, :]
            out_ok = n_ok[:, None] & used[None, :]
            tl.store(part_ptr + slot[None, :].to(tl.int64) * H + rn[:, None], acc, mask=out_ok)
            t = slot // TOPK
            tix = ticket_ptr + t * tl.num_programs(1) + pid_n
            ticket = arrive(tix, used)
            last = used & (ticket == TOPK - 1)
            y = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
            for j in range(TOPK):  # routing order
                y += tl.load(part_ptr + (t * TOPK + j)[None, :].to(tl.int64) * H + rn[:, None],
                             mask=n_ok[:, None] & last[None, :], other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + t[None, :].to(tl.int64) * stride_y + rn[:, None], y.to(y_ptr.dtype.element_ty),
                     mask=n_ok[:, None] & last[None, :])
            rearm(tix, last)


def candidate_configs(warps: tuple[int, ...] = (2, 4)) -> list[dict]:
    """The per-slot kernels' tiles a sweep tries. Both warp counts: with FP8 weights 2 warps took the H200's
    per-slot MoE from 61.7 to 42.0 us a layer (4 warps widen each weight element twice; session 17,
    benchmarks/results/moe_tiles_ab_h200_s17.json)."""
    return [{"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": 3}
            for bn in (16, 32, 64) for bk in (128, 256, 512) if bn * bk <= 16384 for w in warps]


def down_candidates(best: dict, topk: int = 6) -> list[dict]:
    """`best` with each other tile for the down kernel alone, and each split of the row's experts over
    programs (DOWN_SPLIT, a divisor of top-k) (benchmarks/kernels.py times these second). The warps stay
    `best`'s (the two kernels share them), so each tile comes once."""
    out = []
    for c in candidate_configs((best.get("num_warps", 4),)):
        for split in (1, 2, 3, 6):
            if topk % split == 0 and ((c["BLOCK_N"], c["BLOCK_K"]) != (best["BLOCK_N"], best["BLOCK_K"]) or split > 1):
                out.append(dict(best, DOWN_BLOCK_N=c["BLOCK_N"], DOWN_BLOCK_K=c["BLOCK_K"], DOWN_SPLIT=split))
    return out


MAX_TICKET_ROWS = 64  # rows one decode call may bring (kernels.skinny.MAX_ROWS)


def reserve_tickets(device, h: int, rows: int = MAX_TICKET_ROWS) -> torch.Tensor:
    """The down kernel's expert-split tickets (kernels._triton.tickets): enough for `rows` rows at the
    smallest output block (16); FusedMoEDecode reserves them before any capture."""
    return tickets("moe_decode", device, rows * -(-h // 16))


# the grouped kernels' tiles: the best of benchmarks/moe_grouped.py's sweep at 2 to 16 rows, both formats,
# on an H200 (benchmarks/results/moe_grouped_h200_s9.json); measured GPUs may table their own (pick_config)
GROUPED_DEFAULT = {"BLOCK_N": 64, "BLOCK_K": 128, "DOWN_BLOCK_N": 64, "DOWN_BLOCK_K": 128, "num_warps": 4, "num_stages": 3}


def pick_config(h: int, i: int, fp8: bool, grouped: bool = False, k: int | None = None, rows: int | None = None) -> dict:
    """The launch config of the per-slot (table "moe") or grouped (table "moe_grouped") kernels: the entry for k
    slots a row and this row count's power-of-two bucket (`..._k8_m2`) if tabled, else the entry for k slots a
    row (`..._k8`: routed + shared experts), else the shape's entry, whose DOWN_SPLIT drops to the largest divisor
    of k not above it (k = 8 with a split tabled for 6: 4)."""
    if interpreting():
        return {"BLOCK_N": 32, "BLOCK_K": 64}  # few, wide programs: the interpreter runs them one by one
    from .skinny import tuned_configs_for

    table = tuned_configs_for("moe_grouped" if grouped else "moe")
    key = f"h{h}_i{i}_{'fp8' if fp8 else 'bf16'}"
    found = table.get(f"{key}_k{k}_m{next_pow2(rows)}") if k is not None and rows is not None else None
    if not found and k is not None:
        found = table.get(f"{key}_k{k}")
    if not found:
        found = table.get(key)
        if found and k is not None and k % found.get("DOWN_SPLIT", 1):
            found = dict(found, DOWN_SPLIT=max(d for d in range(1, found["DOWN_SPLIT"] + 1) if k % d == 0))
    if found:
        return dict(found)
    return dict(GROUPED_DEFAULT) if grouped else {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3}


# From this many rows on, moe_decode runs the grouped kernels (one program per expert, all its rows in one
# tile: each chosen expert's weights cross HBM once) instead of one program per routing slot (each slot
# reads its expert's weights again, which L2 catches only in part). benchmarks/moe_grouped.py measures both.
# bf16 weights: 2 (batch 1's CFG rows), since the grouped grid holds slots, not experts, when there are
# fewer slots: a layer at 2 rows 33.0 against 36.0 us (H200, benchmarks/results/h200_session10.md).
# FP8 weights: 3. Session 10 had moved 2 rows to the grouped kernels too (37.8 against 40.8 us); since the
# FP8 rows come rounded to fp16 (kernels.fp8.fp16_rows) the per-slot kernels take 29.7 us against the
# grouped 37.2 (2 rows choosing the same experts), and the FP8 token step 9.39 against 9.52 ms in one
# process (h200_session11.md). From 4 rows the grouped kernels won by far in session 10 (FP8 43.5 against
# 74.9 us, bf16-fed rows; not remeasured with fp16 rows); 3 rows (one prompt with text and image guidance) were not measured. H200 measurements only.
# MINGRT_MOE_GROUPED_MIN_ROWS overrides both (benchmarking the forms in whole steps), read at import.
GROUPED_MIN_ROWS_ENV = "MINGRT_MOE_GROUPED_MIN_ROWS"


def _grouped_min_rows(default: int) -> int:
    raw = os.environ.get(GROUPED_MIN_ROWS_ENV, "")
    if not raw:
        return default
    if not re.fullmatch(r"[0-9]+", raw) or int(raw) < 1:
        raise ValueError(f"{GROUPED_MIN_ROWS_ENV}={raw!r}: expected a row count >= 1")
    return int(raw)


GROUPED_MIN_ROWS = _grouped_min_rows(2)  # bf16 (and fp32) weights
GROUPED_MIN_ROWS_FP8 = _grouped_min_rows(3)


def grouped_min_rows(fp8: bool) -> int:
    """The row count from which moe_decode picks the grouped kernels for these weights."""
    return GROUPED_MIN_ROWS_FP8 if fp8 else GROUPED_MIN_ROWS


def grouped_by_default(rows: int, fp8: bool) -> bool:
    """Whether moe_decode runs the grouped kernels for `rows` rows when neither its caller nor its config chooses."""
    return grouped_min_rows(fp8) <= rows <= MAX_TICKET_ROWS and grouped_supported()


def moe_decode(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
               w_down: torch.Tensor, scales: tuple | None = None, *, act: torch.Tensor | None = None,
               out: torch.Tensor | None = None, config: dict | None = None, grouped: bool | None = None) -> torch.Tensor:
    """Weighted sum of each row's routed experts: x (T, H); ids (T, k) int; weights (T, k) fp32;
    w_gate/w_up (E, I, H), w_down (E, H, I) bf16 or fp8-e4m3; scales = (s_gate (E, I), s_up (E, I),
    s_down (E, H)) fp32 for fp8 weights. Returns out (T, H) fp32 (act: (T*k, I) scratch).
    grouped: one working program per chosen expert instead of one per routing slot (default: config "GROUPED", else from
    grouped_min_rows(FP8?) to MAX_TICKET_ROWS rows where grouped_supported(); each form has its own tuned tiles);
    both sum each row's experts in routing order.

    Preconditions the router guarantees and this does not check (it would need a host sync): each row's
    k ids are distinct and in [0, E). The activations, partials and tickets are one buffer per GPU
    (kernels._triton.scratch/tickets): calls must not run on two streams at once."""
    require()
    t, h = x.shape
    e, i, h2 = w_gate.shape
    k = ids.shape[1]
    if h2 != h or w_up.shape != w_gate.shape or w_down.shape != (e, h, i) or ids.shape != weights.shape or ids.shape[0] != t:
        raise ValueError(f"moe_decode shapes: x {tuple(x.shape)} ids {tuple(ids.shape)} w_gate {tuple(w_gate.shape)} "
                         f"w_down {tuple(w_down.shape)}")
    if x.stride(-1) != 1 or not (w_gate.is_contiguous() and w_up.is_contiguous() and w_down.is_contiguous()):
        raise ValueError("moe_decode needs row-contiguous x and contiguous stacked weights")
    ids, weights = ids.contiguous(), weights.contiguous()
    fp8 = w_gate.dtype == torch.float8_e4m3fn
    if act is None:  # the down GEMM's row operand: fp16 next to FP8 weights, else the rows' dtype
        act = scratch("moe_decode_act", x.device, t * k * i, torch.float16 if fp8 else x.dtype).view(t * k, i)
    out = torch.empty(t, h, dtype=torch.float32, device=x.device) if out is None else out
    has_scale = scales is not None
    sg, su, sd = scales if has_scale else (act, act, act)
    config = None if config is None else dict(config)
    tabled = config.pop("GROUPED", None) if config is not None else None  # a choice, not a launch argument
    grouped = tabled if grouped is None else grouped
    if grouped is None:
        grouped = grouped_by_default(t, fp8)
    elif grouped and (t > MAX_TICKET_ROWS or not grouped_supported()):
        raise ValueError(f"the grouped MoE kernels take <= {MAX_TICKET_ROWS} rows (got {t}) and need triton >= 3.5 "
                         "on a GPU (per-lane results of a vector atomic): pass grouped=False")
    up, down = split_config(config if config is not None else pick_config(h, i, fp8, grouped, k, rows=t))
    common = dict(UPCAST=interpreting(), WIDEN=fp8_widen(w_gate.dtype), **pdl_launch(x.device))
    split = down.pop("SPLIT_E")
    n_blocks = triton.cdiv(h, down["BLOCK_N"])
    if grouped:
        programs, slots = grouped_grid(t, k, e)
        _gate_up_grouped_kernel[(programs, triton.cdiv(i, up["BLOCK_N"]))](
            x, ids, w_gate, w_up, sg, su, act, t * k, h, i, x.stride(0), TOPK=k, HAS_SCALE=has_scale, **slots, **common, **up)
        _down_grouped_kernel[(programs, n_blocks)](
            act, ids, weights, w_down, sd, out, scratch("moe_decode_part", x.device, t * k * h), reserve_tickets(x.device, h, t),
            t * k, h, i, out.stride(0), TOPK=k, HAS_SCALE=has_scale, **slots, **common, **down)
        return out
    _gate_up_kernel[(t * k, triton.cdiv(i, up["BLOCK_N"]))](
        x, ids, w_gate, w_up, sg, su, act, h, i, x.stride(0), TOPK=k, HAS_SCALE=has_scale, **common, **up)
    if t > MAX_TICKET_ROWS:  # the split is for few rows; more than the reserved tickets need none
        split = 1
    if k % split:
        raise ValueError(f"DOWN_SPLIT={split} must divide top-k={k}")
    if split > 1:  # the shares' partials and the arrival tickets
        part, arrivals = scratch("moe_decode_part", x.device, t * split * h), reserve_tickets(x.device, h, t)
    else:  # unused: the output stands in for the pointers
        part = arrivals = out
    _down_kernel[(t, n_blocks, split)](
        act, ids, weights, w_down, sd, out, part, arrivals, h, i, out.stride(0), TOPK=k, HAS_SCALE=has_scale,
        SPLIT_E=split, **common, **down)
    return out


def grouped_grid(t: int, k: int, e: int) -> tuple[int, dict]:
    """The grouped kernels' programs along the grid's first axis and their slot constexprs for t rows of k slots over
    e experts: a program per expert, or per slot where there are fewer slots (at most one works per expert)."""
    by_slot = t * k < e
    return (t * k if by_slot else e), dict(BLOCK_S=next_pow2(max(t * k, 16)), BLOCK_M=max(16, next_pow2(t)), BY_SLOT=by_slot)


@functools.cache
def grouped_supported() -> bool:
    """The grouped down kernel reads the per-lane result of a vector atomic (its tickets). Before triton
    3.5 threads holding a replicated lane got 0 there (triton-lang/triton#7402, fixed by #7460), which would
    leave a row unwritten; the interpreter is exact."""
    if interpreting():
        return True
    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 5)


def reserve_scratch(device, h: int, i: int, topk: int, act_dtype: torch.dtype, rows: int = MAX_TICKET_ROWS) -> None:
    """The partials and `act_dtype` activations (fp16 next to FP8 weights, else the rows' dtype) of a
    `rows`-row call, and the tickets, before any CUDA graph capture (FusedMoEDecode does it): eager calls
    then allocate nothing but their output."""
    reserve_tickets(device, h, rows)
    scratch("moe_decode_part", device, rows * topk * h)
    scratch("moe_decode_act", device, rows * topk * i, act_dtype)


def split_config(config: dict) -> tuple[dict, dict]:
    """(gate_up, down) launch configs. The down kernel has only T x H/BLOCK_N programs (64 for 2 rows at
    BLOCK_N 64, half an H100), so it may take its own tile, DOWN_BLOCK_N / DOWN_BLOCK_K (default: the
    gate_up kernel's), and split each row's experts over DOWN_SPLIT programs (default 1; the down
    kernel's SPLIT_E)."""
    up = {key: v for key, v in config.items() if not key.startswith("DOWN_")}
    down = dict(up, BLOCK_N=config.get("DOWN_BLOCK_N", up["BLOCK_N"]), BLOCK_K=config.get("DOWN_BLOCK_K", up["BLOCK_K"]),
                SPLIT_E=config.get("DOWN_SPLIT", 1))
    return up, down


__all__ = ["GROUPED_DEFAULT", "GROUPED_MIN_ROWS", "GROUPED_MIN_ROWS_FP8", "candidate_configs", "down_candidates", "grouped_by_default",
           "grouped_grid", "grouped_min_rows", "grouped_supported", "moe_decode", "pick_config", "reserve_scratch", "reserve_tickets",
           "split_config"]
