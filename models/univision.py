"""The composite Ming-UniVision model: `vision` (MingTok), `model` (LLM + heads), `linear_proj` (connector).

Attribute names equal the released composite's key prefixes (`vision.`, `model.`, `linear_proj.`), so
`state_dict()` keys are the upstream keys once MingTok's `blocks.0.<i>` nesting is applied
(see checkpoint.upstream_to_ours).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import ConnectorConfig, ModelConfig
from .llm import LanguageModel
from .mingtok import MingTok

logger = logging.getLogger(__name__)

PREFIXES = {"vision": "vision.", "llm": "model.", "linear_proj": "linear_proj."}


class Connector(nn.Sequential):
    """Semantic features (.., D) -> LLM embeddings (.., H): Linear, then (GELU, Linear) x (depth-1)."""

    def __init__(self, cfg: ConnectorConfig):
        layers: list[nn.Module] = [nn.Linear(cfg.in_dim, cfg.hidden_size)]
        for _ in range(cfg.depth - 1):
            layers += [nn.GELU(), nn.Linear(cfg.hidden_size, cfg.hidden_size)]
        super().__init__(*layers)


class MingUniVision(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.vision = MingTok(cfg.mingtok)
        self.model = LanguageModel(cfg.llm, cfg.flow_head)
        self.linear_proj = Connector(cfg.connector)

    @property
    def llm(self):
        return self.model.model

    @property
    def flow_head(self):
        return self.model.diffloss

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llm.word_embeddings(input_ids.clamp(0, self.cfg.llm.vocab_size - 1))


def seeded_init_(model: nn.Module, seed: int = 0, device=None) -> nn.Module:
    """The fixtures' recipe: norm weights 1 + 0.1 N(0,1), every other tensor 0.05 N(0,1), on the bf16 grid.

    Values on the bf16 grid load losslessly in bf16 and fp32, so one tiny model serves every precision.
    The draws come from a generator on `device` (default CPU): a seed gives the same weights only on
    the same kind of device.
    """
    gen = torch.Generator(device=device or "cpu").manual_seed(seed)
    norm_params = set()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) or type(module).__name__ == "RMSNorm":
            if getattr(module, "weight", None) is not None:
                norm_params.add(id(module.weight))
    with torch.no_grad():
        for _, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, device=gen.device)
            value = 1 + 0.1 * noise if id(p) in norm_params else 0.05 * noise
            p.copy_(value.to(torch.bfloat16))
    return model


def build(cfg: ModelConfig, *, seed: int | None = 0, device=None, dtype=torch.float32,
          fast_init: bool | None = None) -> MingUniVision:
    """A model with seeded random weights (seed=None: leave PyTorch's default init).

    fast_init (default: for the full model on a GPU) allocates directly on the device and draws the
    weights there, instead of initialising 18.8 B parameters on the CPU first.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if fast_init is None:
        fast_init = device.type == "cuda" and cfg.name == "full"
    if fast_init and seed is not None:
        # cast on the meta device, then allocate: the full model never exists in fp32 (70 GB) on the GPU
        model = build_meta(cfg).to(dtype).to_empty(device=device)  # the models hold no derived buffers
        seeded_init_(model, seed, device)
        return model.eval()
    model = MingUniVision(cfg)
    if seed is not None:
        seeded_init_(model, seed)
    return model.to(device=device, dtype=dtype).eval()


def build_meta(cfg: ModelConfig) -> MingUniVision:
    """The model on the meta device: names and shapes without memory (full size fits anywhere)."""
    with torch.device("meta"):
        return MingUniVision(cfg)


def load_checkpoint(model: MingUniVision, checkpoint: str | Path, mingtok_checkpoint: str | Path | None = None) -> MingUniVision:
    """Load the composite checkpoint (keys `vision.`, `model.`, `linear_proj.`).

    As upstream does, MingTok may come from its own checkpoint (bare keys) and any `vision.*` keys of
    the composite are laid over it; the log says how many were overlaid.
    """
    state = dict(ckpt.read_dir(checkpoint))
    if mingtok_checkpoint is not None:
        base = {PREFIXES["vision"] + k: v for k, v in ckpt.read_dir(mingtok_checkpoint).items()}
        overlay = [k for k in state if k.startswith(PREFIXES["vision"])]
        logger.info("MingTok from %s; %d vision.* keys of %s laid over it", mingtok_checkpoint, len(overlay), checkpoint)
        base.update(state)
        state = base
    ckpt.load_into(model, state, what=f"checkpoint {checkpoint}")
    return model


def load_parts(model: MingUniVision, *, mingtok: dict, llm: dict, linear_proj: dict) -> MingUniVision:
    """Load three separately keyed state dicts (as the upstream fixtures store them)."""
    state = {}
    for part, prefix in (("vision", mingtok), ("llm", llm), ("linear_proj", linear_proj)):
        state.update({PREFIXES[part] + k: v for k, v in prefix.items()})
    ckpt.load_into(model, state, what="checkpoint parts")
    return model
