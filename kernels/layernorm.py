"""LayerNorm + adaLN modulation of a few rows, written in bf16 for the next GEMM: one program per row.

out[m] = (LN(x[m]) [* w + b]) * (1 + scale[m]) + shift[m], statistics in fp32 over the whole row
(two passes over registers: the row, up to 8192 values, is loaded once).
"""
from __future__ import annotations

import torch

from ._triton import next_pow2, pdl_launch, require, tl, triton

if triton is not None:
    from ._triton import pdl_enter, store_cast

if triton is not None:

    @triton.jit
    def _ln_modulate_kernel(x_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, out_ptr, K, stride_x, stride_mod, stride_out,
                            eps, AFFINE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_enter(PDL)
        m = tl.program_id(0)
        rk = tl.arange(0, BLOCK)
        ok = rk < K
        x = tl.load(x_ptr + m * stride_x + rk, mask=ok, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / K
        d = tl.where(ok, x - mean, 0.0)
        y = d / tl.sqrt(tl.sum(d * d, axis=0) / K + eps)
        if AFFINE:
            y = y * tl.load(w_ptr + rk, mask=ok, other=0.0).to(tl.float32) + tl.load(b_ptr + rk, mask=ok, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + m * stride_mod + rk, mask=ok, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + m * stride_mod + rk, mask=ok, other=0.0).to(tl.float32)
        store_cast(out_ptr + m * stride_out + rk, y * (1.0 + sc) + sh, ok)


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, *, weight=None,
                bias=None, eps: float = 1e-6) -> torch.Tensor:
    """x (M, K); shift/scale (M, K) views sharing a row stride; weight/bias (K,) or None; out (M, K)."""
    require()
    m, k = x.shape
    if shift.stride(0) != scale.stride(0) or shift.stride(-1) != 1 or scale.stride(-1) != 1 or x.stride(-1) != 1:
        raise ValueError("ln_modulate: shift and scale must share a row stride; all rows contiguous")
    if (weight is None) != (bias is None):
        raise ValueError("ln_modulate: give both LayerNorm weight and bias, or neither")
    affine = weight is not None
    _ln_modulate_kernel[(m,)](x, weight if affine else x, bias if affine else x, shift, scale, out, k, x.stride(0),
                              shift.stride(0), out.stride(0), eps, AFFINE=affine, BLOCK=next_pow2(k), num_warps=8,
                              **pdl_launch(x.device, trigger_at_start=True))
    return out


__all__ = ["ln_modulate"]
