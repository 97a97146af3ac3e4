"""Translate upstream configs (the dicts in the released `config.json` files) into our dataclasses.

Upstream reads its sub-configs with `.get(key, default)`; the defaults below are the ones its
`build_*` functions and `setup_vishead_diffloss` use when a key is absent (UPSTREAM.md 1.1, 2.1).
Features we do not implement raise a ValueError that names them instead of computing something else.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import ConnectorConfig, FlowHeadConfig, LLMConfig, MingTokConfig, ModelConfig, TokenConfig


def _ffn(name: str) -> str:
    if name in ("swiglufused", "swiglu"):
        return "swiglu"
    if name == "mlp":
        return "mlp"
    raise ValueError(f"MingTok ffn_layer {name!r} is not supported (want swiglufused, swiglu or mlp)")


def mingtok_from_upstream(d: dict) -> MingTokConfig:
    enc, sem, pix = d.get("low_level_encoder", {}), d.get("semantic_decoder", {}), d.get("pixel_decoder", {})
    patch = enc.get("patch_size", 16)
    if sem.get("patch_size", 16) != patch:
        raise ValueError(f"semantic_decoder.patch_size {sem.get('patch_size', 16)} != encoder patch_size {patch}: not supported")
    if enc.get("out_dim") is None or sem.get("in_dim") != enc.get("out_dim"):
        raise ValueError("MingTok needs low_level_encoder.out_dim == semantic_decoder.in_dim")
    return MingTokConfig(
        image_size=enc.get("img_size", 224), patch_size=patch, encoder_dim=enc.get("embed_dim", 1024),
        encoder_depth=enc.get("depth", 24), latent_dim=enc["out_dim"], encoder_ffn=_ffn(enc.get("ffn_layer", "mlp")),
        semantic_dim=sem.get("embed_dim", 1024), semantic_depth=sem.get("decoder_depth", 1),
        semantic_ffn=_ffn(sem.get("ffn_layer", "mlp")), pixel_patch_size=pix.get("patch_size", 16),
        pixel_dim=pix.get("embed_dim", 1024), pixel_depth=pix.get("decoder_depth", 1),
        scaling_factor=float(d.get("scaling_factor", 1.0)), mean=float(d.get("mean", 0.0)),
    ).validate()


def llm_from_upstream(d: dict) -> LLMConfig:
    for flag in ("use_qkv_bias", "use_bias", "norm_head"):
        if d.get(flag):
            raise ValueError(f"llm_config.{flag}=true is not supported by this runtime")
    heads = d["num_attention_heads"]
    return LLMConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
        num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads, num_experts=d.get("num_experts") or 0,
        num_experts_per_tok=d.get("num_experts_per_tok", 1), num_shared_experts=d.get("num_shared_experts") or 0,
        moe_intermediate_size=d.get("moe_intermediate_size", 0), intermediate_size=d.get("intermediate_size", 0),
        first_k_dense_replace=d.get("first_k_dense_replace", 0), norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        multi_gate=bool(d.get("multi_gate", False)), rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(d.get("rope_theta", 10000.0)),
        max_position_embeddings=d.get("max_position_embeddings", 32768),
    ).validate()


def flow_from_upstream(vishead: dict, hidden_size: int, latent_dim: int) -> FlowHeadConfig:
    method = vishead.get("gen_method", "flow_matching_swiglu-4")
    if not method.startswith("flow_matching_swiglu-"):
        raise ValueError(f"vishead gen_method {method!r} is not supported")
    return FlowHeadConfig(
        hidden_size=hidden_size, width=vishead.get("diffloss_w", 3072), depth=vishead.get("diffloss_d", 12),
        mlp_mult=int(method.split("-")[1]), latent_dim=latent_dim,
        num_steps=int(vishead.get("num_sampling_steps", "16")),
    ).validate()


def from_upstream(mingtok: dict, llm: dict, vishead: dict | None = None, mlp_depth: int = 2,
                  user_prefix=(), assistant_prefix=(), name: str = "checkpoint", **token_ids) -> ModelConfig:
    """token_ids: overrides of TokenConfig fields the upstream config does not carry (e.g. image_end,
    which upstream takes from the tokenizer)."""
    mt = mingtok_from_upstream(mingtok)
    lm = llm_from_upstream(llm)
    n_gen = llm.get("num_image_tokens_for_gen", 256)
    pad = llm.get("pad_token_id", 126081)
    fields = dict(image_start=llm.get("image_start_token", 126347), image_patch=llm.get("image_patch_token", 126346),
                  image_end=llm.get("image_start_token", 126347) + 1,  # `</image>` follows `<image>` in the vocabulary
                  eos=llm.get("eos_token_id", pad), pad=pad,
                  user_prefix=tuple(user_prefix), assistant_prefix=tuple(assistant_prefix))
    fields.update(token_ids)
    tokens = TokenConfig(**fields)
    return ModelConfig(
        name=name, mingtok=mt, llm=lm, flow_head=flow_from_upstream(vishead or {}, lm.hidden_size, mt.latent_dim),
        connector=ConnectorConfig(in_dim=mt.semantic_dim, hidden_size=lm.hidden_size, depth=mlp_depth), tokens=tokens,
        image_tokens=None if n_gen == mt.num_tokens else n_gen,
    ).validate()


def from_checkpoint_dir(checkpoint: str | Path, mingtok_dir: str | Path | None = None) -> ModelConfig:
    """Config of a released Ming-UniVision directory (`config.json` with `llm_config`,
    `vishead_diffloss_config`, `mlp_depth`) and its MingTok (`mingtok_dir`/config.json, or a
    `mingtok_config` entry)."""
    root = json.loads((Path(checkpoint) / "config.json").read_text())
    if mingtok_dir is not None:
        mt = json.loads((Path(mingtok_dir) / "config.json").read_text())
    elif "mingtok_config" in root:
        mt = root["mingtok_config"]
    else:
        raise ValueError(f"{checkpoint}/config.json has no mingtok_config; pass the MingTok-Vision directory too")
    if "vishead_diffloss_config" not in root:
        raise ValueError(f"{checkpoint}/config.json has no vishead_diffloss_config (a Ming-Lite-Omni config?)")
    return from_upstream(mt, root["llm_config"], root["vishead_diffloss_config"], root.get("mlp_depth", 1),
                         name=Path(checkpoint).name)
