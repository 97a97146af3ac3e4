"""Decode attention over a static KV cache: one query per row, grouped heads, a key mask, fixed order.

The LLM's decode step attends one new token per CFG row over a preallocated cache of S slots, 16
query heads sharing 4 KV heads (GQA); the semantic decoder's, 16 heads over its own cache. torch's
fused backends take no mask with grouped heads: the cuDNN backend, which would, did not repeat bit for
bit on an H200, and models.sdpa's way around it (KV heads repeated, then the memory-efficient kernel)
copies the cache per layer and pads the one query into a general kernel (~17 us a layer). This kernel
does it in one launch, reading each KV head once for its whole group of query heads:

  grid (B, kv heads, splits): each program runs an online softmax over its split's slots in slot
  order; with one split it normalises and writes the output, else it writes (max, sum, unnormalised
  output), and the last of the row's splits to arrive (an atomic ticket) merges them in split order.

A decode is latency-bound (a 2-row LLM step reads ~1.3 MB of cache per layer at 320 slots), so the cache is cut into
splits of SLOTS_PER_SPLIT slots for parallelism, and `last` (the query's own slot) stops every split
at the newest written slot: the causal mask hides the rest anyway, so the bits do not change.
Every sum runs in a fixed order: deterministic. Scores and the output accumulate in fp32; the
probabilities are rounded to the cache's dtype for the P @ V product, as torch's math backend and
FlashAttention do.
"""
from __future__ import annotations

import torch

from ._triton import interpreting, next_pow2, pdl_launch, require, scratch, tickets, tl, triton

SLOTS_PER_SPLIT = 64  # one BLOCK_S tile per program up to MAX_SPLITS tiles: a decode is latency-bound
MAX_SPLITS = 16
MAX_TICKETS = 64 * 64  # (row, KV head) pairs one call may bring: kernels.skinny.MAX_ROWS rows x 64 KV heads



def reserve_tickets(device) -> torch.Tensor:
    """The split merge's arrival tickets (kernels._triton.tickets); prepare_decode reserves them before any capture."""
    return tickets("decode_attention", device, MAX_TICKETS)

