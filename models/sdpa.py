"""Attention through torch's fused kernels, restricted to the backends that repeat bit for bit.

On an H200 (torch 2.11, CUDA 13) the LLM's decode attention (GQA with a key mask) dispatches to the
cuDNN backend, whose output for identical inputs differed in 47 of 200 replays, and two text-to-image
loops on one seed parted after 40-80 image tokens because of it (benchmarks/results/
determinism_attention_h200.json). FlashAttention, the memory-efficient kernel and the math composite
compute each output in a fixed order; excluding cuDNN leaves torch's choice among those. None of the
fused two takes grouped heads with a mask, so on a GPU those calls (the LLM's) get their KV heads
repeated first and go to the memory-efficient kernel, not to the math composite with its (L, S) fp32
score matrix; the GPU fast path's one-token decode uses kernels/attention.py instead. On the CPU nothing
changes (its backends are flash and math).

MingTok's full-sequence passes on a GPU (no mask: the encoder's and pixel decoder's bidirectional
attention, the semantic decoder's is_causal pass) put cuDNN first: on those shapes, with contiguous
inputs, it repeated in every one of 500 calls and is the fastest backend (H200: pixel decoder 14.6 us
a layer against flash's 21.7, the causal 257-token pass 8.6 against 12.5;
benchmarks/results/attention_backends_h200_s8.json).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REPEATABLE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
MASKLESS_BACKENDS = [SDPBackend.CUDNN_ATTENTION, *REPEATABLE_BACKENDS]  # in this order of preference


def backends_for(q: torch.Tensor, attn_mask) -> list:
    """The SDPA backends a call may use: cuDNN (first) only for unmasked several-query calls on a GPU."""
    return MASKLESS_BACKENDS if q.is_cuda and attn_mask is None and q.shape[-2] > 1 else REPEATABLE_BACKENDS


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, decode_kernel=None, cache_position=None,
              **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, **kwargs) on the backends that repeat (backends_for).

    decode_kernel (q, k, v, mask, scale, cache_position), the fast path's one-query kernel installed by
    runtime.fast.decode_weights.prepare_decode, takes the one-query calls instead (attn_mask: a boolean
    mask of the cache's slots; cache_position: the query's slot, so later slots are skipped)."""
    if decode_kernel is not None and q.shape[2] == 1:
        return decode_kernel(q, k, v, kwargs["attn_mask"], kwargs["scale"], cache_position)
    if (q.is_cuda and kwargs.get("enable_gqa") and kwargs.get("attn_mask") is not None and q.dim() == k.dim() == 4
            and k.shape[1] != q.shape[1] and q.shape[1] % k.shape[1] == 0):
        rep = q.shape[1] // k.shape[1]  # (B, Hkv, S, D) -> (B, H, S, D), head h reading KV head h // rep
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        kwargs = dict(kwargs, enable_gqa=False)
    backends = backends_for(q, kwargs.get("attn_mask"))
    with sdpa_kernel(backends, set_priority=backends is MASKLESS_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
