"""The eager reference pipeline: text-to-image as upstream's `generate_image` runs it, and understanding.

Differences from upstream, all deliberate:
  * the caller's text_cfg / image_cfg are honoured (upstream silently samples with 3.0 / 1.1);
  * noise is explicit, (num_tokens + 1, B, C): one draw per LLM step, the last for the discarded step;
  * the semantic decoder and connector run once per prompt, not once per CFG row (the rows are equal);
  * the semantic decoder's KV cache is always honoured (upstream's CPU fallback drops it).

This is the eager baseline the benchmarks compare against, and the judge the exported engines are
verified against.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .flow_head import draw_noise
from .prompting import generation_rows
from .univision import MingUniVision

logger = logging.getLogger(__name__)


@dataclass
class LLMState:
    """What the LLM remembers: per-layer keys/values (B, kv, T, d) and the key mask (B, T)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    attention_mask: torch.Tensor
    last_hidden: torch.Tensor  # (B, 1, H), final-normed
    logits: torch.Tensor  # (B, 1, V) fp32

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]


@dataclass
class ImageResult:
    latents: torch.Tensor  # (B, N, C) normalised, as the flow head produced them
    features: torch.Tensor  # (B, N, D) semantic features
    image: torch.Tensor  # (B, 3, S, S) in [-1, 1]
    state: LLMState  # cond rows after the image: prompt + <image> + N image tokens
    row_masks: torch.Tensor  # (B, R, T) the CFG rows' key masks at the end
    debug: dict = field(default_factory=dict)


