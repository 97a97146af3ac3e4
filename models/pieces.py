"""The five exported pieces as small modules with explicit tensor inputs and outputs only.

No cache objects, no data-dependent Python control flow, no host syncs: each `forward` takes and
returns tensors in the order `models.contract.piece_specs` lists them. KV caches travel as flat
tuples (layer 0 key, layer 0 value, layer 1 key, ...).

Extra classes serve the CUDA-graph path: `SemanticDecoderStatic`, `LLMHiddenStatic` and `LLMStatic` write into
preallocated (batch, heads, max_len, head_dim) buffers at `cache_position` instead of returning
grown caches. They compute the same function as the concat forms (tested).
"""
from __future__ import annotations

import torch
from torch import nn

from .flow_head import euler_schedule
from .univision import MingUniVision


def _pairs(flat):
    return list(flat[0::2]), list(flat[1::2])


def _flat(keys, values):
    return tuple(t for kv in zip(keys, values) for t in kv)


class EncoderPiece(nn.Module):
    """One input resolution per piece: the (possibly interpolated) position table is baked in."""

    def __init__(self, model: MingUniVision, image_size: int):
        super().__init__()
        self.vision = model.vision
        self.connector = model.linear_proj
        self.image_size = image_size
        grid = image_size // model.cfg.mingtok.patch_size
        with torch.no_grad():
            pos = model.vision.low_level_encoder.position_embedding(grid, grid).detach().clone()
        self.register_buffer("pos_embed", pos, persistent=False)

    def forward(self, pixel_values: torch.Tensor):
        enc = self.vision.encode(pixel_values, self.pos_embed)  # latents (B, N+1, C), features (B, N, D)
        return enc["latent"], enc["features"], self.connector(enc["features"])


class SemanticDecoderPiece(nn.Module):
    def __init__(self, model: MingUniVision):
        super().__init__()
        self.vision = model.vision
        self.connector = model.linear_proj

    def forward(self, latents: torch.Tensor, *past: torch.Tensor):
        raw = self.vision.denormalize(latents)  # (B, L, C)
        feats, keys, values = self.vision.semantic_decoder.forward_cached(raw, *_pairs(past))
        return (feats, self.connector(feats), *_flat(keys, values))


class PixelDecoderPiece(nn.Module):
    def __init__(self, model: MingUniVision):
        super().__init__()
        self.vision = model.vision

    def forward(self, features: torch.Tensor):
        return self.vision.decode_pixels(features)


class LLMPiece(nn.Module):
    """Returns the hidden state and logits of the LAST position only (all the loop ever needs)."""

    def __init__(self, model: MingUniVision, moe_mode: str):
        super().__init__()
        self.lm = model.model
        self.moe_mode = moe_mode

    def forward(self, inputs_embeds, attention_mask, position_ids, image_mask, *past):
        hidden, keys, values = self.lm.model(inputs_embeds, attention_mask, position_ids, *_pairs(past),
                                             image_mask=image_mask, moe_mode=self.moe_mode)
        last = hidden[:, -1:]
        return (last, self.lm.logits(last), *_flat(keys, values))


class FlowHeadPiece(nn.Module):
    """vis_head + the whole Euler loop with CFG; guidance scales and temperature are tensor inputs."""

    def __init__(self, model: MingUniVision, *, time_shift: float | None = None, renorm: bool = False):
        super().__init__()
        self.vis_head = model.model.vis_head
        self.flow = model.model.diffloss
        self.renorm = renorm
        times, dts = euler_schedule(self.flow.cfg.num_steps, time_shift)
        self.register_buffer("times", times, persistent=False)
        self.register_buffer("dts", dts, persistent=False)

    def forward(self, condition_hidden, noise, text_cfg, image_cfg, temperature):
        b, r, _ = condition_hidden.shape
        z = self.vis_head(condition_hidden).reshape(b * r, -1)  # (B*R, W), prompt-major
        return self.flow.sample(z, noise, text_cfg=text_cfg, image_cfg=image_cfg, temperature=temperature,
                                renorm=self.renorm, schedule=(self.times, self.dts))


class SemanticDecoderStatic(nn.Module):
    """In-place cache form: caches (B, H, S_max, d) are written at `cache_position` (L,).
    fused: one-token steps use the decode-attention kernel (runtime.fast.decode_weights.prepare_decode)."""

    def __init__(self, model: MingUniVision, fused: bool = False):
        super().__init__()
        self.vision = model.vision
        self.connector = model.linear_proj
        self.fused = fused

    def forward(self, latents, cache_position, *caches):
        raw = self.vision.denormalize(latents)
        feats = self.vision.semantic_decoder.forward_static(raw, *_pairs(caches), cache_position, fused=self.fused)
        return feats, self.connector(feats)


class LLMHiddenStatic(nn.Module):
    """The image loop's LLM step: in-place caches written at `cache_position`, attention_mask (B, S_max)
    spanning every slot of the buffers; last hidden state only (no logits: the lm_head is 1.3 GB that
    an image token never needs). Caches are flat (k0, v0, k1, v1, ...), a tensor-only signature that
    exports (torch.export / AOTInductor) as it runs."""

    def __init__(self, model: MingUniVision, moe_mode: str = "gather"):
        super().__init__()
        self.lm = model.model
        self.moe_mode = moe_mode

    def forward(self, inputs_embeds, attention_mask, position_ids, image_mask, cache_position, *caches):
        hidden = self.lm.model.forward_static(inputs_embeds, attention_mask, position_ids, *_pairs(caches),
                                              cache_position, image_mask=image_mask, moe_mode=self.moe_mode)
        return hidden[:, -1:]  # (B*R, 1, H)


class LLMStatic(LLMHiddenStatic):
    """LLMHiddenStatic with the logits of the last position too (text steps)."""

    def forward(self, inputs_embeds, attention_mask, position_ids, image_mask, cache_position, *caches):
        last = super().forward(inputs_embeds, attention_mask, position_ids, image_mask, cache_position, *caches)
        return last, self.lm.logits(last)


def build_pieces(model: MingUniVision) -> dict[str, nn.Module]:
    return {
        "encoder": EncoderPiece(model, model.cfg.mingtok.image_size),
        "encoder_understanding": EncoderPiece(model, model.cfg.understanding_image_size),
        "semantic_decoder": SemanticDecoderPiece(model),
        "pixel_decoder": PixelDecoderPiece(model),
        "llm_prefill": LLMPiece(model, "dense"),
        "llm_step": LLMPiece(model, "gather"),
        "flow_head": FlowHeadPiece(model),
    }
