"""Classifier-free guidance and the Euler update in one launch: x[b] += dt_k * guide(v[b, :R]).

The same one formula as models.flow_head.guide (R = 1, 2 or 3 rows per prompt, optional 'channel'
renorm). The guidance scales and dt are read from device tensors, so no host value enters a graph.
"""
from __future__ import annotations

import torch

from ._triton import next_pow2, pdl_launch, require, tl, triton

if triton is not None:
    from ._triton import pdl_enter


    @triton.jit
    def _guide_euler_kernel(v_ptr, x_ptr, dts_ptr, step, text_cfg_ptr, image_cfg_ptr, C,
                            R: tl.constexpr, U_ROW: tl.constexpr, TU_ROW: tl.constexpr, RENORM: tl.constexpr, BLOCK_C: tl.constexpr,
                            PDL: tl.constexpr):
        pdl_enter(PDL)
        b = tl.program_id(0)
        rc = tl.arange(0, BLOCK_C)
        ok = rc < C
        row = v_ptr + b * R * C
        v_c = tl.load(row + rc, mask=ok, other=0.0).to(tl.float32)
        v_u = tl.load(row + U_ROW * C + rc, mask=ok, other=0.0).to(tl.float32)
        v_tu = tl.load(row + TU_ROW * C + rc, mask=ok, other=0.0).to(tl.float32)
        tc = tl.load(text_cfg_ptr).to(tl.float32)
        ic = tl.load(image_cfg_ptr).to(tl.float32)
        out = v_u + ic * (v_tu - v_u) + tc * (v_c - v_tu)
        if RENORM:
            n_c = tl.sqrt(tl.sum(v_c * v_c, axis=0))
            n_o = tl.sqrt(tl.sum(out * out, axis=0))
            out = out * tl.minimum(tl.maximum(n_c / n_o + 1e-8, 0.0), 1.0)
        dt = tl.load(dts_ptr + step)
        xp = x_ptr + b * C + rc
        tl.store(xp, tl.load(xp, mask=ok, other=0.0) + out * dt, mask=ok)


def guide_euler_(x: torch.Tensor, v: torch.Tensor, dts: torch.Tensor, step: int, text_cfg: torch.Tensor,
                 image_cfg: torch.Tensor, renorm: bool) -> torch.Tensor:
    """x (B, C) fp32 updated in place; v (B*R, C) velocities of the rows, prompt-major; dts (S,) fp32."""
    require()
    b, c = x.shape
    r = v.shape[0] // b
    if not 1 <= r <= 3 or r * b != v.shape[0] or x.dtype != torch.float32 or not (x.is_contiguous() and v.is_contiguous()):
        raise ValueError(f"guide_euler_: x {tuple(x.shape)} {x.dtype}, v {tuple(v.shape)}: need (B, C) fp32 and (B*R, C), R in 1..3")
    _guide_euler_kernel[(b,)](v, x, dts, step, text_cfg, image_cfg, c, R=r, U_ROW=min(1, r - 1), TU_ROW=min(2, r - 1), RENORM=bool(renorm),
                              BLOCK_C=max(16, next_pow2(c)), **pdl_launch(x.device, trigger_at_start=True))
    return x


__all__ = ["guide_euler_"]
