"""Compare an exported piece with the eager reference, and the bounds a build must meet per precision.

Metrics per output tensor: max abs error, relative L2 (||got - ref|| / ||ref||), cosine similarity, and
PSNR for images in [-1, 1] (peak-to-peak 2). A piece passes when its worst output is within the bound.

Why these bounds (relative L2, worst output of a piece):
  * fp32 1e-4: the same math in another library; only summation order differs (measured ~1e-6 on tiny).
  * fp16 2e-2: a 10-bit mantissa rounds each op by up to 2^-11 ~ 5e-4; two dozen chained layers and
    the softmax/LayerNorm reductions grow that to a few 1e-3, so 2e-2 leaves 5-10x headroom.
  * bf16 6e-2: an 8-bit mantissa (2^-9 ~ 2e-3 per op), 8x coarser than fp16.
  * int8 1.5e-1 and fp8 2.5e-1: per-channel weights and one static scale per activation tensor; E4M3
    keeps 3 mantissa bits (relative step 2^-4 ~ 6%), int8 ~127 levels over the calibrated range. Errors
    of independent terms average out over the K-wide dot products (/sqrt(K)), but the flow head
    integrates its velocity over 16 steps, so the bound is loose on purpose. The image-level check
    (PSNR of a full text-to-image) is what users see and is reported next to it.
The LLM's logits are compared too; a precision that flips the greedy token is reported as such.
"""
from __future__ import annotations

import math

import torch

REL_L2_BOUND = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 6e-2, "int8": 1.5e-1, "fp8": 2.5e-1}
IMAGE_PSNR_FLOOR = {"fp32": 60.0, "fp16": 35.0, "bf16": 28.0, "int8": 30.0, "fp8": 25.0}  # dB, full tiny t2i


def metrics(got: torch.Tensor, ref: torch.Tensor, image: bool = False) -> dict[str, float]:
    g, r = got.detach().double().cpu().flatten(), ref.detach().double().cpu().flatten()
    if g.shape != r.shape:
        raise ValueError(f"shape mismatch {tuple(got.shape)} vs {tuple(ref.shape)}")
    if not (torch.isfinite(g).all() and torch.isfinite(r).all()):  # nothing to compare with, or nothing sane
        return {"max_abs": math.inf, "rel_l2": math.inf, "cosine": -1.0, **({"psnr": 0.0} if image else {})}
    diff = g - r
    ref_norm = r.norm().item()
    out = {
        "max_abs": diff.abs().max().item() if diff.numel() else 0.0,
        "rel_l2": diff.norm().item() / ref_norm if ref_norm > 0 else diff.norm().item(),
        "cosine": torch.nn.functional.cosine_similarity(g, r, dim=0).item() if ref_norm > 0 else 1.0,
    }
    if image:
        out["psnr"] = psnr(got, ref)
    return out


def psnr(got: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = (got.detach().double().cpu() - ref.detach().double().cpu()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def worst(per_output: dict[str, dict[str, float]]) -> dict[str, float]:
    """The worst value of each metric over a piece's outputs."""
    keys = {k for m in per_output.values() for k in m}
    out = {}
    for k in keys:
        vals = [m[k] for m in per_output.values() if k in m]
        out[k] = min(vals) if k in ("cosine", "psnr") else max(vals)
    return out


def within_bound(precision: str, rel_l2: float) -> bool:
    return rel_l2 <= REL_L2_BOUND[precision]
