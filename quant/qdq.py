"""Our own explicit Q/DQ insertion into an exported ONNX graph (FP8 E4M3 or INT8, symmetric).

For each linear the policy allows (a MatMul or Gemm whose weight is an initializer and whose node the
exporter tagged as an nn.Linear):
  * the weight is stored quantized with one scale per output channel and dequantized in the graph:
    W_q --DequantizeLinear(axis=out)--> W;
  * the activation gets one static scale from calibration: X --Q--> --DQ--> X'.
This is the form strongly typed TensorRT turns into low-precision GEMMs, and onnxruntime runs on the CPU.
"""
from __future__ import annotations

import ast
import logging
from dataclasses import dataclass

import numpy as np

from kernels.fp8 import QMAX, quantize_channels

from .policy import LayerPolicy

logger = logging.getLogger(__name__)

FORMATS = QMAX  # largest representable magnitude per format (E4M3FN max is 448)


@dataclass
class LinearSite:
    node_index: int
    module: str  # e.g. "vision.pixel_decoder.blocks.0.mlp.fc1"
    activation: str  # graph tensor name of the input
    weight: str  # initializer name
    axis: int  # output-channel axis of the stored weight


def _meta(node, key: str):
    for p in node.metadata_props:
        if p.key == key:
            return p.value
    return None


def linear_sites(model) -> list[LinearSite]:
    """Every MatMul/Gemm that implements an nn.Linear with an initializer weight."""
    inits = {i.name: i for i in model.graph.initializer}
    sites = []
    for idx, node in enumerate(model.graph.node):
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        hierarchy = _meta(node, "pkg.torch.onnx.class_hierarchy")
        scopes = _meta(node, "pkg.torch.onnx.name_scopes")
        if not hierarchy or not scopes:
            continue
        classes, names = ast.literal_eval(hierarchy), ast.literal_eval(scopes)
        if len(classes) < 2 or not classes[-2].endswith("nn.modules.linear.Linear"):
            continue
        if len(inits[node.input[1]].dims) != 2:
            continue
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        axis = 0 if (node.op_type == "Gemm" and trans_b) else 1
        sites.append(LinearSite(idx, names[-2], node.input[0], node.input[1], axis))
    return sites


