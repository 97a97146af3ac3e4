"""Weight-only FP8 (E4M3) with one fp32 scale per output channel (per row of the last dimension).

W ~= Wq * scale[..., None], Wq = round(W / scale) in float8_e4m3fn, scale = amax(|row|) / 448 (the
largest finite E4M3 value), so each row uses the whole FP8 range. Rows of zeros get scale 1.
"""
from __future__ import annotations

import torch

from ._triton import interpreting

E4M3_MAX = 448.0
F16_MAX = torch.finfo(torch.float16).max  # 65504
FP8_MIN_CAPABILITY = (8, 9)  # E4M3 hardware: Ada, Hopper, Blackwell (one constant for the build, runtime, doctor)
WEIGHT_FORMATS = ("bf16", "fp8")  # what the decode kernels stream (runtime decode_weights, CLI --decode-weights)


QMAX = {"fp8": E4M3_MAX, "int8": 127.0}  # largest magnitude each format stores


def quantize_channels(t: torch.Tensor, axis: int, fmt: str = "fp8") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel quantization of an fp32 tensor along `axis`: (q int8 or float8_e4m3fn on t's
    device, fp32 scale on the CPU) with t ~= q * scale. The one rounding of the decode weights, the ONNX
    Q/DQ export (quant/qdq.py) and its emulation (quant/emulate.py)."""
    qmax = QMAX[fmt]
    shape = [1] * t.ndim
    shape[axis] = -1
    # the per-channel scales on the CPU: CUDA divides a tensor by a Python number as a multiplication by
    # its reciprocal, 1 ulp off numpy's division (the ONNX export's reference) for most channels
    amax = t.abs().amax(dim=[i for i in range(t.ndim) if i != axis]).cpu()
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    scaled = t / scale.to(t.device).view(shape)  # tensor / tensor: IEEE division on either device
    if fmt == "int8":
        return scaled.round_().clamp_(-127, 127).to(torch.int8), scale
    return scaled.clamp_(-qmax, qmax).to(torch.float8_e4m3fn), scale


def quantize_rows_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., K) -> (wq (..., K) float8_e4m3fn, scale (...) fp32), both on w's device."""
    q, scale = quantize_channels(w.detach().float().reshape(-1, w.shape[-1]), 0, "fp8")
    return q.view(w.shape), scale.to(w.device).view(w.shape[:-1])


def dequantize_rows_fp8(wq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return wq.float() * scale[..., None]


def fp16_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows an FP8 decode kernel multiplies, rounded to fp16 as the kernel would round them (through fp32,
    clamped to fp16's range: kernels._triton.mma), so the results keep their bits. Done before the launch it is
    one small pass (inside a compiled step Inductor fuses it into whatever made x) instead of once per program
    in every GEMM's main loop: at 2 rows that cost the LLM's FP8 linears 0.7-2.1 us each and at the flow head's
    32 adaLN rows 27 against 14.7 us (H200, benchmarks/results/h200_session11.md). Triton's interpreter
    multiplies fp32 and gets x as it is. NaN is the one exception to "the same bits": the kernel's min/max
    turn it into -65504, torch.clamp keeps it (a NaN row is a bug upstream either way)."""
    if x.dtype == torch.float16 or interpreting():
        return x
    return x.float().clamp(-F16_MAX, F16_MAX).to(torch.float16)


def gpu_supports_fp8(device=None) -> tuple[bool, str]:
    """FP8 weights need only a float8 -> bf16 conversion, but E4M3 hardware arrived with SM 8.9."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if (major, minor) < FP8_MIN_CAPABILITY:
        return False, f"{name} is SM {major}.{minor}; FP8 (E4M3) needs SM 8.9 or newer (Ada, Hopper, Blackwell)"
    return True, name


__all__ = ["E4M3_MAX", "F16_MAX", "FP8_MIN_CAPABILITY", "QMAX", "WEIGHT_FORMATS", "dequantize_rows_fp8", "fp16_rows",
           "gpu_supports_fp8", "quantize_channels", "quantize_rows_fp8"]
