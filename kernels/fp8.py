"""Weight-only FP8 (E4M3) with one fp32 scale per output channel (per row of the last dimension).

W ~= Wq * scale[..., None], Wq = round(W / scale) in float8_e4m3fn, scale = amax(|row|) / 448 (the
largest finite E4M3 value), so each row uses the whole FP8 range. Rows of zeros get scale 1.
"""
from __future__ import annotations

import torch

E4M3_MAX = 448.0
FP8_MIN_CAPABILITY = (8, 9)  # E4M3 hardware: Ada, Hopper, Blackwell (one constant for the build, runtime, doctor)
WEIGHT_FORMATS = ("bf16", "fp8")  # what the decode kernels stream (runtime decode_weights, CLI --decode-weights)


def quantize_rows_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., K) -> (wq (..., K) float8_e4m3fn, scale (...) fp32)."""
    amax = w.detach().abs().amax(dim=-1).float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    wq = (w.detach().float() / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return wq.contiguous(), scale.contiguous()


def dequantize_rows_fp8(wq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return wq.float() * scale[..., None]


def gpu_supports_fp8(device=None) -> tuple[bool, str]:
    """FP8 weights need only a float8 -> bf16 conversion, but E4M3 hardware arrived with SM 8.9."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if (major, minor) < FP8_MIN_CAPABILITY:
        return False, f"{name} is SM {major}.{minor}; FP8 (E4M3) needs SM 8.9 or newer (Ada, Hopper, Blackwell)"
    return True, name


__all__ = ["E4M3_MAX", "FP8_MIN_CAPABILITY", "WEIGHT_FORMATS", "dequantize_rows_fp8", "gpu_supports_fp8", "quantize_rows_fp8"]
