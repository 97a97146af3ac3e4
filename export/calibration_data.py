"""Inputs for calibration and verification, produced by running the model itself.

A few text-to-image generations run through the eager pieces with a recorder in between, so every
piece sees the tensors it will see in production: prompt prefills, LLM steps over the CFG rows, flow
head conditions, semantic-decoder steps. The generated images (and any user images) feed the encoders.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.config import ModelConfig
from models.flow_head import draw_noise
from models.prompting import cfg_masks
from models.univision import MingUniVision
from runtime import loop
from runtime.backends.torch_eager import RecordingBackend, TorchBackend


def random_prompt(cfg: ModelConfig, gen: torch.Generator, length: int = 8) -> list[int]:
    """A chat-shaped prompt of random text ids: user prefix, text, assistant prefix."""
    special = {cfg.tokens.image_start, cfg.tokens.image_patch, cfg.tokens.image_end, cfg.tokens.eos, cfg.tokens.pad,
               *cfg.tokens.user_prefix, *cfg.tokens.assistant_prefix}
    text = []
    while len(text) < length:
        t = int(torch.randint(0, cfg.llm.vocab_size, (1,), generator=gen))
        if t not in special:
            text.append(t)
    return [*cfg.tokens.user_prefix, *text, *cfg.tokens.assistant_prefix]


def image_ids(cfg: ModelConfig):
    return [cfg.tokens.image_start, cfg.tokens.image_patch, cfg.tokens.image_end]


@torch.no_grad()
def collect_piece_inputs(model: MingUniVision, *, seed: int, num_images: int, prompts: list[list[int]] | None = None,
                         images: torch.Tensor | None = None, limit: int = 64) -> dict[str, list[tuple]]:
    """{piece: [input tuples]} from `num_images` generations (random prompts unless given) plus encodes."""
    cfg = model.cfg
    backend = RecordingBackend(TorchBackend(model), limit=limit)
    gen = torch.Generator().manual_seed(seed)
    dev = backend.device
    generated = []
    for i in range(num_images):
        ids = prompts[i % len(prompts)] if prompts else random_prompt(cfg, gen)
        un, tu = cfg_masks(ids, cfg.tokens.user_prefix, cfg.tokens.assistant_prefix, image_ids(cfg))
        ids_t = torch.tensor([ids], device=dev)
        cache = loop.prefill(backend, cfg, backend.embed(ids_t))
        noise = draw_noise(gen, 1, cfg.num_image_tokens, cfg.mingtok.latent_dim).to(dev)
        steps = loop.generate_image_steps(backend, cfg, cache, uncond_mask=torch.tensor([un], device=dev),
                                          text_uncond_mask=torch.tensor([tu], device=dev), noise=noise,
                                          text_cfg=cfg.text_cfg, image_cfg=cfg.image_cfg, temperature=1.0)
        # Once every per-token piece has `limit` calls, further tokens add nothing: finish the image
        # from the latents so far plus fresh normal draws (the flow head's output distribution).
        image = None
        while image is None:
            try:
                next(steps)
            except StopIteration as stop:
                image = stop.value.image
                break
            if all(len(backend.calls.get(p, [])) >= limit for p in ("llm_step", "flow_head", "semantic_decoder")):
                done = [c[0][:, 0].float() for c in backend.calls["semantic_decoder"]][-limit:]
                z = torch.randn(1, cfg.num_image_tokens, cfg.mingtok.latent_dim, generator=gen).to(dev)
                z[:, :len(done)] = torch.stack(done, dim=1)[:1]
                image = backend.run("pixel_decoder", model.vision.decode_features(z.to(backend.dtype)))[0]
        generated.append(image)
    pool = torch.cat(generated + ([images.to(dev, backend.dtype)] if images is not None else []), dim=0).clamp(-1, 1)
    for name, size in (("encoder", cfg.mingtok.image_size), ("encoder_understanding", cfg.understanding_image_size)):
        x = pool if pool.shape[-1] == size else F.interpolate(pool.float(), size=(size, size), mode="bicubic",
                                                              align_corners=False).clamp(-1, 1)
        for j in range(min(len(x), limit)):
            backend.run(name, x[j:j + 1].to(backend.dtype))
    return backend.calls
