"""Attention through torch's fused kernels, restricted to the backends that repeat bit for bit.

On an H200 (torch 2.11, CUDA 13) the LLM's decode attention (GQA with a key mask) dispatches to the
cuDNN backend, whose output for identical inputs differed in 47 of 200 replays, and two text-to-image
loops on one seed parted after 40-80 image tokens because of it (benchmarks/results/
determinism_attention_h200.json). FlashAttention, the memory-efficient kernel and the math composite
compute each output in a fixed order; excluding cuDNN leaves torch's choice among those (for the LLM's
masked GQA: math; the GPU fast path installs kernels/attention.py for the one-token decode instead).
On the CPU nothing changes (its backends are flash and math).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REPEATABLE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, **kwargs) without the cuDNN backend."""
    with sdpa_kernel(REPEATABLE_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
