"""The autoregressive loop over the five pieces, independent of the backend that runs them.

A backend is anything with `run(piece_name, *tensors) -> tuple[tensor, ...]` following
`models.contract` (torch modules, onnxruntime sessions, TensorRT engines). Tensors stay torch tensors
on the backend's device throughout; nothing here reads a value back to the host inside the token loop
except where the caller asks (progress callbacks get the step index, not tensors).

Row layout: B prompts x R CFG rows, prompt-major (row = b * R + r); see models/contract.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from models.config import ModelConfig
from models.prompting import generation_rows

from .errors import Cancelled


class Backend(Protocol):
    device: torch.device
    dtype: torch.dtype  # the pieces' compute precision for "float" tensors

    def run(self, piece: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...  # (B, L) -> (B, L, H)


@dataclass
class LLMCache:
    """Per-layer keys/values flattened as the contract orders them, plus the key mask (B, T)."""

    kv: tuple[torch.Tensor, ...]
    attention_mask: torch.Tensor
    last_hidden: torch.Tensor  # (B, 1, H)
    logits: torch.Tensor  # (B, 1, V)

    @property
    def length(self) -> int:
        return self.kv[0].shape[2]


@dataclass
class LoopImage:
    latents: torch.Tensor  # (B, N, C)
    features: torch.Tensor  # (B, N, D)
    image: torch.Tensor  # (B, 3, S, S) in [-1, 1]
    cache: LLMCache  # cond rows after the image
    row_masks: torch.Tensor  # (B, R, T)


def empty_llm_kv(cfg: ModelConfig, batch: int, dtype, device) -> tuple[torch.Tensor, ...]:
    shape = (batch, cfg.llm.num_kv_heads, 0, cfg.llm.head_dim)
    return tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * cfg.llm.num_layers))


def empty_semantic_kv(cfg: ModelConfig, batch: int, dtype, device) -> tuple[torch.Tensor, ...]:
    mt = cfg.mingtok
    shape = (batch, mt.semantic_dim // mt.head_dim, 0, mt.head_dim)
    return tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * mt.semantic_depth))


def llm_forward(backend: Backend, piece: str, embeds, attention_mask, image_mask, kv) -> LLMCache:
    """One LLM call after `kv`; attention_mask covers cache + new tokens, positions follow from it."""
    n = embeds.shape[1]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n:]
    if image_mask is None:
        image_mask = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
    out = backend.run(piece, embeds.to(backend.dtype), attention_mask.long(), positions, image_mask, *kv)
    return LLMCache(tuple(out[2:]), attention_mask, out[0], out[1])


def prefill(backend: Backend, cfg: ModelConfig, embeds, attention_mask=None, image_mask=None,
            cache: LLMCache | None = None) -> LLMCache:
    b, n, _ = embeds.shape
    new = torch.ones(b, n, dtype=torch.long, device=embeds.device) if attention_mask is None else attention_mask.long()
    if cache is None:
        kv, mask = empty_llm_kv(cfg, b, backend.dtype, embeds.device), new
    else:
        kv, mask = cache.kv, torch.cat([cache.attention_mask, new], dim=1)
    return llm_forward(backend, "llm_prefill", embeds, mask, image_mask, kv)


def generate_image_steps(backend: Backend, cfg: ModelConfig, cache: LLMCache, *, uncond_mask, text_uncond_mask,
                         noise: torch.Tensor, text_cfg: float, image_cfg: float, temperature: float,
                         should_stop: Callable[[], bool] | None = None):
    """Upstream's image-generation loop over the pieces, as a generator.

    Yields the number of image tokens done after each one; returns a LoopImage (StopIteration.value).
    noise: (N+1, B, C) drawn up front. should_stop is polled before every step (cooperative cancel).
    """
    dev, n_tok = cache.kv[0].device, cfg.num_image_tokens
    b = cache.kv[0].shape[0]
    ones = torch.ones(b, 1, dtype=torch.long, device=dev)
    rows = generation_rows(torch.cat([cache.attention_mask.long(), ones], 1),
                           None if uncond_mask is None else uncond_mask.to(dev),
                           None if text_uncond_mask is None else text_uncond_mask.to(dev))
    r = rows.shape[1]
    mask = rows.reshape(b * r, -1)
    kv = tuple(t.repeat_interleave(r, dim=0) for t in cache.kv)  # uncond rows reuse the cond prefill
    start = torch.full((b * r, 1), cfg.tokens.image_start, dtype=torch.long, device=dev)
    embeds = backend.embed(start)  # (B*R, 1, H)
    scalars = [torch.tensor([v], dtype=torch.float32, device=dev) for v in (text_cfg, image_cfg, temperature)]
    sem_kv = empty_semantic_kv(cfg, b, backend.dtype, dev)
    no_image = torch.zeros(b * r, 1, dtype=torch.bool, device=dev)
    latents, feats = [], []
    for i in range(n_tok + 1):
        if should_stop is not None and should_stop():
            raise Cancelled(f"generation cancelled after {i} of {n_tok} image tokens")
        step = llm_forward(backend, "llm_step", embeds, mask, no_image, kv)
        kv = step.kv
        latent = backend.run("flow_head", step.last_hidden.view(b, r, -1), noise[i].to(dev), *scalars)[0]  # (B, C)
        if i == n_tok:  # upstream samples once more and discards it; the LLM step still extends the cache
            break
        f, e, *sem_kv = backend.run("semantic_decoder", latent[:, None].to(backend.dtype), *sem_kv)
        latents.append(latent)
        feats.append(f)
        embeds = e.repeat_interleave(r, dim=0)
        mask = torch.cat([mask, torch.ones(b * r, 1, dtype=mask.dtype, device=dev)], dim=1)
        yield i + 1
    features = torch.cat(feats, dim=1)
    image = backend.run("pixel_decoder", features)[0]
    out = LLMCache(tuple(t[::r] for t in kv), mask[::r], step.last_hidden[::r], step.logits[::r])
    return LoopImage(torch.stack(latents, dim=1).float(), features, image, out, mask.view(b, r, -1))


def drive(steps, on_token: Callable[[int, int], None] | None, total: int):
    """Run a step generator to the end; on_token(done, total) after every step; return its value."""
    while True:
        try:
            done = next(steps)
        except StopIteration as stop:
            return stop.value
        if on_token is not None:
            on_token(done, total)


def generate_image(backend: Backend, cfg: ModelConfig, cache: LLMCache, *, on_token=None, **kwargs) -> LoopImage:
    """Run generate_image_steps to the end; on_token(done, total) after every image token."""
    return drive(generate_image_steps(backend, cfg, cache, **kwargs), on_token, cfg.num_image_tokens)


def greedy_decode(backend: Backend, cfg: ModelConfig, cache: LLMCache, max_new_tokens: int, stop_ids=(),
                  should_stop: Callable[[], bool] | None = None):
    """Greedy tokens for a batch of one after a prefilled cache; returns (tokens, cache).

    The returned cache holds every token but the last one produced (as Hugging Face generate leaves it).
    """
    tokens: list[int] = []
    stop = set(stop_ids)
    for _ in range(max_new_tokens):
        if should_stop is not None and should_stop():
            raise Cancelled(f"decoding cancelled after {len(tokens)} tokens")
        token = cache.logits[:, -1].argmax(-1)  # (1,)
        t = int(token[0])  # the host needs the id to decide whether to stop: one sync per text token
        tokens.append(t)
        if t in stop or len(tokens) == max_new_tokens:
            break
        embeds = backend.embed(token[:, None])
        mask = torch.cat([cache.attention_mask, torch.ones_like(cache.attention_mask[:, :1])], dim=1)
        cache = llm_forward(backend, "llm_step", embeds, mask, None, cache.kv)
    return tokens, cache
