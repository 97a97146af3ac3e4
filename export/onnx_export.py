"""Export one piece to ONNX with the contract's names, dynamic axes and dtypes."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from models.config import ModelConfig
from models.contract import PieceSpec

from .shapes import ShapeLimits, axis_ranges, sample_inputs, torch_dynamic_shapes

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 19  # the first opset with float8 QuantizeLinear/DequantizeLinear
EXTERNAL_DATA_BYTES = 1 << 30  # protobuf caps a file at 2 GB: weights go to a side file well before that


def trace_sizes(spec: PieceSpec, cfg: ModelConfig, limits: ShapeLimits) -> dict[str, int]:
    """Tracing sizes inside each axis' range, away from 0 and 1 (which torch.export would specialise)."""
    want = {"batch_size": 2, "sequence_length": 3, "past_sequence_length": 5, "cfg_rows": 2}
    sizes = {}
    for axis, (lo, _, hi) in axis_ranges(spec, cfg, limits).items():
        if axis in want:
            sizes[axis] = max(lo, min(hi, want[axis]))
    return sizes


def _rename_dims(model, spec: PieceSpec) -> None:
    """Give every graph input/output the contract's dim names (the exporter writes e.g. 'past + seq')."""
    by_name = {t.name: t for t in spec.inputs + spec.outputs}
    for value in list(model.graph.input) + list(model.graph.output):
        t = by_name.get(value.name)
        if t is None:
            continue
        dims = value.type.tensor_type.shape.dim
        for d, want in zip(dims, t.shape):
            if isinstance(want, str):
                d.dim_param = want
            else:
                d.dim_value = want


def _stable_sort_as_topk(self, stable=None, dim: int = -1, descending: bool = False):
    """aten.sort.stable (the MoE router's tie-stable expert order), which the exporter cannot translate, as
    ONNX TopK over the whole axis: TopK is specified to put the lower index first among equal values."""
    from onnxscript import opset19 as op

    n = op.Shape(self, start=dim) if dim == -1 else op.Shape(self, start=dim, end=dim + 1)
    return op.TopK(self, n, axis=dim, largest=int(descending), sorted=1)


def export_piece(module: nn.Module, spec: PieceSpec, cfg: ModelConfig, path: Path, *, float_dtype=torch.float32,
                 limits: ShapeLimits | None = None, opset: int = DEFAULT_OPSET, save: bool = True) -> dict:
    """Write `path` (plus `path.data` when the weights are large); return what the manifest records.
    save=False: write nothing and hand the ModelProto back as info["model"] (a Q/DQ pass rewrites it
    before it is saved: at full size that spares writing and re-reading 33 GB)."""
    import onnx

    limits = limits or ShapeLimits()
    sample = sample_inputs(spec, cfg, float_dtype, sizes=trace_sizes(spec, cfg, limits))
    device = next(module.parameters()).device
    sample = tuple(t.to(device) for t in sample)
    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(), tuple(sample), dynamo=True, input_names=spec.input_names,
            output_names=spec.output_names, opset_version=opset,
            dynamic_shapes=torch_dynamic_shapes(spec, cfg, limits), verbose=False, optimize=True,
            custom_translation_table={torch.ops.aten.sort.stable: _stable_sort_as_topk},
        )
    model = program.model_proto
    _rename_dims(model, spec)
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != spec.input_names or got_out != spec.output_names:
        raise RuntimeError(f"{spec.name}: exported I/O {got_in} -> {got_out} does not match the contract")
    external = weight_bytes > EXTERNAL_DATA_BYTES
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    if not save:
        return {"files": [], "opset": opset, "external_data": external, "weight_bytes": weight_bytes, "model": model}
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    files = [path.name] + ([path.name + ".data"] if external else [])
    return {"files": files, "opset": opset, "external_data": external, "weight_bytes": weight_bytes}