def quantize_weight(w: np.ndarray, axis: int, fmt: str, device=None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel quantization: returns (q, scale) with w ~= q * scale along `axis`."""
    q, scale, _ = _quantize(w, axis, fmt, device)
    return q, scale


def _quantize(w, axis: int, fmt: str, device=None) -> tuple[np.ndarray, np.ndarray, float]:
    """(q, fp32 scale, relative L2 error of q * scale) for a numpy array or torch tensor `w`.

    Computed in torch (all CPU threads, or `device`): the full LLM's 16.8 B weights took minutes in
    single-threaded numpy. The arithmetic is numpy's: fp32 scale amax / qmax (1 for all-zero channels),
    fp32 division, round-half-even to int8 or to E4M3 after clipping to its range."""
    import ml_dtypes
    import torch

    t = w if isinstance(w, torch.Tensor) else torch.from_numpy(np.require(w, requirements=("C", "W")))
    t = t.to(device or "cpu", torch.float32)
    q, scale = quantize_channels(t, axis, fmt)
    shape = [1] * t.ndim
    shape[axis] = -1
    err = float((q.float().mul_(scale.to(t.device).view(shape)).sub_(t)).norm() / t.norm().clamp_min(1e-12))
    q_np = q.cpu().numpy() if fmt == "int8" else q.view(torch.uint8).cpu().numpy().view(ml_dtypes.float8_e4m3fn)
    return q_np, scale.numpy(), err


def dequantize(q: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * q.ndim
    shape[axis] = -1
    return q.astype(np.float32) * scale.reshape(shape)


def initializer_tensor(init):
    """An ONNX float initializer as a torch tensor of its own dtype (bf16 straight from the raw bytes:
    numpy's bf16 conversion is the slow part at full size); other types come back as fp32."""
    import torch
    from onnx import TensorProto, numpy_helper

    if init.data_type == TensorProto.BFLOAT16 and init.raw_data:
        bits = np.frombuffer(init.raw_data, dtype=np.uint16).reshape(tuple(init.dims))
        return torch.from_numpy(bits.copy()).view(torch.bfloat16)
    arr = numpy_helper.to_array(init)
    if arr.dtype not in (np.float32, np.float16):
        arr = arr.astype(np.float32)
    return torch.from_numpy(np.require(arr, requirements=("C", "W")))  # read-only buffers are copied


def _tensor(name, fmt, array):
    from onnx import TensorProto, helper

    if fmt == "int8":
        return helper.make_tensor(name, TensorProto.INT8, array.shape, array.astype(np.int8).tobytes(), raw=True)
    import ml_dtypes

    fp8 = np.asarray(array).astype(ml_dtypes.float8_e4m3fn)
    return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, fp8.shape, fp8.view(np.uint8).tobytes(), raw=True)


def _weight_dequantizer(model, base: str, w, axis: int, fmt: str, scale_dtype, device=None):
    """Store `w` (numpy or torch) quantized per channel along `axis` (+ scale, zero point) as initializers
    of `model`; return (the DequantizeLinear node that rebuilds it, its output name, relative error, channels)."""
    from onnx import helper, numpy_helper

    q, scale, err = _quantize(w, axis, fmt, device)
    wq, ws, wz, wd = base + "_q", base + "_scale", base + "_zp", base + "_dq"
    model.graph.initializer.extend([_tensor(wq, fmt, q), numpy_helper.from_array(scale.astype(scale_dtype), ws),
                                    _tensor(wz, fmt, np.zeros(scale.shape, dtype=np.float32))])
    return helper.make_node("DequantizeLinear", [wq, ws, wz], [wd], name=base + "_DQ", axis=axis), wd, err, int(scale.size)


def insert_qdq(model, act_amax: dict[str, float], fmt: str, policy: LayerPolicy | None = None,
               scale_dtype=np.float32, device=None):
    """Rewrite `model` in place; returns the per-layer report (kept layers included, with the reason).

    act_amax: calibrated max |input| per linear, keyed by module path (quant.calibrate). A module used
    several times (the flow head's net, unrolled over the Euler steps) shares one weight and one scale.
    scale_dtype: the graph's float type around the linears (Q/DQ scales must match it: fp32, fp16, bf16).
    device: where the weights are quantized (torch device; default the CPU's threads).
    """
    from onnx import helper, numpy_helper

    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; choose {sorted(FORMATS)}")
    opset = next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))
    if opset < 19:
        raise ValueError(f"Q/DQ with per-channel float8/int8 weights needs opset >= 19 (graph has {opset})")
    policy = policy or LayerPolicy()
    qmax = FORMATS[fmt]
    inits = {i.name: i for i in model.graph.initializer}
    sites = linear_sites(model)
    report, new_nodes, done_acts, done_weights, seen = [], {}, {}, {}, set()
    for s in sites:
        reason = policy.reason_to_keep(s.module)
        if reason is not None:
            if s.module not in seen:
                report.append({"layer": s.module, "quantized": False, "reason": reason})
                seen.add(s.module)
            continue
        if s.module not in act_amax:
            raise KeyError(f"no calibration range for the input of {s.module}")
        node = model.graph.node[s.node_index]
        # weight: quantized initializer + per-channel DequantizeLinear, once per weight
        if s.weight not in done_weights:
            w = initializer_tensor(inits[s.weight])
            dq, wd, err, channels = _weight_dequantizer(model, s.weight.replace("/", "_"), w, s.axis, fmt, scale_dtype,
                                                        device)
            new_nodes.setdefault(s.node_index, []).append(dq)
            done_weights[s.weight] = wd
            report.append({"layer": s.module, "quantized": True, "format": fmt, "weight_rel_error": err,
                           "activation_amax": float(act_amax[s.module]), "weight_channels": channels})
        wd = done_weights[s.weight]
        # activation: one Q/DQ pair per tensor, placed before its first consumer (sites come in graph order)
        if s.activation not in done_acts:
            amax = float(act_amax[s.module])
            a_scale = np.array(max(amax, 1e-8) / qmax, dtype=scale_dtype)
            an = f"{s.activation}_{fmt}"
            model.graph.initializer.extend([numpy_helper.from_array(a_scale, an + "_scale"),
                                            _tensor(an + "_zp", fmt, np.zeros((), dtype=np.float32))])
            new_nodes.setdefault(s.node_index, []).extend([
                helper.make_node("QuantizeLinear", [s.activation, an + "_scale", an + "_zp"], [an + "_q"], name=an + "_Q"),
                helper.make_node("DequantizeLinear", [an + "_q", an + "_scale", an + "_zp"], [an + "_dq"], name=an + "_DQ"),
            ])
            done_acts[s.activation] = an + "_dq"
        node.input[0], node.input[1] = done_acts[s.activation], wd
    # drop float weights no node reads any more
    used = {name for node in model.graph.node for name in node.input}
    for name in list(done_weights):
        if name not in used:
            model.graph.initializer.remove(inits[name])
    # splice the new nodes in front of their consumers, keeping the graph topologically sorted
    nodes = list(model.graph.node)
    del model.graph.node[:]
    for idx, node in enumerate(nodes):
        model.graph.node.extend(new_nodes.get(idx, []))
        model.graph.node.append(node)
    return report


