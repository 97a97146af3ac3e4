"""The decode kernels as PyTorch custom ops, so torch.compile treats them as opaque calls.

With these, Inductor can fuse everything around the kernels (norms, RoPE, routing, residual adds:
~60 small launches per LLM layer in eager) while our kernels run as they are. Each op has a fake
(meta) implementation that only computes the output's shape and dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

from .attention import decode_attention
from .moe import moe_decode
from .rope import rope_kv_write
from .routing import route_topk
from .skinny import SWIGLU, skinny_gemm

# Output dtypes of the skinny ops travel as names, not torch.dtype: AOTInductor's proxy executor in torch <= 2.11
# casts a serialized dtype argument's number straight to c10's enum, whose numbering differs (bfloat16 arrives as
# quint8; pytorch/pytorch#169157, fixed in #173562). A string reaches the op unchanged in every version.
OUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """The name the skinny ops take for an output dtype (one of OUT_DTYPES)."""
    name = str(dtype).removeprefix("torch.")
    if name not in OUT_DTYPES:
        raise ValueError(f"the skinny kernels write {sorted(OUT_DTYPES)}, not {dtype}")
    return name


def _out_dtype(name: str) -> torch.dtype:
    try:
        return OUT_DTYPES[name]
    except KeyError:
        raise ValueError(f"out_dtype must be one of {sorted(OUT_DTYPES)}, got {name!r}") from None


@torch.library.custom_op("mingrt::moe_decode", mutates_args=())
def moe_decode_op(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                  w_down: torch.Tensor, s_gate: Optional[torch.Tensor], s_up: Optional[torch.Tensor],
                  s_down: Optional[torch.Tensor]) -> torch.Tensor:
    scales = None if s_gate is None else (s_gate, s_up, s_down)
    return moe_decode(x, ids, weights, w_gate, w_up, w_down, scales)


@moe_decode_op.register_fake
def _moe_decode_fake(x, ids, weights, w_gate, w_up, w_down, s_gate, s_up, s_down):
    return x.new_empty(x.shape[0], x.shape[1], dtype=torch.float32)


@torch.library.custom_op("mingrt::skinny_linear", mutates_args=())
def skinny_linear_op(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     out_dtype: str) -> torch.Tensor:
    """y = x @ (weight * scale[:, None])^T + bias for x (rows, K), rows <= kernels.skinny.MAX_ROWS; out_dtype a
    name from OUT_DTYPES (dtype_name)."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=_out_dtype(out_dtype), device=x.device)
    return skinny_gemm(x.contiguous(), weight, out, w_scale=scale, bias=bias)


@skinny_linear_op.register_fake
def _skinny_linear_fake(x, weight, scale, bias, out_dtype):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=_out_dtype(out_dtype))


@torch.library.custom_op("mingrt::skinny_swiglu", mutates_args=())
def skinny_swiglu_op(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     out_dtype: str) -> torch.Tensor:
    """silu(y[:, :N]) * y[:, N:] for y = x @ (weight * scale[:, None])^T + bias, weight (2N, K) = [gate; up]."""
    out = torch.empty(x.shape[0], weight.shape[0] // 2, dtype=_out_dtype(out_dtype), device=x.device)
    return skinny_gemm(x.contiguous(), weight, out, w_scale=scale, bias=bias, epilogue=SWIGLU)


@skinny_swiglu_op.register_fake
def _skinny_swiglu_fake(x, weight, scale, bias, out_dtype):
    return x.new_empty(x.shape[0], weight.shape[0] // 2, dtype=_out_dtype(out_dtype))


@torch.library.custom_op("mingrt::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
                        last: Optional[torch.Tensor] = None, fp16_rows: bool = False) -> torch.Tensor:
    """One query per row over a static cache: q (B, H, 1, D), k/v (B, Hkv, S, D), mask (B or 1, 1, 1, S) bool or
    None (causal by `last` alone); last (1,): the query's cache slot (later slots, hidden by the mask, are skipped);
    fp16_rows: the output as an FP8 linear's rows (kernels.attention.decode_attention)."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # the kernel takes any other strides
    return decode_attention(q, k, v, mask, scale, last=last, fp16_rows=fp16_rows)


@decode_attention_op.register_fake
def _decode_attention_fake(q, k, v, mask, scale, last=None, fp16_rows=False):
    return q.new_empty(q.shape, dtype=torch.float16 if fp16_rows else q.dtype)


@torch.library.custom_op("mingrt::route_decode", mutates_args=())
def route_decode_op(logits: torch.Tensor, image_mask: Optional[torch.Tensor], top_k: int, renormalize: bool,
                    shared_first: int, shared_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode rows' MoE routing in one launch: logits (T, G, E) -> ids (T, k + S) int64, weights fp32
    (kernels.routing.route_topk)."""
    return route_topk(logits.contiguous(), image_mask, top_k, renormalize, shared_first, shared_slots)


@route_decode_op.register_fake
def _route_decode_fake(logits, image_mask, top_k, renormalize, shared_first, shared_slots):
    t = logits.shape[0]
    return (logits.new_empty(t, top_k + shared_slots, dtype=torch.int64),
            logits.new_empty(t, top_k + shared_slots, dtype=torch.float32))


@torch.library.custom_op("mingrt::rope_kv_write", mutates_args=("k_cache", "v_cache"))
def rope_kv_write_op(qkv: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], k_cache: torch.Tensor,
                     v_cache: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """One decode token's RoPE (none without cos/sin) and KV-cache write: qkv (B, 1, (H + 2 Hkv) D) -> q (B, H, 1, D);
    the new key and value written into the caches (B, Hkv, S, D) at cache_position (kernels.rope.rope_kv_write)."""
    return rope_kv_write(qkv.contiguous(), cos, sin, k_cache, v_cache, cache_position)


@rope_kv_write_op.register_fake
def _rope_kv_write_fake(qkv, cos, sin, k_cache, v_cache, cache_position):
    b, hkv, _, d = k_cache.shape
    return qkv.new_empty(b, qkv.shape[-1] // d - 2 * hkv, 1, d)


__all__ = ["OUT_DTYPES", "decode_attention_op", "dtype_name", "moe_decode_op", "rope_kv_write_op", "route_decode_op", "skinny_linear_op", "skinny_swiglu_op"]
