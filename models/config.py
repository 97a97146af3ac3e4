"""Dataclass configs for every piece of Ming-UniVision, with `full` and `tiny` presets.

`full` holds the released sizes (UPSTREAM.md 1.1, 2.1, 3.1). `tiny` is the seeded model the upstream
golden fixtures were made with; it is small enough for CPU tests and for the built-in demo model.
Every config has `validate()`, which raises ValueError naming the offending field.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """Hidden width of the fused SwiGLU FFN: 2/3 of dim*ratio, rounded up to a multiple of 8."""
    return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


@dataclass
class MingTokConfig:
    image_size: int = 512  # training resolution; pos_embed holds (image_size/patch)^2 + 1 rows
    patch_size: int = 32  # encoder patch == one semantic token
    encoder_dim: int = 768
    encoder_depth: int = 12
    latent_dim: int = 32  # the continuous token the flow head generates
    semantic_dim: int = 1024
    semantic_depth: int = 24
    pixel_patch_size: int = 16
    pixel_dim: int = 1024
    pixel_depth: int = 24
    head_dim: int = 64  # every MingTok transformer uses dim // 64 heads
    encoder_ffn: str = "swiglu"  # "swiglu" | "mlp"; the pixel decoder always uses the GELU MLP
    semantic_ffn: str = "swiglu"
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    scaling_factor: float = 8.09449291  # latent normalisation: z = (raw - mean) / scaling_factor
    mean: float = 1.46817409

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def pixel_ratio(self) -> int:
        """Pixel-decoder tokens per semantic token along one side."""
        return self.patch_size // self.pixel_patch_size

    def validate(self) -> "MingTokConfig":
        for name in ("encoder_dim", "semantic_dim", "pixel_dim"):
            dim = getattr(self, name)
            _require(dim > 0 and dim % self.head_dim == 0, f"mingtok.{name}={dim} must be a positive multiple of head_dim={self.head_dim}")
        _require(self.image_size % self.patch_size == 0, f"mingtok.image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        _require(self.patch_size % self.pixel_patch_size == 0, "mingtok.patch_size must be a multiple of pixel_patch_size")
        _require(self.encoder_dim % self.latent_dim == 0, "mingtok.encoder_dim must be a multiple of latent_dim (channel-averaging shortcut)")
        _require(self.semantic_dim % self.latent_dim == 0, "mingtok.semantic_dim must be a multiple of latent_dim (channel-repeating shortcut)")
        _require(self.scaling_factor != 0, "mingtok.scaling_factor must be non-zero")
        for name in ("encoder_ffn", "semantic_ffn"):
            _require(getattr(self, name) in ("swiglu", "mlp"), f"mingtok.{name} must be 'swiglu' or 'mlp'")
        for name in ("encoder_depth", "semantic_depth", "pixel_depth"):
            _require(getattr(self, name) >= 1, f"mingtok.{name} must be >= 1")
        return self


@dataclass
class FlowHeadConfig:
    hidden_size: int = 2048  # LLM hidden size, input of vis_head
    width: int = 3072  # W: the velocity MLP's width
    cond_dim: int | None = None  # condition width (vis_head output); upstream always builds it = width
    depth: int = 12  # residual blocks
    mlp_mult: int = 4
    latent_dim: int = 32
    num_steps: int = 16  # Euler steps; not recoverable from the weights (UPSTREAM.md 7.1)
    frequency_dim: int = 256
    max_period: float = 10000.0
    norm_eps: float = 1e-6

    @property
    def mlp_hidden(self) -> int:
        return swiglu_hidden(self.width, self.mlp_mult)

    @property
    def condition_dim(self) -> int:
        return self.width if self.cond_dim is None else self.cond_dim

    def validate(self) -> "FlowHeadConfig":
        _require(self.width > 0 and self.depth >= 1, "flow_head.width and depth must be positive")
        _require(self.num_steps >= 1, f"flow_head.num_steps={self.num_steps} must be >= 1")
        _require(self.frequency_dim % 2 == 0, "flow_head.frequency_dim must be even")
        return self


@dataclass
class LLMConfig:
    vocab_size: int = 126464
    hidden_size: int = 2048
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 4
    head_dim: int = 128
    num_experts: int = 64
    num_experts_per_tok: int = 6
    num_shared_experts: int = 2
    moe_intermediate_size: int = 1408
    intermediate_size: int = 5632  # dense layers only (first_k_dense_replace > 0)
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = True
    multi_gate: bool = True  # gate, image_gate and audio_gate
    rms_norm_eps: float = 1e-5
    rope_theta: float = 600000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)  # only used with 3-row position ids
    max_position_embeddings: int = 32768

    def validate(self) -> "LLMConfig":
        _require(self.num_heads % self.num_kv_heads == 0, f"llm.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        _require(self.head_dim % 2 == 0, "llm.head_dim must be even (RoPE)")
        _require(1 <= self.num_experts_per_tok <= self.num_experts, "llm.num_experts_per_tok must be in [1, num_experts]")
        _require(0 <= self.first_k_dense_replace <= self.num_layers, "llm.first_k_dense_replace out of range")
        _require(self.vocab_size > 0 and self.hidden_size > 0 and self.num_layers >= 1, "llm sizes must be positive")
        return self


@dataclass
class ConnectorConfig:
    in_dim: int = 1024  # semantic feature width
    hidden_size: int = 2048  # LLM hidden size
    depth: int = 2  # Linear, then (GELU, Linear) * (depth - 1)

    def validate(self) -> "ConnectorConfig":
        _require(self.depth >= 1, "connector.depth must be >= 1")
        return self


@dataclass
class TokenConfig:
    image_start: int = 126347  # `<image>`: the generation trigger
    image_patch: int = 126346  # `<imagePatch>`
    image_end: int = 126348
    eos: int = 126081
    pad: int = 126081
    # Token ids of "<role>HUMAN</role>" and "<role>ASSISTANT</role>". Empty: ask the tokenizer.
    user_prefix: tuple[int, ...] = ()
    assistant_prefix: tuple[int, ...] = ()

    def validate(self) -> "TokenConfig":
        return self


@dataclass
class ModelConfig:
    name: str = "full"
    mingtok: MingTokConfig = field(default_factory=MingTokConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    flow_head: FlowHeadConfig = field(default_factory=FlowHeadConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    tokens: TokenConfig = field(default_factory=TokenConfig)
    text_cfg: float = 3.0  # the values upstream actually samples with (UPSTREAM.md 4.5)
    image_cfg: float = 1.1
    understanding_image_size: int = 1024  # images to describe are resized to this square (1024 tokens)
    image_tokens: int | None = None  # tokens per generated image (upstream num_image_tokens_for_gen); None: MingTok's grid

    @property
    def num_image_tokens(self) -> int:
        return self.mingtok.num_tokens if self.image_tokens is None else self.image_tokens

    @property
    def generated_image_size(self) -> int:
        """Side of a generated image: a square grid of num_image_tokens semantic tokens."""
        return math.isqrt(self.num_image_tokens) * self.mingtok.patch_size

    def validate(self) -> "ModelConfig":
        for part in (self.mingtok, self.llm, self.flow_head, self.connector, self.tokens):
            part.validate()
        _require(self.flow_head.hidden_size == self.llm.hidden_size, "flow_head.hidden_size must equal llm.hidden_size")
        _require(self.flow_head.latent_dim == self.mingtok.latent_dim, "flow_head.latent_dim must equal mingtok.latent_dim")
        _require(self.connector.in_dim == self.mingtok.semantic_dim, "connector.in_dim must equal mingtok.semantic_dim")
        _require(self.connector.hidden_size == self.llm.hidden_size, "connector.hidden_size must equal llm.hidden_size")
        if self.image_tokens is not None:
            _require(self.image_tokens > 0 and math.isqrt(self.image_tokens) ** 2 == self.image_tokens,
                     f"image_tokens={self.image_tokens} must be a square number (the pixel decoder's grid)")
        _require(self.understanding_image_size % self.mingtok.patch_size == 0,
                 "understanding_image_size must be a multiple of mingtok.patch_size")
        for name in ("image_start", "image_patch", "image_end", "eos"):
            tok = getattr(self.tokens, name)
            _require(0 <= tok < self.llm.vocab_size, f"tokens.{name}={tok} outside the vocabulary (size {self.llm.vocab_size})")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        parts = {"mingtok": MingTokConfig, "llm": LLMConfig, "flow_head": FlowHeadConfig,
                 "connector": ConnectorConfig, "tokens": TokenConfig}
        kwargs = {}
        for key, value in d.items():
            if key in parts:
                sub = dict(value)
                for name, val in sub.items():
                    if isinstance(val, list):  # JSON turns tuples into lists
                        sub[name] = tuple(val)
                kwargs[key] = parts[key](**sub)
            else:
                kwargs[key] = value
        return cls(**kwargs).validate()


def full_config() -> ModelConfig:
    return ModelConfig(name="full").validate()


def tiny_config() -> ModelConfig:
    """The sizes of the upstream golden fixtures (shared/fixtures/upstream)."""
    return ModelConfig(
        name="tiny",
        mingtok=MingTokConfig(image_size=128, patch_size=32, encoder_dim=128, encoder_depth=2, latent_dim=16,
                              semantic_dim=128, semantic_depth=2, pixel_patch_size=16, pixel_dim=128,
                              pixel_depth=2, scaling_factor=2.5, mean=0.3),
        llm=LLMConfig(vocab_size=512, hidden_size=256, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=128,
                      num_experts=8, num_experts_per_tok=2, num_shared_experts=2, moe_intermediate_size=64,
                      intermediate_size=0, max_position_embeddings=256),
        flow_head=FlowHeadConfig(hidden_size=256, width=64, depth=2, mlp_mult=4, latent_dim=16, num_steps=4),
        connector=ConnectorConfig(in_dim=128, hidden_size=256, depth=2),
        tokens=TokenConfig(image_start=500, image_patch=501, image_end=502, eos=503, pad=503,
                           user_prefix=(490,), assistant_prefix=(492,)),  # the tiny tokenizer (runtime/assets)
        understanding_image_size=256,
    ).validate()


PRESETS = {"full": full_config, "tiny": tiny_config}


def get_config(name: str) -> ModelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