STACKED_EXPERTS = r"\.w_(gate|up|down)$"  # the LLM's routed experts, (E, out, in) stacked initializers


def _gathered_3d(model) -> set[str]:
    """3-D float initializers read only by Gather/GatherND: stacked weights picked by an index."""
    from onnx import TensorProto

    readers: dict[str, set] = {}
    for n in model.graph.node:
        for x in n.input:
            readers.setdefault(x, set()).add(n.op_type)
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
    return {i.name for i in model.graph.initializer
            if len(i.dims) == 3 and i.data_type in floats and readers.get(i.name, {"?"}) <= {"Gather", "GatherND"}}


def quantize_stacked_experts(model, fmt: str, scale_dtype=np.float32, names: dict[str, str] | None = None,
                             device=None) -> list[dict]:
    """Weight-only Q/DQ for the MoE's stacked expert weights (rewrites `model` in place).

    They are gathered per token or contracted with an einsum, not nn.Linears, so they get no activation
    Q/DQ. Each (expert, output row) has its own scale: the tensor is stored as (E*out, in) in the
    low-precision type, dequantized per row (DequantizeLinear axis 0) and reshaped back to (E, out, in)
    under the original name, so every consumer is untouched. Opset 19 has no 2-D scales; this is the
    per-channel form any runtime reads. `names` maps renamed initializers to module paths (report only).
    """
    import re

    from onnx import helper, numpy_helper

    report, front = [], []
    names = names or {}
    gathered = _gathered_3d(model)  # the exporter may have renamed them (val_123) on the gather path
    for init in list(model.graph.initializer):
        if len(init.dims) != 3 or not (re.search(STACKED_EXPERTS, init.name) or init.name in gathered):
            continue
        w = initializer_tensor(init)
        e, rows, cols = w.shape
        base, shp = init.name.replace("/", "_"), init.name.replace("/", "_") + "_shape"
        model.graph.initializer.remove(init)
        dq, wd, err, channels = _weight_dequantizer(model, base, w.reshape(e * rows, cols), 0, fmt, scale_dtype, device)
        model.graph.initializer.append(numpy_helper.from_array(np.array([e, rows, cols], dtype=np.int64), shp))
        front += [dq, helper.make_node("Reshape", [wd, shp], [init.name], name=base + "_reshape")]
        report.append({"layer": names.get(init.name, init.name), "quantized": True, "format": fmt, "weight_rel_error": err,
                       "weight_channels": channels,
                       "activation": "high precision: weight-only (stacked experts are gathered, not linears)"})
    if front:  # they read initializers only: first in the graph keeps it topologically sorted
        nodes = list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(front + nodes)
    return report
