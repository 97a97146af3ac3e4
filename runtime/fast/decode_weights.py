"""Decode-time weights for the custom kernels: the fused MoE everywhere, FP8 linears when asked.

`prepare_decode(model, weights)` changes the model in place for the GPU fast path (after the weights are
loaded: the FP8 copies and the stacked routers are snapshots of them):
  * every LLM and semantic-decoder attention gets `fused_decode_attention` (kernels.attention): one
    launch per layer for the one-query decode over the static cache, in a fixed order, used by static
    steps in moe_mode "fused" (the LLM) or built with fused=True (SemanticDecoderStatic); with an FP8 output
    projection, on a GPU, it writes that projection's fp16 rows (decode_attention_fp16_rows); and
    `fused_kv_write` (kernels.rope): the one-token step's cache writes (with the LLM's RoPE) in one launch;
  * every MoE layer gets `fused_decode` (kernels.moe): its routed experts are read straight from the
    stacked tensors, bf16 as they are (no copy) or FP8 with per-(expert, row) scales; its two
    routers (text and image) one stacked weight, `fused_router`, so a decode step routes in one GEMM;
    `router_linear`, which runs the decode rows' router GEMM on the skinny kernel (the routers' weights
    as they are) instead of cuBLAS; and `fused_route` (kernels.routing): softmax, top-k, router choice and
    shared-expert slots in one launch.
    With FP8 the shared experts join the stacked FP8 copies as extra experts that every row takes with
    weight 1 (FusedMoEDecode.shared_slots): their GEMMs ride in the routed experts' two launches instead
    of two launches of their own (MINGRT_MOE_SHARED=0: separate, as before session 13);
  * weights="fp8" also wraps the SwiGLU MLPs (dense FFNs, shared experts the MoE does not run, the semantic
    decoder's w12/w3) in FusedSwiGLUDecode (gate and up in one launch with the SiLU-product epilogue, then the
    down projection) and the other decode-time linears (attention, GELU MLPs) in FP8Linear. Kept high
    precision, as in quant/policy.py: embeddings, norms, the router, lm_head, vis_head, the connector and
    everything the prefill-only pieces use. Prefills keep the exact weights (the MoE's stacked experts,
    each wrapper's `reference`): FP8 copies are added for the decode, nothing is replaced.
The flow head has its own packed weights (runtime.fast.kernel_flow_head).
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from kernels import interpreting
from kernels.attention import reserve_tickets as reserve_attention_tickets
from kernels.fp8 import WEIGHT_FORMATS, fp16_rows, quantize_rows_fp8
from kernels.moe import reserve_scratch
from kernels.ops import (
    decode_attention_op,
    dtype_name,
    moe_decode_op,
    rope_kv_write_op,
    route_decode_op,
    skinny_linear_op,
    skinny_swiglu_op,
)
from kernels.skinny import MAX_ROWS
from models.llm import Attention, ExpertMLP, MoE
from models.univision import MingUniVision
from models.vit_layers import SelfAttention, SwiGLUFFN

from . import preparation

logger = logging.getLogger(__name__)


# Each switch saves launches of the compiled decode steps (benchmarks/router_ab.py --setting NAME times it on
# against off); each is part of a preparation's settings and of the AOTInductor fingerprint.
ROUTER_ON_KERNEL = True  # False: the routers' GEMM stays on cuBLAS ("gemm")
ROUTE_ON_KERNEL = True  # False: the softmax and top-k stay PyTorch ops, compiled by Inductor ("route")
KV_WRITE_ON_KERNEL = True  # False: the KV-cache writes (and the LLM's RoPE) stay PyTorch ops ("kv")
ATTENTION_FP8_ROWS = True  # False: FP8 output projections convert the attention output in a launch of their own ("rows")
SHARED_IN_MOE_ENV = "MINGRT_MOE_SHARED"  # "0": FP8 shared experts keep their own launches


def shared_in_moe_default() -> bool:
    raw = os.environ.get(SHARED_IN_MOE_ENV, "1")
    if raw not in ("0", "1"):
        raise ValueError(f"{SHARED_IN_MOE_ENV}={raw!r}: expected 0 or 1")
    return raw == "1"


def decode_settings(weights: str) -> dict:
    """The switches a preparation for `weights` depends on, each of which changes the compiled steps' graphs: part
    of a preparation's identity (prepare_decode) and of the AOTInductor fingerprint (export.compiled_steps)."""
    out = {"router_on_kernel": ROUTER_ON_KERNEL, "route_on_kernel": ROUTE_ON_KERNEL,
           "kv_write_on_kernel": KV_WRITE_ON_KERNEL}
    if weights == "fp8":  # the FP8 steps' shared experts as MoE slots or apart, and their attention outputs
        out.update(moe_shared_slots=shared_in_moe_default(), attention_fp8_rows=ATTENTION_FP8_ROWS)
    return out


