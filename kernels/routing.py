"""MoE routing of the decode rows in one launch: router logits -> the fused MoE kernel's slots.

What the compiled LLM step ran between the routers' GEMM and the MoE kernel (per layer, FP8 weights,
H200, benchmarks/results/profile_step_h200_s15_start.md): a softmax + stable sort (4.7 us), the router choice by
image mask and the shared-expert slots appended (two to three more kernels of 1-3 us). This kernel does all
of it in one launch, one program per row:

  logits (T, G, E), G routers stacked (G = 2: [text; image], the row's image mask picks; G = 1: one)
  p      = softmax(logits[t, g]) in fp32
  slots  = the top k experts by p, highest first, ties to the lower id (as models.llm.Router.select's
           stable sort), weights renormalised to sum 1 when the model does, then S shared-expert slots
           with ids shared_first + s and weight 1 (the FP8 MoE kernel runs the shared experts as slots)
  -> ids (T, k + S) int64, weights (T, k + S) fp32

The same choices as the reference wherever the probabilities compare the same; the weights are the same
fp32 formulas summed in another order (last-bit differences). Without a kernel (the CPU without Triton's
interpreter) MoE.route keeps its PyTorch ops: prepare_decode installs this only where it runs.
"""
from __future__ import annotations

import torch

from ._triton import next_pow2, pdl_launch, require, tl, triton

if triton is not None:
    from ._triton import pdl_enter

    @triton.jit
    def _route_kernel(logits_ptr, mask_ptr, ids_ptr, w_ptr, E, stride_t, stride_g, shared_first,
                      TOPK: tl.constexpr, SHARED: tl.constexpr, HAS_MASK: tl.constexpr, RENORM: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
        pdl_enter(PDL)  # the logits come from the previous kernel
        t = tl.program_id(0)
        g = 0
        if HAS_MASK:
            g = tl.load(mask_ptr + t).to(tl.int32)  # 1: an image row, the second router's logits
        re = tl.arange(0, BLOCK_E)
        ok = re < E
        lg = tl.load(logits_ptr + t * stride_t + g * stride_g + re, mask=ok, other=float("-inf")).to(tl.float32)
        p = tl.exp(lg - tl.max(lg, axis=0))
        p = p / tl.sum(p, axis=0)
        p = tl.where(ok, p, -1.0)  # probabilities are >= 0: -1 is never chosen
        rs = tl.arange(0, BLOCK_S)
        ids = tl.zeros((BLOCK_S,), tl.int64)
        w = tl.zeros((BLOCK_S,), tl.float32)
        for j in tl.static_range(TOPK):  # highest first; tl.argmax takes the lowest index among equals
            best = tl.argmax(p, axis=0, tie_break_left=True)
            ids = tl.where(rs == j, best.to(tl.int64), ids)
            w = tl.where(rs == j, tl.max(p, axis=0), w)
            p = tl.where(re == best, -1.0, p)
        if RENORM:
            w = w / tl.sum(w, axis=0)  # slots past k hold 0
        shared = (rs >= TOPK) & (rs < TOPK + SHARED)
        ids = tl.where(shared, (shared_first + rs - TOPK).to(tl.int64), ids)
        w = tl.where(shared, 1.0, w)
        out = rs < TOPK + SHARED
        tl.store(ids_ptr + t * (TOPK + SHARED) + rs, ids, mask=out)
        tl.store(w_ptr + t * (TOPK + SHARED) + rs, w, mask=out)


def route_topk(logits: torch.Tensor, image_mask: torch.Tensor | None, top_k: int, renormalize: bool,
               shared_first: int = 0, shared_slots: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (T, G, E) with G in (1, 2), or (T, E); image_mask (T,) or (T, 1) bool (needed when G = 2: True
    takes the second router) -> ids (T, top_k + shared_slots) int64, weights (T, top_k + shared_slots) fp32
    (module docstring)."""
    require()
    if logits.dim() == 2:
        logits = logits[:, None]
    t, groups, e = logits.shape
    if groups not in (1, 2) or not 1 <= top_k <= e or shared_slots < 0 or logits.stride(-1) != 1:
        raise ValueError(f"route_topk: logits {tuple(logits.shape)} (need (T, 1 or 2, E), contiguous E), top_k {top_k}, "
                         f"shared_slots {shared_slots}")
    if groups == 2 and image_mask is None:
        raise ValueError("route_topk: two routers' logits need the image mask that picks one per row")
    if image_mask is not None and image_mask.numel() != t:
        raise ValueError(f"route_topk: image mask of {image_mask.numel()} rows for {t} rows of logits")
    slots = top_k + shared_slots
    ids = torch.empty(t, slots, dtype=torch.int64, device=logits.device)
    w = torch.empty(t, slots, dtype=torch.float32, device=logits.device)
    has_mask = groups == 2
    mask = image_mask.reshape(t).contiguous() if has_mask else ids  # bool, read as is (a cast would be one more launch)
    if has_mask and mask.dtype != torch.bool:
        raise ValueError(f"route_topk: image mask must be bool, got {mask.dtype}")
    _route_kernel[(t,)](logits, mask, ids, w, e, logits.stride(0), logits.stride(1), shared_first,
                        TOPK=top_k, SHARED=shared_slots, HAS_MASK=has_mask, RENORM=bool(renormalize),
                        BLOCK_E=max(16, next_pow2(e)), BLOCK_S=max(16, next_pow2(slots)),
                        **pdl_launch(logits.device, trigger_at_start=True))
    return ids, w


__all__ = ["route_topk"]
