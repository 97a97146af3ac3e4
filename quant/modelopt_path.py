"""The NVIDIA ModelOpt quantization path, used by export.build when `nvidia-modelopt` is installed.

Two routes (export/runner.py decides):
  * ModelOpt end to end (quantize + its ONNX export): INT8 of the pieces whose only dynamic axis is the
    batch (the pixel decoder);
  * ModelOpt's calibration into our Q/DQ pass (`calibrated_amax` -> quant/qdq.py): every other piece and
    FP8. ModelOpt writes FP8 as TensorRT-only custom ops that onnxruntime cannot run, and its export
    route (below) bakes the KV-cache pieces' sizes in; the ranges it calibrates carry over unchanged.

ModelOpt inserts fake-quant modules into the torch piece: only linear layers (the policy's kept layers
excepted), static per-tensor activation scales, "max" calibration on inputs the model itself produced.
Weights: per output channel for INT8; per tensor for FP8, because ModelOpt's ONNX export of E4M3
supports per-tensor scales only (our own pass, quant/qdq.py, does per-channel FP8).
Export goes through torch's TorchScript-based exporter, for which ModelOpt registers its Q/DQ
symbolics (torch's dynamo exporter has no translation for ModelOpt's fake-quant op).
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from .policy import LayerPolicy

logger = logging.getLogger(__name__)

INSTALL_HINT = "nvidia-modelopt is not installed: pip install 'mingrt[quant]'"
BITS = {"fp8": (4, 3), "int8": 8}


def modelopt_available() -> bool:
    try:
        return importlib.util.find_spec("modelopt") is not None
    except (ImportError, ValueError):
        return False


def _mtq():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return mtq


def quant_config(module: nn.Module, fmt: str, policy: LayerPolicy) -> dict:
    if fmt not in BITS:
        raise ValueError(f"unknown format {fmt!r}; choose {sorted(BITS)}")
    rules = [{"quantizer_name": "*", "enable": False},
             {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": BITS[fmt], "axis": 0 if fmt == "int8" else None}},
             {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": BITS[fmt], "axis": None}}]
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear) and policy.reason_to_keep(name) is not None:
            rules.append({"quantizer_name": f"{name}.*", "enable": False})
    for cls in ("nn.Conv1d", "nn.Conv2d", "nn.Conv3d", "nn.Embedding", "nn.LayerNorm"):  # linears only
        rules.append({"quantizer_name": "*", "parent_class": cls, "enable": False})
    return {"quant_cfg": rules, "algorithm": "max"}


def quantize_module(module: nn.Module, calib_calls: list[tuple], fmt: str, policy: LayerPolicy | None = None) -> nn.Module:
    """A quantized deep copy of `module` (its own float type: a bf16 LLM is not widened to 67 GB of fp32),
    calibrated by running it on every call."""
    mtq = _mtq()
    policy = policy or LayerPolicy()
    q = copy.deepcopy(module).eval()
    dtype = next(q.parameters()).dtype
    cfg = quant_config(q, fmt, policy)

    def forward_loop(m):
        with torch.no_grad():
            for call in calib_calls:
                m(*(t.to(dtype) if t.is_floating_point() else t for t in call))

    chatter = io.StringIO()  # ModelOpt prints its progress ("Inserted N quantizers"): keep the build's table clean
    with contextlib.redirect_stdout(chatter):
        q = mtq.quantize(q, cfg, forward_loop=forward_loop)
    if chatter.getvalue().strip():
        logger.debug("modelopt: %s", chatter.getvalue().strip())
    return q


def calibrated_amax(module: nn.Module, calib_calls: list[tuple], fmt: str, policy: LayerPolicy | None = None
                    ) -> dict[str, float]:
    """ModelOpt's calibration, for our own Q/DQ pass: {linear path: input amax} of every linear it
    quantizes (policy-kept layers have none, and need none). The pieces whose ONNX ModelOpt cannot write
    (FP8 anywhere, KV-cache pieces, the encoder) take this route: ModelOpt decides the ranges, quant/qdq.py
    writes standard QuantizeLinear/DequantizeLinear that onnxruntime and TensorRT both run."""
    q = quantize_module(module, calib_calls, fmt, policy)
    out = {}
    for name, sub in q.named_modules():
        iq = getattr(sub, "input_quantizer", None)
        if isinstance(sub, nn.Linear) and iq is not None and iq.is_enabled and getattr(iq, "amax", None) is not None:
            out[name] = float(iq.amax.float().max())
    return out


def layer_report(module: nn.Module, policy: LayerPolicy | None = None) -> list[dict]:
    policy = policy or LayerPolicy()
    out = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            reason = policy.reason_to_keep(name)
            wq = getattr(sub, "weight_quantizer", None)
            quantized = reason is None and wq is not None and getattr(wq, "is_enabled", False)
            out.append({"layer": name, "quantized": bool(quantized)} | ({"reason": reason} if reason else {}))
    return out


def export_onnx(quantized: nn.Module, spec, cfg, path: Path, sample: tuple, opset: int = 19) -> list[str]:
    """Export with explicit Q/DQ and the contract's names and dynamic axes; returns the written files."""
    _mtq()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(quantized, tuple(t.float() if t.is_floating_point() else t for t in sample), str(path),
                          input_names=spec.input_names, output_names=spec.output_names, opset_version=opset,
                          dynamic_axes=spec.dynamic_axes, dynamo=False)
    return [path.name]