def _shared_as_experts(moe: MoE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The shared experts' weights cut into routed-expert shapes, (n, I, H) gate and up and (n, H, I) down
    (n = their intermediate size / I), or None when it is not a whole number of experts. Exact: SiLU(g) * u
    is per intermediate channel, and the down projection is the sum of its column blocks' products."""
    if moe.shared_experts is None:
        return None
    mlp = getattr(moe.shared_experts, "reference", moe.shared_experts)  # a model prepared for FP8 before
    e, i, h = moe.w_gate.shape
    inter = mlp.gate_proj.out_features
    if inter % i or mlp.gate_proj.in_features != h:
        return None
    n = inter // i
    return (mlp.gate_proj.weight.detach().view(n, i, h), mlp.up_proj.weight.detach().view(n, i, h),
            mlp.down_proj.weight.detach().view(h, n, i).transpose(0, 1))


class FusedMoEDecode(nn.Module):
    """Installed as MoE.fused_decode: (x (T, H), ids (T, k) or (T, k + shared_slots), w likewise) -> (T, H) fp32
    (ids of k slots get the shared experts' slots appended here; `route` gives them appended already).

    A module with non-persistent buffers (checkpoints are unchanged) so that torch.export sees the
    expert weights as named constants, which AOTInductor packages take from the live model.

    shared (FP8 only; default MINGRT_MOE_SHARED, on): the shared experts are stacked after the E routed ones
    and every row takes them as `shared_slots` more routing slots with weight 1, so the call returns routed +
    shared, summed in fp32 (MoE.forward then skips its own shared-expert call). Their down projection's
    FP8 scales are per row of each I-column block, a little finer than the separate FP8 GEMM's per row."""

    def __init__(self, moe: MoE, weights: str, shared: bool | None = None):
        super().__init__()
        stacked = [moe.w_gate.detach(), moe.w_up.detach(), moe.w_down.detach()]
        extra = _shared_as_experts(moe) if weights == "fp8" and (shared_in_moe_default() if shared is None else shared) else None
        self.shared_slots = 0
        if extra is not None:
            stacked = [torch.cat([p, q.to(p.dtype)]) for p, q in zip(stacked, extra)]
            self.shared_slots = extra[0].shape[0]
        if weights == "fp8":
            (wg, sg), (wu, su), (wd, sd) = (quantize_rows_fp8(p) for p in stacked)
        else:  # the stacked parameters themselves (no copy: they are contiguous)
            (wg, wu, wd), (sg, su, sd) = (p.contiguous() for p in stacked), (None,) * 3
        for name, t in dict(wg=wg, wu=wu, wd=wd, sg=sg, su=su, sd=sd).items():
            self.register_buffer(name, t, persistent=False)
        e = moe.w_gate.shape[0]
        self.register_buffer("shared_ids", torch.arange(e, e + self.shared_slots, device=moe.w_gate.device),
                             persistent=False)
        self.num_routed, self.top_k, self.renormalize = e, moe.gate.top_k, moe.gate.renormalize
        if moe.w_down.is_cuda:  # the kernels' tickets and scratch, before any capture
            _, h, i = moe.w_down.shape
            reserve_scratch(moe.w_down.device, h, i, moe.gate.top_k + self.shared_slots,
                            torch.float16 if weights == "fp8" else moe.w_down.dtype, MAX_ROWS)

    def forward(self, x, ids, w):
        # ids come routed only (T, k), from MoE.route, or with the shared slots appended (T, k + n), from route()
        if ids.shape[1] not in (self.top_k, self.top_k + self.shared_slots) or w.shape != ids.shape:
            raise ValueError(f"expert ids of width {ids.shape[1]}: expected {self.top_k} routed"
                             + (f" or {self.top_k + self.shared_slots} with the shared slots" if self.shared_slots else "")
                             + f", and weights of the ids' shape (got {tuple(w.shape)} for {tuple(ids.shape)})")
        if self.sg is not None:  # FP8: the rows as the kernels multiply them
            x = _rows_for_fp8(x)
        if self.shared_slots and ids.shape[1] == self.top_k:  # each row's shared experts after its routed ones: (T, k + n)
            t = ids.shape[0]
            ids = torch.cat([ids, self.shared_ids.to(ids.dtype).expand(t, -1)], dim=1)
            w = torch.cat([w, w.new_ones(t, self.shared_slots)], dim=1)
        return moe_decode_op(x, ids, w, self.wg, self.wu, self.wd, self.sg, self.su, self.sd)

    def route(self, logits: torch.Tensor, image_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Installed as MoE.fused_route where the kernel runs: router logits (T, G, E) and the image mask picking a
        router per row -> this kernel's slots, ids (T, k + shared_slots) and fp32 weights, in one launch
        (kernels.routing)."""
        return route_decode_op(logits, image_mask, self.top_k, self.renormalize, self.num_routed, self.shared_slots)


def _rows_for_fp8(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp16 for the FP8 kernels when compiling (torch.compile, torch.export): Inductor fuses the
    rounding into the kernel that made x, and the GEMMs skip their in-loop conversion (kernels.fp8.fp16_rows).
    Uncompiled it would be three extra launches per call; the kernels then convert, to the same bits."""
    return fp16_rows(x) if torch.compiler.is_compiling() else x


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits x @ weight^T, (..., E) in x's dtype, as F.linear gives them; the decode rows (<= MAX_ROWS)
    on the skinny kernel. A decode step routes with both routers stacked (`fused_router`, 128 x 2048 bf16,
    512 KB: the step passes an image mask, all False for generated tokens), and cuBLAS took ~5 us a layer for
    that GEMM on an H200 (profile_step_h200_s12.md), in a kernel that joins no PDL chain. The same fp32 sums of
    the same products in another order: a logit can differ from cuBLAS's in its last bit, which moves the
    expert weights' rounding and can turn a near tie to the other expert."""
    rows = _decode_rows(x, weight.shape[1])
    if rows:
        y = skinny_linear_op(x.reshape(rows, weight.shape[1]), weight, None, None, dtype_name(x.dtype))
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


def decode_attention_fp16_rows(q, k, v, mask, scale, last=None):
    """The decode-attention kernel for an attention whose output projection is an FP8Linear: it writes its output
    as that linear's rows (fp16_rows of the q-dtype output, the same bits), so the compiled step has no conversion
    kernel between the two (one a layer)."""
    # rows the linear takes on its kernel (more: it runs its reference, on q's dtype)
    return decode_attention_op(q, k, v, mask, scale, last, _decode_rows(q, q.shape[1] * q.shape[3]) > 0)


def _decode_rows(x, in_features: int) -> int:
    """The rows of `x` when the skinny kernel takes them (a decode: <= MAX_ROWS, on a GPU or in Triton's
    interpreter), else 0: the caller runs its original module (a prefill keeps the exact weights)."""
    rows = x.numel() // in_features
    return rows if rows <= MAX_ROWS and (x.is_cuda or interpreting()) else 0


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
        self.out_dtype = dtype_name(linear.weight.dtype)  # the op takes the name (kernels.ops.OUT_DTYPES)

    def forward(self, x):
        rows = _decode_rows(x, self.in_features)
        if rows:
            y = skinny_linear_op(_rows_for_fp8(x.reshape(rows, self.in_features)), self.weight_fp8, self.scale,
                                 self.bias, self.out_dtype)
            return y.view(*x.shape[:-1], self.out_features)
        return self.reference(x)


class FusedSwiGLUDecode(nn.Module):
    """A SwiGLU MLP (the LLM's ExpertMLP: gate_proj/up_proj/down_proj; the ViT's SwiGLUFFN: w12/w3) for
    the decode rows (<= MAX_ROWS): silu(gate) * up from ONE skinny launch over the stacked [gate; up] E4M3
    weight (the SwiGLU epilogue; fp16 out, what the FP8 down GEMM multiplies anyway), then the down
    projection as an FP8Linear: two launches where the FP8Linear pair took three (two GEMMs and the
    elementwise product). Larger inputs (prefills) run the original module, kept as `reference`."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        if isinstance(mlp, ExpertMLP):
            w12 = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
            b12, down = None, mlp.down_proj
        elif isinstance(mlp, SwiGLUFFN):  # w12's first half is the gate, as the epilogue expects
            w12, down = mlp.w12.weight.detach(), mlp.w3
            b12 = None if mlp.w12.bias is None else mlp.w12.bias.detach().float()
        else:
            raise TypeError(f"FusedSwiGLUDecode takes an ExpertMLP or a SwiGLUFFN, not {type(mlp).__name__}")
        wq, scale = quantize_rows_fp8(w12)
        self.register_buffer("w12_fp8", wq)
        self.register_buffer("scale12", scale)
        self.register_buffer("bias12", b12)
        self.down = FP8Linear(down)
        self.reference = mlp
        self.in_features = w12.shape[1]
        self.params = w12.numel() + down.weight.numel()

    def forward(self, x):
        rows = _decode_rows(x, self.in_features)
        if rows:
            act = skinny_swiglu_op(_rows_for_fp8(x.reshape(rows, self.in_features)), self.w12_fp8, self.scale12,
                                   self.bias12, "float16")  # (rows, I)
            return self.down(act).view(*x.shape[:-1], -1)
        return self.reference(x)


def _fuse_swiglu(module: nn.Module, keep: frozenset = frozenset()) -> int:
    """Replace every ExpertMLP / SwiGLUFFN under `module` by FusedSwiGLUDecode, except the modules in `keep`;
    returns the parameters covered."""
    fused = 0
    for name, child in list(module.named_children()):
        if child in keep:
            continue
        if isinstance(child, (ExpertMLP, SwiGLUFFN)):
            setattr(module, name, FusedSwiGLUDecode(child))
            fused += getattr(module, name).params
        elif not isinstance(child, (FusedSwiGLUDecode, FP8Linear)):
            fused += _fuse_swiglu(child, keep)
    return fused


def _swap_linears(module: nn.Module, names: tuple[str, ...]) -> int:
    swapped = 0
    for name, child in list(module.named_children()):
        if isinstance(child, (FusedSwiGLUDecode, FP8Linear)):  # already converted: their references stay exact
            continue
        if isinstance(child, nn.Linear) and name in names:
            setattr(module, name, FP8Linear(child))
            swapped += child.weight.numel()
        else:
            swapped += _swap_linears(child, names)
    return swapped


def _unwrap_fp8(module: nn.Module) -> int:
    """Put back the original module of every FP8 wrapper under `module` (a model prepared for FP8 before, now
    for bf16); returns the weights restored, counted as prepare_decode counts the converted ones."""
    restored = 0
    for name, child in list(module.named_children()):
        if isinstance(child, (FusedSwiGLUDecode, FP8Linear)):
            setattr(module, name, child.reference)
            restored += child.params if isinstance(child, FusedSwiGLUDecode) else child.reference.weight.numel()
        else:
            restored += _unwrap_fp8(child)
    return restored


def _set_fused_router(moe: MoE, both: torch.Tensor) -> None:
    """Refresh the stacked routers in place where they exist: the same for either format, so a graph an earlier
    generator captured keeps reading a live buffer (a new one would free the old under it)."""
    old = getattr(moe, "fused_router", None)
    if old is not None and (old.shape, old.dtype, old.device) == (both.shape, both.dtype, both.device):
        old.copy_(both)
    else:
        moe.register_buffer("fused_router", both, persistent=False)


# decode-time linears by attribute name (LLM attention, ViT attention, GELU MLPs); the SwiGLU MLPs'
# gate_proj/up_proj/down_proj and w12/w3 are converted whole first (FusedSwiGLUDecode)
FP8_LINEAR_NAMES = ("query_key_value", "dense", "qkv", "proj", "fc1", "fc2")


def prepare_decode(model: MingUniVision, weights: str = "bf16") -> dict:
    """Install the decode kernels on `model` (in place). Returns what was converted, in parameters. A model
    already prepared so (same format and settings, its parameters not moved, cast or written since) is left as
    it is. A model prepared before for the other format is switched over: bf16 after FP8 puts the original
    linears back, so a bf16 generator never streams a previous FP8 generator's copies; the generators made
    before then refuse to run (runtime.fast.preparation), since their captured graphs read the kernels' weight
    copies this replaces."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    state = preparation.weights_state(model)
    settings = (tuple(sorted(decode_settings(weights).items())), state)
    done = preparation.current(model)
    if done is not None and state is not None and (done.weights, done.settings) == (weights, settings):
        return done.report  # already so, on the same weights: generators share the installed kernels and copies
    dev = next(model.parameters()).device
    kernels_run = dev.type == "cuda" or interpreting()  # the one-launch glue kernels (route, cache writes) run here
    moes = [m for m in model.model.model.modules() if isinstance(m, MoE)]
    for m in moes:
        m.fused_decode = FusedMoEDecode(m, weights)
        if m.fused_decode.shared_slots and isinstance(m.shared_experts, FusedSwiGLUDecode):
            m.shared_experts = m.shared_experts.reference  # wrapped by an earlier FP8 preparation
        if ROUTER_ON_KERNEL:
            m.router_linear = router_logits
        else:
            m.__dict__.pop("router_linear", None)
        if ROUTE_ON_KERNEL and kernels_run:
            m.fused_route = m.fused_decode.route
        else:
            m.__dict__.pop("fused_route", None)
        if hasattr(m, "image_gate"):  # both routers in one GEMM (MoE.route); a buffer, so exports see a constant
            _set_fused_router(m, torch.cat([m.gate.weight, m.image_gate.weight]).detach())
    attns = [m for m in model.model.model.modules() if isinstance(m, Attention)]
    attns += [m for m in model.vision.semantic_decoder.modules() if isinstance(m, SelfAttention)]
    for m in attns:  # the attention kernel of fused one-token steps (the FP8 swap below may change it)
        m.fused_decode_attention = decode_attention_op
        if KV_WRITE_ON_KERNEL and kernels_run:  # the cache writes (the LLM's with RoPE) in one launch
            m.fused_kv_write = rope_kv_write_op
        else:
            m.__dict__.pop("fused_kv_write", None)
    if attns and dev.type == "cuda":  # the split merge's tickets, before any capture
        reserve_attention_tickets(dev)
    report = {"moe_layers": len(moes), "decode_attention_layers": len(attns), "fp8_linear_params": 0,
              "fp8_fused_swiglu_params": 0, "fp8_params_restored": 0,
              "fp8_moe_shared_params": sum(sum(p.numel() for p in m.shared_experts.parameters() if p.dim() == 2)
                                           for m in moes if m.fused_decode.shared_slots)}
    # shared experts the MoE kernels run: no second FP8 copy, and the MoE's other modes keep them exact like
    # its routed experts
    in_moe = frozenset(m.shared_experts for m in moes if m.fused_decode.shared_slots)
    for stack in (model.model.model.layers, model.vision.semantic_decoder.blocks):
        for layer in stack:
            if weights == "fp8":
                report["fp8_fused_swiglu_params"] += _fuse_swiglu(layer, keep=in_moe)
                report["fp8_linear_params"] += _swap_linears(layer, FP8_LINEAR_NAMES)
            else:
                report["fp8_params_restored"] += _unwrap_fp8(layer)
    for m in attns:  # after the swap: an FP8 output projection takes the kernel's output as its rows (not in the
        # interpreter, which multiplies an FP8 linear's rows as given)
        out_linear = m.dense if isinstance(m, Attention) else m.proj
        if ATTENTION_FP8_ROWS and isinstance(out_linear, FP8Linear) and dev.type == "cuda":
            m.fused_decode_attention = decode_attention_fp16_rows
    logger.info("decode weights %s: %s", weights, report)
    preparation.record(model, preparation.Preparation(weights, settings, report))
    return report


__all__ = ["ATTENTION_FP8_ROWS", "FP8_LINEAR_NAMES", "FP8Linear", "FusedMoEDecode", "FusedSwiGLUDecode",
           "KV_WRITE_ON_KERNEL", "decode_attention_fp16_rows", "decode_settings", "ROUTER_ON_KERNEL", "ROUTE_ON_KERNEL", "SHARED_IN_MOE_ENV",
           "prepare_decode", "router_logits"]
