"""Shape ranges of the dynamic axes, sample inputs for tracing, and TensorRT optimization profiles.

Everything is derived from `models.contract`: a dynamic axis is a string in a TensorSpec's shape, and
its range comes from `ShapeLimits` (what the runtime will ask for).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.config import ModelConfig
from models.contract import PieceSpec

TORCH_DTYPES = {"float32": torch.float32, "int64": torch.int64, "bool": torch.bool}


@dataclass
class ShapeLimits:
    max_prompts: int = 4  # prompts per call
    max_sequence: int = 4096  # LLM cache length: prompts + images + generated text of a session

    def validate(self) -> "ShapeLimits":
        if self.max_prompts < 1 or self.max_sequence < 2:
            raise ValueError("max_prompts must be >= 1 and max_sequence >= 2")
        return self


def axis_ranges(spec: PieceSpec, cfg: ModelConfig, limits: ShapeLimits) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every dynamic axis the piece uses."""
    rows = 3 if spec.name.startswith("llm") else 1  # the LLM sees prompts x CFG rows
    n_img = cfg.num_image_tokens
    seq_max = limits.max_sequence if spec.name == "llm_prefill" else 1
    if spec.name == "semantic_decoder":
        seq_max = cfg.understanding_image_size ** 2 // cfg.mingtok.patch_size ** 2 + 1
        past_max = n_img
    else:
        past_max = limits.max_sequence - 1
    ranges = {
        "batch_size": (1, min(2, limits.max_prompts) * rows if rows > 1 else 1, limits.max_prompts * rows),
        "sequence_length": (1, min(64, seq_max), seq_max),
        "past_sequence_length": (0, min(n_img, past_max), past_max),
        "total_sequence_length": (1, min(n_img + 1, past_max + 1), past_max + 1),
        "cfg_rows": (1, 2, 3),
    }
    used = {d for t in spec.inputs + spec.outputs for d in t.shape if isinstance(d, str)}
    return {k: v for k, v in ranges.items() if k in used}


def dtype_of(tensor_dtype: str, float_dtype: torch.dtype) -> torch.dtype:
    return float_dtype if tensor_dtype == "float" else TORCH_DTYPES[tensor_dtype]


def sample_inputs(spec: PieceSpec, cfg: ModelConfig, float_dtype=torch.float32, *, sizes: dict[str, int] | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """Plausible inputs for tracing: sizes per dynamic axis (defaults avoid 0/1 specialisation)."""
    sizes = {"batch_size": 2, "sequence_length": 3, "past_sequence_length": 5, "cfg_rows": 2, **(sizes or {})}
    sizes["total_sequence_length"] = sizes["past_sequence_length"] + sizes["sequence_length"]
    g = generator or torch.Generator().manual_seed(0)
    out = []
    for t in spec.inputs:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in t.shape)
        dt = dtype_of(t.dtype, float_dtype)
        if t.name == "attention_mask":
            x = torch.ones(shape, dtype=dt)
        elif t.name == "position_ids":
            past = sizes["past_sequence_length"]
            x = (torch.arange(shape[1]) + past).expand(shape).clone()
        elif t.name == "image_mask":
            x = torch.zeros(shape, dtype=dt)
        elif t.name in ("text_cfg", "image_cfg", "temperature"):
            x = torch.tensor({"text_cfg": [3.0], "image_cfg": [1.1], "temperature": [1.0]}[t.name])
        elif t.name == "pixel_values":
            x = (torch.rand(shape, generator=g) * 2 - 1).to(dt)
        else:
            x = (torch.randn(shape, generator=g) * 0.5).to(dt)
        out.append(x)
    return tuple(out)


def group_args(spec: PieceSpec, flat: tuple) -> tuple:
    """Flat inputs -> the pieces' positional structure: KV tensors travel as one varargs tuple."""
    n_fixed = sum(1 for t in spec.inputs if not t.name.startswith("past_key_values."))
    return tuple(flat[:n_fixed]) + ((tuple(flat[n_fixed:]),) if len(flat) > n_fixed else ())


def torch_dynamic_shapes(spec: PieceSpec, cfg: ModelConfig, limits: ShapeLimits):
    """`dynamic_shapes` for torch.export, shaped like group_args(...)."""
    ranges = axis_ranges(spec, cfg, limits)
    dims = {name: torch.export.Dim(name, min=lo, max=hi) for name, (lo, _, hi) in ranges.items() if hi > lo}
    per_input = []
    for t in spec.inputs:
        axes = {i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str) and d in dims}
        per_input.append(axes or None)
    return group_args(spec, tuple(per_input))


def trt_profiles(spec: PieceSpec, cfg: ModelConfig, limits: ShapeLimits) -> list[dict[str, tuple]]:
    """One profile {input: (min, opt, max) shapes} per shape regime of the piece."""
    ranges = axis_ranges(spec, cfg, limits)

    def shapes(pick):
        prof = {}
        for t in spec.inputs:
            if any(isinstance(d, str) for d in t.shape):
                prof[t.name] = tuple(tuple(ranges[d][pick(i)] if isinstance(d, str) else d for d in t.shape)
                                     for i in range(3))
        return prof

    return [shapes(lambda i: i)]