if triton is not None:
    from ._triton import arrive, mma, pdl_enter, rearm, store_cast

    @triton.jit
    def _store_output(o_ptrs, out, q_ptr, mask, ROWS_F16: tl.constexpr):
        """The output in q's dtype; ROWS_F16: then as an FP8 linear's rows (kernels.fp8.fp16_rows: fp16, clamped to
        its range), the same bits as that conversion of the q-dtype output, without its launch."""
        if ROWS_F16:
            store_cast(o_ptrs, out.to(q_ptr.dtype.element_ty).to(tl.float32), mask)
        else:
            tl.store(o_ptrs, out.to(o_ptrs.dtype.element_ty), mask=mask)

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, last_ptr, o_ptr, part_ptr, ticket_ptr, S, scale,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_mb,
        stride_ob, stride_oh,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
        HAS_LAST: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr, ROWS_F16: tl.constexpr = False,
        HAS_MASK: tl.constexpr = True,
    ):
        pdl_enter(PDL)
        b = tl.program_id(0)
        hk = tl.program_id(1)
        sp = tl.program_id(2)
        rg = tl.arange(0, BLOCK_G)  # the query heads of this KV head (GROUP of them, padded for the MMA)
        rd = tl.arange(0, D)
        g_ok = rg < GROUP
        heads = hk * GROUP + rg
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + rd[None, :], mask=g_ok[:, None], other=0.0)
        span = tl.cdiv(tl.cdiv(S, SPLITS), BLOCK_S) * BLOCK_S  # split bounds from S alone: a fixed order
        lo = sp * span
        hi = tl.minimum(lo + span, S)
        if HAS_LAST:  # slots after the query's own are hidden: skip them
            hi = tl.minimum(hi, tl.load(last_ptr).to(tl.int32) + 1)
        m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, D), tl.float32)
        k_base = k_ptr + b * stride_kb + hk * stride_kh
        v_base = v_ptr + b * stride_vb + hk * stride_vh
        for s0 in range(lo, hi, BLOCK_S):
            rs = s0 + tl.arange(0, BLOCK_S)
            s_ok = rs < hi
            if HAS_MASK:
                visible = (tl.load(mask_ptr + b * stride_mb + rs, mask=s_ok, other=0) != 0) & s_ok
            else:  # every slot up to the query's own (HAS_LAST bounds hi)
                visible = s_ok
            k = tl.load(k_base + rs[:, None] * stride_ks + rd[None, :], mask=s_ok[:, None], other=0.0)  # (BS, D)
            scores = mma(q, tl.trans(k), UPCAST) * scale  # (BG, BS) fp32
            scores = tl.where(visible[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all hidden so far: keep the sums at zero
            alpha = tl.exp(m_i - m_ref)
            p = tl.exp(scores - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + rs[:, None] * stride_vs + rd[None, :], mask=s_ok[:, None], other=0.0)  # (BS, D)
            acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST)
            m_i = m_new
        o_ptrs = o_ptr + b * stride_ob + heads[:, None] * stride_oh + rd[None, :]
        if SPLITS == 1:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row that sees no key gets zeros, not NaN
            _store_output(o_ptrs, out, q_ptr, g_ok[:, None], ROWS_F16)
        else:
            # partials (B, kv heads, SPLITS, BLOCK_G, D + 2) fp32: the output, then max and sum
            first = (b * tl.num_programs(1) + hk) * SPLITS * BLOCK_G
            row = first + sp * BLOCK_G + rg
            tl.store(part_ptr + row[:, None] * (D + 2) + rd[None, :], acc, mask=g_ok[:, None])
            tl.store(part_ptr + row * (D + 2) + D, m_i, mask=g_ok)
            tl.store(part_ptr + row * (D + 2) + D + 1, l_i, mask=g_ok)
            slot = ticket_ptr + b * tl.num_programs(1) + hk
            ticket = arrive(slot, None)
            if ticket == SPLITS - 1:  # the last split of this (row, KV head) merges all, in split order
                m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
                for j in range(SPLITS):
                    m = tl.maximum(m, tl.load(part_ptr + (first + j * BLOCK_G + rg) * (D + 2) + D, mask=g_ok,
                                              other=float("-inf"), cache_modifier=".cg"))
                m_ref = tl.where(m == float("-inf"), 0.0, m)
                l_sum = tl.zeros((BLOCK_G,), tl.float32)
                out = tl.zeros((BLOCK_G, D), tl.float32)
                for j in range(SPLITS):
                    r = first + j * BLOCK_G + rg
                    w = tl.exp(tl.load(part_ptr + r * (D + 2) + D, mask=g_ok, other=float("-inf"),
                                       cache_modifier=".cg") - m_ref)
                    l_sum += w * tl.load(part_ptr + r * (D + 2) + D + 1, mask=g_ok, other=0.0, cache_modifier=".cg")
                    out += w[:, None] * tl.load(part_ptr + r[:, None] * (D + 2) + rd[None, :], mask=g_ok[:, None],
                                                other=0.0, cache_modifier=".cg")
                _store_output(o_ptrs, out / tl.where(l_sum > 0, l_sum, 1.0)[:, None], q_ptr, g_ok[:, None], ROWS_F16)
                rearm(slot, None)


def decode_splits(slots: int) -> int:
    return max(1, min(MAX_SPLITS, -(-slots // SLOTS_PER_SPLIT)))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                     splits: int | None = None, last: torch.Tensor | None = None, fp16_rows: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale, hidden keys excluded) v for one query per row.

    q (B, H, 1, D); k, v (B, Hkv, S, D) of q's dtype, H a multiple of Hkv, contiguous D; mask bool over the
    S slots, one row per batch row or one for all ((B or 1, 1, 1, S) or (1, S)), True = visible (a row that sees no
    key gets zeros), or None: every slot up to `last`. Returns (B, H, 1, D) in q's dtype.
    splits: programs per KV head (default: one per SLOTS_PER_SPLIT slots, at most MAX_SPLITS);
    last: (1,) int tensor, the query's own cache slot: slots after it are skipped (the mask must hide them).
    fp16_rows: return the output as the rows an FP8 linear multiplies instead (fp16, kernels.fp8.fp16_rows of the
    q-dtype output, bit for bit), written by the kernel: the conversion's own launch is saved."""
    require()
    b, h, n, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if n != 1 or k.shape != (b, hkv, s, d) or v.shape != k.shape or h % hkv:
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need one "
                         "query per row and H a multiple of the KV heads")
    if d != next_pow2(d) or d < 16 or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"decode_attention: head size {d} must be a power of two >= 16 with contiguous elements")
    if mask is None and last is None:
        raise ValueError("decode_attention: without a mask the query's slot `last` must bound the keys")
    if mask is not None and (mask.dtype != torch.bool or mask.shape[-1] != s or mask.numel() not in (s, b * s)):
        raise ValueError(f"decode_attention: mask {(tuple(mask.shape), mask.dtype)}: need (B or 1, 1, 1, {s}) bool")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"decode_attention: q {q.dtype}, k {k.dtype}, v {v.dtype}: one dtype")
    if last is not None and (last.numel() != 1 or last.dtype.is_floating_point or last.device != q.device):
        raise ValueError(f"decode_attention: last must be one integer slot on {q.device}, got {tuple(last.shape)} "
                         f"{last.dtype} on {last.device}")
    if mask is not None:
        mask = mask.reshape(-1, s)
        mask = (mask if mask.stride(-1) == 1 else mask.contiguous()).expand(b, s)
        mask = mask.view(torch.uint8)
    group = h // hkv
    block_g = max(16, next_pow2(group))
    splits = decode_splits(s) if splits is None else int(splits)
    if splits < 1:
        raise ValueError(f"decode_attention: splits must be >= 1, got {splits}")
    out = torch.empty(b, h, 1, d, dtype=torch.float16 if fp16_rows else q.dtype, device=q.device)
    if splits > 1:  # the splits' partials, and the arrival tickets of the merge
        if b * hkv > MAX_TICKETS:
            raise ValueError(f"decode_attention: {b} rows x {hkv} KV heads > {MAX_TICKETS} with {splits} splits")
        part = scratch("decode_attention_part", q.device, b * hkv * splits * block_g * (d + 2))
        arrivals = reserve_tickets(q.device)
    else:  # unused: the output stands in for the pointers
        part = arrivals = out
    _decode_attention_kernel[(b, hkv, splits)](
        q, k, v, mask if mask is not None else out, last if last is not None else out, out, part, arrivals, s,
        float(scale), q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), mask.stride(0) if mask is not None else 0, out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=block_g, BLOCK_S=64, D=d, SPLITS=splits, HAS_LAST=last is not None,
        UPCAST=interpreting(), ROWS_F16=bool(fp16_rows), HAS_MASK=mask is not None,
        **pdl_launch(q.device, trigger_at_start=True))
    return out


__all__ = ["decode_attention", "decode_splits", "reserve_tickets"]
