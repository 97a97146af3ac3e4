"""The Q/DQ of quant/qdq.py emulated on the eager modules, in PyTorch (no export needed).

Same quantization, same numbers: every linear the policy quantizes and calibration measured gets its
weight rounded per output channel (scale = max |row| / qmax, float32) and its input rounded through one
static per-tensor scale (amax / qmax), with saturation and round-half-to-even as QuantizeLinear does.
A full-size piece can be studied layer by layer on a CPU in seconds this way; tests/test_quant_emulate.py
checks that it reproduces the exported graph run by onnxruntime.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from kernels.fp8 import quantize_channels

from .policy import LayerPolicy
from .qdq import FORMATS


def _round_activation(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """QuantizeLinear's rounding of a scaled activation (int8 saturates to -128, weights to -127)."""
    qmax = FORMATS[fmt]
    if fmt == "fp8":
        return x.clamp(-qmax, qmax).to(torch.float8_e4m3fn).float()
    return torch.round(x).clamp(-128, qmax)


def fake_quant_weight(w: torch.Tensor, fmt: str = "fp8") -> torch.Tensor:
    """Per-output-channel (row) quantize-dequantize of a (out, in) weight, as quant.qdq.quantize_weight."""
    q, scale = quantize_channels(w.detach().float(), 0, fmt)
    return (q.float() * scale.to(q.device)[:, None]).to(w.dtype)


def fake_quant_activation(x: torch.Tensor, amax: float, fmt: str = "fp8") -> torch.Tensor:
    scale = torch.tensor(max(float(amax), 1e-8) / FORMATS[fmt], dtype=torch.float32)
    return (_round_activation(x.float() / scale, fmt) * scale).to(x.dtype)


@contextmanager
def fake_quantized(module: nn.Module, act_amax: dict[str, float], fmt: str = "fp8", policy: LayerPolicy | None = None,
                   select: Callable[[str], bool] | None = None, weights: bool = True, activations: bool = True):
    """Inside the block, `module`'s quantizable linears compute as the Q/DQ graph would.

    act_amax: quant.calibrate.linear_input_amax(module, ...), keyed by paths relative to `module`.
    select: restrict to some linears (by path), e.g. to measure one layer type at a time.
    weights / activations: quantize only one side. The weights are restored on exit.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; choose {sorted(FORMATS)}")
    policy = policy or LayerPolicy()
    saved, hooks = {}, []
    try:
        for name, sub in module.named_modules():
            if not isinstance(sub, nn.Linear) or name not in act_amax or not policy.quantizable(name):
                continue
            if select is not None and not select(name):
                continue
            if weights:
                saved[name] = sub.weight.data
                sub.weight.data = fake_quant_weight(sub.weight.data, fmt)
            if activations:
                amax = act_amax[name]
                hooks.append(sub.register_forward_pre_hook(
                    lambda _, args, amax=amax: (fake_quant_activation(args[0], amax, fmt), *args[1:])))
        yield module
    finally:
        for h in hooks:
            h.remove()
        for name, w in saved.items():
            module.get_submodule(name).weight.data = w
