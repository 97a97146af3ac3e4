"""LayerNorm + adaLN modulation of a few rows, written in bf16 for the next GEMM: one program per row.

out[m] = (LN(x[m]) [* w + b]) * (1 + scale[m]) + shift[m], statistics in fp32 over the whole row
(two passes over registers: the row, up to 8192 values, is loaded once).

With `residual` the kernel first finishes the previous GEMM of the flow head's block (w3, launched with
kernels.skinny.skinny_partials): x[m] += gate[m] * (sum_s parts[s, m] * w_scale + bias), the splits summed
in order from zero, as the GEMM's own ticket merge does, and x is written back before its LayerNorm.

Every operand is loaded right after the PDL wait, before any arithmetic: one round of memory latency,
where loading the LayerNorm's weights and the modulation rows after the statistics took a second one
(H200, session 13, benchmarks/results/h200_session13.md: FP8 flow head 5.88 -> 5.50 ms; bf16 8.73, with w3
merging its own splits, -> 8.37). Loading the operands that no earlier launch of the head writes before the
wait instead measured no faster with FP8 (5.54 ms) and slower with bf16 (8.66).

Other launches measured no faster in the whole head (H200, session 14, flow_ablation_h200_s14_ln.json:
FP8 5.53 ms as launched): 4 or 16 warps a row (5.59 / 5.53) and the row statistics in one Welford reduction
instead of two dependent ones (5.57; 5.60-5.70 with 4 or 16 warps). Not kept.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._triton import next_pow2, pdl_launch, require, tl, triton

if triton is not None:
    from ._triton import pdl_enter, store_cast


class PendingResidual(NamedTuple):
    """A GEMM's unmerged split-K sums and what turns them into x += gate * (x_in @ W^T * scale + bias)."""

    parts: torch.Tensor  # (S_max, M, K) fp32, rows s < splits written
    splits: int
    gate: torch.Tensor  # (M, K), contiguous columns
    w_scale: torch.Tensor | None = None  # (K,) fp32 per output channel
    bias: torch.Tensor | None = None  # (K,)


