"""Transformer layers shared by the three MingTok networks (pre-norm ViT blocks, no LayerScale).

Parameter names follow the released checkpoints (`attn.qkv`, `attn.proj`, `mlp.w12`/`mlp.w3` or
`mlp.fc1`/`mlp.fc2`, `norm1`, `norm2`), so a state dict loads without renaming.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import swiglu_hidden
from .sdpa import attention


class SwiGLUFFN(nn.Module):
    """w3(silu(a) * b) with [a | b] = w12(x): the first half of the fused projection is the gate."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = swiglu_hidden(dim, mlp_ratio)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class GeluMLP(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


def causal_mask(query_slots: torch.Tensor, kv_len: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Boolean (N, S) mask: key slot j is visible to a query stored at slot q iff j <= q."""
    keys = torch.arange(kv_len, device=device)
    return keys[None, :] <= query_slots[:, None]


class SelfAttention(nn.Module):
    """Multi-head attention with a fused qkv projection laid out [q; k; v], each head-major.

    Three call forms share one set of weights:
      * `forward(x)`: full bidirectional attention (encoder, pixel decoder);
      * `forward(x, causal=True)`: full causal pass (semantic decoder, understanding);
      * `forward_cached(x, past_k, past_v)`: causal attention over a cache, ONNX style: returns the
        concatenated (present) keys and values;
      * `forward_static(x, k_cache, v_cache, cache_position, fused)`: writes into preallocated buffers in
        place (CUDA-graph style) and attends over every slot up to each query's own; with fused=True a
        one-token step goes through the decode-attention kernel prepare_decode installed, if any (and through
        its `fused_kv_write` kernel for the cache writes, if installed).
    Keys are cached unscaled, as upstream does.
    """

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor):
        b, n, c = x.shape
        # (B, N, 3C) -> 3 x (B, H, N, d)
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def _attend(self, q, k, v, mask=None, is_causal=False, **decode) -> torch.Tensor:
        b, h, n, d = q.shape
        out = attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=d ** -0.5, **decode)
        return self.proj(out.transpose(1, 2).reshape(b, n, h * d))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        q, k, v = self._split(x)
        return self._attend(q, k, v, is_causal=causal)

    def forward_cached(self, x, past_k, past_v):
        q, k, v = self._split(x)
        k = torch.cat([past_k, k], dim=2)  # (B, H, P+N, d)
        v = torch.cat([past_v, v], dim=2)
        past = past_k.shape[2]
        n = x.shape[1]
        slots = torch.arange(n, device=x.device) + past
        mask = causal_mask(slots, past + n, x.device)
        return self._attend(q, k, v, mask=mask), k, v

    def forward_static(self, x, k_cache, v_cache, cache_position, fused: bool = False):
        decode = getattr(self, "fused_decode_attention", None) if fused else None
        kv_write = getattr(self, "fused_kv_write", None) if decode is not None and x.shape[1] == 1 else None
        if kv_write is not None:  # (qkv, cos, sin, k_cache, v_cache, cache_position) -> q: the cache writes in one kernel
            q = kv_write(self.qkv(x), None, None, k_cache, v_cache, cache_position)
            # causal by the query's own slot alone, which bounds the kernel's keys: no mask to build
            return self._attend(q, k_cache.to(q.dtype), v_cache.to(q.dtype), cache_position=cache_position,
                                decode_kernel=decode)
        q, k, v = self._split(x)
        k_cache.index_copy_(2, cache_position, k.to(k_cache.dtype))
        v_cache.index_copy_(2, cache_position, v.to(v_cache.dtype))
        mask = causal_mask(cache_position, k_cache.shape[2], x.device)  # (L, S)
        # fused: one-query steps on the installed kernel (torch's backends pad them into a general kernel,
        # ~17 us a layer on an H200)
        return self._attend(q, k_cache.to(q.dtype), v_cache.to(q.dtype), mask=mask, cache_position=cache_position,
                            decode_kernel=decode)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, head_dim: int, mlp_ratio: float, ffn: str, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SwiGLUFFN(dim, mlp_ratio) if ffn == "swiglu" else GeluMLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), causal=causal)
        return x + self.mlp(self.norm2(x))

    def forward_cached(self, x, past_k, past_v):
        h, k, v = self.attn.forward_cached(self.norm1(x), past_k, past_v)
        x = x + h
        return x + self.mlp(self.norm2(x)), k, v

    def forward_static(self, x, k_cache, v_cache, cache_position, fused: bool = False):
        x = x + self.attn.forward_static(self.norm1(x), k_cache, v_cache, cache_position, fused)
        return x + self.mlp(self.norm2(x))