class ReferencePipeline:
    def __init__(self, model: MingUniVision, moe_mode: str = "loop"):
        self.model = model
        self.cfg = model.cfg
        self.moe_mode = moe_mode

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    # -- prompt -----------------------------------------------------------------------------------
    @torch.no_grad()
    def prompt_embeds(self, input_ids: torch.Tensor, images: torch.Tensor | None = None):
        """Embed ids (B, P) and splice image features into the `<imagePatch>` slots, in order.

        images: (B*k, 3, H, W) in [-1, 1], one per image occurrence in reading order.
        Returns embeds (B, P, H) and image_mask (B, P), which routes those slots by image_gate.
        """
        embeds = self.model.embed_tokens(input_ids).to(self.dtype)
        image_mask = input_ids == self.cfg.tokens.image_patch
        n_slots = int(image_mask.sum())
        if images is None:
            if n_slots:
                raise ValueError(f"prompt has {n_slots} <imagePatch> slots but no image was given")
            return embeds, image_mask
        feats = self.model.vision.encode(images.to(self.device, self.dtype))["features"]
        image_embeds = self.model.linear_proj(feats).reshape(-1, embeds.shape[-1])
        if image_embeds.shape[0] != n_slots:
            raise ValueError(f"{image_embeds.shape[0]} image tokens for {n_slots} <imagePatch> slots")
        embeds = embeds.masked_scatter(image_mask[..., None], image_embeds.to(embeds.dtype))
        return embeds, image_mask

    # -- LLM --------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None, state: LLMState | None = None) -> LLMState:
        """Run a prompt (B, L, H) after an optional earlier state; positions continue from it."""
        b, n, _ = embeds.shape
        new_mask = torch.ones(b, n, dtype=torch.long, device=embeds.device) if attention_mask is None else attention_mask
        if state is None:
            keys, values = self.model.llm.empty_cache(b, dtype=self.dtype, device=embeds.device)
            full_mask = new_mask
        else:
            keys, values = state.keys, state.values
            full_mask = torch.cat([state.attention_mask, new_mask.to(state.attention_mask.dtype)], dim=1)
        positions = (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n:]
        hidden, keys, values = self.model.llm(embeds, full_mask, positions, keys, values,
                                              image_mask=image_mask, moe_mode=self.moe_mode)
        last = hidden[:, -1:]
        return LLMState(keys, values, full_mask, last, self.model.model.logits(last))

    # -- text-to-image ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate_image(self, state: LLMState, *, uncond_mask: torch.Tensor | None, text_uncond_mask: torch.Tensor | None,
                       noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       text_cfg: float | None = None, image_cfg: float | None = None, temperature: float = 1.0,
                       record: bool = False) -> ImageResult:
        """Generate one image per prompt after `state` (the prompt, which must end before `<image>`).

        uncond_mask / text_uncond_mask: (B, T) key masks over the state's tokens (see prompting.py).
        noise: (N+1, B, C), or drawn from `generator` up front.
        """
        cfg = self.cfg
        text_cfg = cfg.text_cfg if text_cfg is None else text_cfg
        image_cfg = cfg.image_cfg if image_cfg is None else image_cfg
        n_tok, b = cfg.num_image_tokens, state.keys[0].shape[0]
        dev = state.keys[0].device
        if noise is None:
            noise = draw_noise(generator, b, n_tok, cfg.mingtok.latent_dim).to(dev)
        if noise.shape != (n_tok + 1, b, cfg.mingtok.latent_dim):
            raise ValueError(f"noise must be {(n_tok + 1, b, cfg.mingtok.latent_dim)}, got {tuple(noise.shape)}")

        # Rows: cond, uncond[, text-uncond] per prompt, prompt-major; the `<image>` token is visible to all.
        ones = torch.ones(b, 1, dtype=state.attention_mask.dtype, device=dev)
        rows = generation_rows(torch.cat([state.attention_mask, ones], dim=1), uncond_mask, text_uncond_mask)
        r = rows.shape[1]
        mask = rows.reshape(b * r, -1)  # (B*R, T+1)
        keys = [k.repeat_interleave(r, dim=0) for k in state.keys]  # uncond rows reuse the cond prefill
        values = [v.repeat_interleave(r, dim=0) for v in state.values]
        start = self.model.embed_tokens(torch.full((b, 1), cfg.tokens.image_start, device=dev)).to(self.dtype)
        embeds = start.repeat_interleave(r, dim=0)  # (B*R, 1, H)

        sem = self.model.vision.semantic_decoder
        sem_k, sem_v = sem.empty_cache(b, dtype=self.dtype, device=dev)
        latents, feats, debug = [], [], {"position_ids": [], "hidden": [], "condition": []}
        for i in range(n_tok + 1):
            positions = (mask.long().cumsum(-1) - 1)[:, -1:]  # per row: its own visible-token count - 1
            hidden, keys, values = self.model.llm(embeds, mask, positions, keys, values, moe_mode=self.moe_mode)
            z = self.model.model.vis_head(hidden[:, -1])  # (B*R, W)
            latent = self.model.flow_head.sample(z, noise[i], text_cfg=text_cfg, image_cfg=image_cfg,
                                                 temperature=temperature)  # (B, C)
            if record:
                debug["position_ids"].append(positions[:, 0])
                debug["hidden"].append(hidden[:, -1])
                debug["condition"].append(z)
            if i == n_tok:  # upstream samples once more and discards it; the LLM step still counts
                break
            latents.append(latent)
            f, sem_k, sem_v = sem.forward_cached(self.model.vision.denormalize(latent[:, None].to(self.dtype)), sem_k, sem_v)
            feats.append(f)
            embeds = self.model.linear_proj(f).repeat_interleave(r, dim=0)
            mask = torch.cat([mask, torch.ones(b * r, 1, dtype=mask.dtype, device=dev)], dim=1)

        features = torch.cat(feats, dim=1)  # (B, N, D)
        image = self.model.vision.decode_pixels(features)
        last = hidden[::r, -1:]
        out_state = LLMState([k[::r] for k in keys], [v[::r] for v in values], mask[::r], last,
                             self.model.model.logits(last))
        if record:
            debug = {k: torch.stack(v) for k, v in debug.items()}
        return ImageResult(torch.stack(latents, dim=1).float(), features, image, out_state,
                           mask.view(b, r, -1), debug if record else {})

    # -- understanding ----------------------------------------------------------------------------
    @torch.no_grad()
    def greedy_decode(self, state: LLMState, max_new_tokens: int, stop_ids=()) -> tuple[list[list[int]], LLMState]:
        """Greedy text after a prefilled state (B prompts); stops per prompt at a stop id."""
        b = state.keys[0].shape[0]
        out: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        stop = set(stop_ids)
        for _ in range(max_new_tokens):
            token = state.logits[:, -1].argmax(-1)  # (B,)
            for j, t in enumerate(token.tolist()):
                if not done[j]:
                    out[j].append(t)
                    done[j] = t in stop
            if all(done):
                break
            state = self.prefill(self.model.embed_tokens(token[:, None]).to(self.dtype), state=state)
        return out, state

    @torch.no_grad()
    def describe(self, input_ids: torch.Tensor, images: torch.Tensor | None, max_new_tokens: int = 64,
                 stop_ids=None) -> list[int]:
        """Image understanding: prompt with image slots -> greedy answer token ids (batch of one)."""
        embeds, image_mask = self.prompt_embeds(input_ids.to(self.device), images)
        state = self.prefill(embeds, image_mask=image_mask)
        stop = (self.cfg.tokens.eos,) if stop_ids is None else stop_ids
        tokens, _ = self.greedy_decode(state, max_new_tokens, stop)
        return tokens[0]