if triton is not None:

    @triton.jit
    def _ln_modulate_kernel(x_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, out_ptr, part_ptr, gate_ptr, pscale_ptr,
                            pbias_ptr, K, stride_x, stride_mod, stride_out, stride_gate, eps,
                            AFFINE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr, SPLITS: tl.constexpr,
                            HAS_PSCALE: tl.constexpr, HAS_PBIAS: tl.constexpr):
        pdl_enter(PDL)
        m = tl.program_id(0)
        rk = tl.arange(0, BLOCK)
        ok = rk < K
        # every load first, arithmetic after (module docstring)
        lnw, lnb, sh, sc, g, ps, pb = _operands(w_ptr, b_ptr, shift_ptr, scale_ptr, gate_ptr, pscale_ptr, pbias_ptr, m,
                                                rk, ok, stride_mod, stride_gate, AFFINE, SPLITS, HAS_PSCALE, HAS_PBIAS)
        x = tl.load(x_ptr + m * stride_x + rk, mask=ok, other=0.0).to(tl.float32)
        if SPLITS > 0:  # finish the previous GEMM: x += gate * (sum of its splits * scale + bias), in place
            rows = tl.num_programs(0)
            acc = tl.zeros((BLOCK,), tl.float32)
            for s in tl.static_range(SPLITS):  # fixed order: deterministic
                acc += tl.load(part_ptr + (s * rows + m) * K + rk, mask=ok, other=0.0)
            if HAS_PSCALE:
                acc = acc * ps
            if HAS_PBIAS:
                acc = acc + pb
            x = x + g * acc
            tl.store(x_ptr + m * stride_x + rk, x, mask=ok)
        mean = tl.sum(x, axis=0) / K
        d = tl.where(ok, x - mean, 0.0)
        y = d / tl.sqrt(tl.sum(d * d, axis=0) / K + eps)
        if AFFINE:
            y = y * lnw + lnb
        store_cast(out_ptr + m * stride_out + rk, y * (1.0 + sc) + sh, ok)

    @triton.jit
    def _operands(w_ptr, b_ptr, shift_ptr, scale_ptr, gate_ptr, pscale_ptr, pbias_ptr, m, rk, ok, stride_mod,
                  stride_gate, AFFINE: tl.constexpr, SPLITS: tl.constexpr, HAS_PSCALE: tl.constexpr,
                  HAS_PBIAS: tl.constexpr):
        """The row's fp32 operands besides x and the partials (zeros where a flag leaves one out)."""
        zero = tl.zeros(rk.shape, tl.float32)
        lnw, lnb, g, ps, pb = zero, zero, zero, zero, zero
        if AFFINE:
            lnw = tl.load(w_ptr + rk, mask=ok, other=0.0).to(tl.float32)
            lnb = tl.load(b_ptr + rk, mask=ok, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + m * stride_mod + rk, mask=ok, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + m * stride_mod + rk, mask=ok, other=0.0).to(tl.float32)
        if SPLITS > 0:
            g = tl.load(gate_ptr + m * stride_gate + rk, mask=ok, other=0.0).to(tl.float32)
            if HAS_PSCALE:
                ps = tl.load(pscale_ptr + rk, mask=ok, other=0.0)
            if HAS_PBIAS:
                pb = tl.load(pbias_ptr + rk, mask=ok, other=0.0).to(tl.float32)
        return lnw, lnb, sh, sc, g, ps, pb


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, *, weight=None,
                bias=None, eps: float = 1e-6, residual: PendingResidual | None = None) -> torch.Tensor:
    """x (M, K); shift/scale (M, K) views sharing a row stride; weight/bias (K,) or None; out (M, K).
    residual: first x += the pending GEMM's gated output, in place (x must then be fp32)."""
    require()
    m, k = x.shape
    if shift.stride(0) != scale.stride(0) or shift.stride(-1) != 1 or scale.stride(-1) != 1 or x.stride(-1) != 1:
        raise ValueError("ln_modulate: shift and scale must share a row stride; all rows contiguous")
    if (weight is None) != (bias is None):
        raise ValueError("ln_modulate: give both LayerNorm weight and bias, or neither")
    r = residual
    if r is not None:
        if (x.dtype != torch.float32 or r.parts.dtype != torch.float32 or not r.parts.is_contiguous()
                or r.parts.shape[1:] != (m, k) or not 0 < r.splits <= r.parts.shape[0]
                or r.gate.shape != (m, k) or r.gate.stride(-1) != 1):
            raise ValueError(f"ln_modulate: the pending residual needs fp32 x (M, K) = {(m, k)}, contiguous fp32 partials "
                             f"(S, M, K) with 1..S splits and a gate (M, K); got x {x.dtype}, partials "
                             f"{r.parts.dtype} {tuple(r.parts.shape)}, {r.splits} splits, gate {tuple(r.gate.shape)}")
    affine = weight is not None
    _ln_modulate_kernel[(m,)](x, weight if affine else x, bias if affine else x, shift, scale, out,
                              r.parts if r else x, r.gate if r else x,
                              r.w_scale if r is not None and r.w_scale is not None else x,
                              r.bias if r is not None and r.bias is not None else x,
                              k, x.stride(0), shift.stride(0), out.stride(0), r.gate.stride(0) if r else 0, eps,
                              AFFINE=affine, BLOCK=next_pow2(k), num_warps=8, SPLITS=r.splits if r else 0,
                              HAS_PSCALE=r is not None and r.w_scale is not None,
                              HAS_PBIAS=r is not None and r.bias is not None,
                              **pdl_launch(x.device, trigger_at_start=True))
    return out


__all__ = ["PendingResidual", "ln_modulate"]
