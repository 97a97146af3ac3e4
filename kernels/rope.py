"""RoPE and the KV-cache write of a decode step in one launch, straight from the qkv projection.

Between the LLM's qkv GEMM and its decode attention the compiled step ran three Inductor kernels per
layer (query RoPE, key RoPE + cache write, value cache write: ~4 us together on an H200,
benchmarks/results/profile_step_h200_s15_start.md), each a launch of its own; the semantic decoder's step two
(its cache writes; it has no RoPE). Here one program per (row, head) does what
models.llm.Attention.forward_static (or models.vit_layers.SelfAttention.forward_static) does for one new token:

  qkv (B, (H + 2 Hkv) D), heads [q; k; v] head-major; cos/sin (B, 1, D) fp32 (rotate-half layout), or none
  q[b, h]               = rope(q head h)                     -> q_out (B, H, 1, D), qkv's dtype
  k_cache[b, j, pos]    = rope(k head j), rounded as apply_rope rounds it (qkv's dtype), then the cache's
  v_cache[b, j, pos]    = v head j in the cache's dtype

rope(x) = x * cos + rotate_half(x) * sin in fp32, as apply_rope (without cos/sin: x as it is); pos =
cache_position (one slot for every row).
"""
from __future__ import annotations

import torch

from ._triton import pdl_launch, require, tl, triton

if triton is not None:
    from ._triton import pdl_enter

    @triton.jit
    def _rope_kv_write_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, pos_ptr, stride_x, stride_cos,
                              stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                              H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, ROTATE: tl.constexpr,
                              PDL: tl.constexpr):
        pdl_enter(PDL)  # qkv comes from the previous kernel
        b = tl.program_id(0)
        h = tl.program_id(1)  # < H: a query head; else KV head h - H
        rd = tl.arange(0, D)
        half: tl.constexpr = D // 2
        row = qkv_ptr + b * stride_x + h * D
        if ROTATE:
            x = tl.load(row + rd).to(tl.float32)
            partner = tl.load(row + (rd + half) % D).to(tl.float32)
            rotated = tl.where(rd < half, -partner, partner)
            c = tl.load(cos_ptr + b * stride_cos + rd)
            s = tl.load(sin_ptr + b * stride_cos + rd)
            out = (x * c + rotated * s).to(q_ptr.dtype.element_ty)  # apply_rope's rounding to the projection's dtype
        else:
            out = tl.load(row + rd)
        if h < H:
            tl.store(q_ptr + (b * H + h) * D + rd, out)
        else:
            j = h - H
            pos = tl.load(pos_ptr)
            tl.store(k_ptr + b * stride_kb + j * stride_kh + pos * stride_ks + rd, out.to(k_ptr.dtype.element_ty))
            v = tl.load(row + HKV * D + rd)
            tl.store(v_ptr + b * stride_vb + j * stride_vh + pos * stride_vs + rd, v.to(v_ptr.dtype.element_ty))


def rope_kv_write(qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """qkv (B, 1, (H + 2 Hkv) D) or (B, (H + 2 Hkv) D); cos, sin (B, 1, D) fp32, one row per batch row (not
    broadcast), or both None (no RoPE); k_cache, v_cache (B, Hkv, S, D), written in place at slot cache_position (1,)
    -> q (B, H, 1, D) (module docstring)."""
    require()
    b, hkv, s, d = k_cache.shape
    n = qkv.shape[-1]
    qkv = qkv.reshape(b, n)
    h = n // d - 2 * hkv
    if (v_cache.shape != k_cache.shape or n % d or h < hkv or d % 2 or d & (d - 1) or qkv.stride(-1) != 1
            or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1):
        raise ValueError(f"rope_kv_write: qkv {tuple(qkv.shape)}, caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)}: "
                         "need one token per row, (H + 2 Hkv) heads of the caches' power-of-two size, contiguous heads")
    rotate = cos is not None or sin is not None
    if rotate and (cos is None or sin is None or cos.shape != sin.shape or cos.numel() != b * d
                   or cos.dtype != torch.float32 or sin.dtype != torch.float32):
        raise ValueError(f"rope_kv_write: cos {None if cos is None else (tuple(cos.shape), cos.dtype)}, sin "
                         f"{None if sin is None else (tuple(sin.shape), sin.dtype)}: need both (B, 1, {d}) fp32, or neither")
    if cache_position.numel() != 1 or cache_position.dtype.is_floating_point:
        raise ValueError(f"rope_kv_write: cache_position must be one integer slot, got {tuple(cache_position.shape)}")
    q = torch.empty(b, h, 1, d, dtype=qkv.dtype, device=qkv.device)
    if rotate:
        cos, sin = cos.reshape(b, d).contiguous(), sin.reshape(b, d).contiguous()
    else:  # unused: the output stands in for the pointers
        cos = sin = q.view(b, h * d)
    _rope_kv_write_kernel[(b, h + hkv)](qkv, cos, sin, q, k_cache, v_cache, cache_position, qkv.stride(0), cos.stride(0),
                                        *k_cache.stride()[:3], *v_cache.stride()[:3], H=h, HKV=hkv, D=d, ROTATE=rotate,
                                        **pdl_launch(qkv.device, trigger_at_start=True))
    return q


__all__ = ["rope_kv_write"]
