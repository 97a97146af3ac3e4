"""Decode-time weights for the custom kernels: the fused MoE everywhere, FP8 linears when asked.

`prepare_decode(model, weights)` changes the model in place for the GPU fast path:
  * every MoE layer gets `fused_decode` (kernels.moe): its routed experts are read straight from the
    stacked tensors, bf16 as they are (no copy) or FP8 with per-(expert, row) scales;
  * weights="fp8" also wraps the decode-time linears (LLM attention, shared experts, dense FFNs, the
    semantic decoder's blocks) in FP8Linear. Kept high precision, as in quant/policy.py: embeddings,
    norms, the router, lm_head, vis_head, the connector and everything the prefill-only pieces use.
    Prefills keep the exact weights (the MoE's stacked experts and each FP8Linear's `reference`): FP8
    copies are added for the decode, nothing is replaced.
The flow head has its own packed weights (runtime.fast.kernel_flow_head).
"""
from __future__ import annotations

import logging

from torch import nn

from kernels import interpreting
from kernels.fp8 import WEIGHT_FORMATS, quantize_rows_fp8
from kernels.ops import moe_decode_op, skinny_linear_op
from kernels.skinny import MAX_ROWS
from models.llm import MoE
from models.univision import MingUniVision

logger = logging.getLogger(__name__)


class FusedMoEDecode(nn.Module):
    """Installed as MoE.fused_decode: (x (T, H), ids (T, k), w (T, k)) -> (T, H) fp32.

    A module with non-persistent buffers (checkpoints are unchanged) so that torch.export sees the
    expert weights as named constants, which AOTInductor packages take from the live model."""

    def __init__(self, moe: MoE, weights: str):
        super().__init__()
        if weights == "fp8":
            (wg, sg), (wu, su), (wd, sd) = (quantize_rows_fp8(p) for p in (moe.w_gate, moe.w_up, moe.w_down))
        else:  # the stacked parameters themselves (no copy: they are contiguous)
            (wg, wu, wd), (sg, su, sd) = (p.detach().contiguous() for p in (moe.w_gate, moe.w_up, moe.w_down)), (None,) * 3
        for name, t in dict(wg=wg, wu=wu, wd=wd, sg=sg, su=su, sd=sd).items():
            self.register_buffer(name, t, persistent=False)

    def forward(self, x, ids, w):
        return moe_decode_op(x, ids, w, self.wg, self.wu, self.wd, self.sg, self.su, self.sd)


class FP8Linear(nn.Module):
    """nn.Linear with an E4M3 copy of its weight (per-output-channel scale) for the decode rows
    (<= MAX_ROWS, the skinny kernel); anything larger (a prefill, an understanding request) runs the
    original layer, kept as `reference`, so only the per-token decode is FP8."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        wq, scale = quantize_rows_fp8(linear.weight)
        self.register_buffer("weight_fp8", wq)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.reference = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = linear.weight.dtype

    def forward(self, x):
        rows = x.numel() // self.in_features
        if rows <= MAX_ROWS and (x.is_cuda or interpreting()):
            y = skinny_linear_op(x.reshape(rows, self.in_features), self.weight_fp8, self.scale, self.bias, self.out_dtype)
            return y.view(*x.shape[:-1], self.out_features)
        return self.reference(x)


def _swap_linears(module: nn.Module, names: tuple[str, ...]) -> int:
    swapped = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and name in names:
            setattr(module, name, FP8Linear(child))
            swapped += child.weight.numel()
        else:
            swapped += _swap_linears(child, names)
    return swapped


# decode-time linears by attribute name (LLM attention/MLP, ViT blocks of the semantic decoder)
FP8_LINEAR_NAMES = ("query_key_value", "dense", "gate_proj", "up_proj", "down_proj", "qkv", "proj", "w12", "w3",
                    "fc1", "fc2")


def prepare_decode(model: MingUniVision, weights: str = "bf16") -> dict:
    """Install the decode kernels on `model` (in place). Returns what was converted, in parameters."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    moes = [m for m in model.model.model.modules() if isinstance(m, MoE)]
    for m in moes:
        m.fused_decode = FusedMoEDecode(m, weights)
    report = {"moe_layers": len(moes), "fp8_linear_params": 0}
    if weights == "fp8":
        for layer in model.model.model.layers:
            report["fp8_linear_params"] += _swap_linears(layer, FP8_LINEAR_NAMES)
        for blk in model.vision.semantic_decoder.blocks:
            report["fp8_linear_params"] += _swap_linears(blk, FP8_LINEAR_NAMES)
    logger.info("decode weights %s: %s", weights, report)
    return report


__all__ = ["FP8_LINEAR_NAMES", "FP8Linear", "FusedMoEDecode", "prepare_decode"]
