"""The comparison pipeline: the same LLM + flow head generating SD-VAE latents autoregressively.

An SD-VAE image of 512x512 is a (4, 64, 64) latent; patchified 2x2 it is 1024 tokens of 16 values,
where MingTok needs 256 tokens of 32. This generator runs the same per-token CUDA graph as the MingTok
pipeline (LLM step over the CFG rows, vis_head, the flow head's Euler loop with guidance) for 1024
tokens, feeds each latent back through a linear layer (SD-VAE has no semantic decoder), and decodes
with diffusers' AutoencoderKL (SD config, random weights).

Timing-equivalence note: the flow head keeps MingTok's output width (32); the pipeline uses the first
16 channels as the SD-VAE patch. The input/output projections that differ are 0.01% of the head's
weights, so the per-token cost is that of a 16-channel head. Used by benchmarks/speed.py (sdvae-ar).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from runtime.fast.graph import GraphImageGenerator

SD_LATENT_CHANNELS, SD_PATCH = 4, 2
SD_TOKEN_DIM = SD_LATENT_CHANNELS * SD_PATCH * SD_PATCH  # 16


def sd_vae(device, dtype=torch.float16):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=SD_LATENT_CHANNELS,
                         block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                         sample_size=512).to(device, dtype).eval()


class SDVAELatentGenerator(GraphImageGenerator):
    def __init__(self, model, vae, image_size: int = 512, **kwargs):
        super().__init__(model, **kwargs)
        side = image_size // 8 // SD_PATCH  # tokens per side: 32 for 512px
        self.cfg = dataclasses.replace(model.cfg, image_tokens=side * side)
        self.side, self.vae = side, vae
        g = torch.Generator().manual_seed(0)
        proj = nn.Linear(SD_TOKEN_DIM, model.cfg.llm.hidden_size)
        with torch.no_grad():
            proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) * SD_TOKEN_DIM ** -0.5)
        self.latent_proj = proj.to(self.device, self.dtype)

    def _step(self, k) -> None:
        hidden = self._llm_hidden(k)  # (B*R, 1, H)
        noise = k.noise.index_select(0, k.step)[0]
        latent = self.flow(hidden.view(k.b, k.r, -1), noise, *k.scalars)  # (B, 32) fp32
        k.latents.index_copy_(0, k.step, latent[None])
        self._advance(k, self.latent_proj(latent[:, :SD_TOKEN_DIM].to(self.dtype))[:, None])  # (B, 1, H)

    def _decode(self, k) -> torch.Tensor:
        b, s, p = k.b, self.side, SD_PATCH
        tokens = k.latents[:, :, :SD_TOKEN_DIM].transpose(0, 1)  # (B, N, 16)
        z = tokens.reshape(b, s, s, SD_LATENT_CHANNELS, p, p).permute(0, 3, 1, 4, 2, 5)
        z = z.reshape(b, SD_LATENT_CHANNELS, s * p, s * p)  # (B, 4, 64, 64)
        return self.vae.decode(z.to(next(self.vae.parameters()).dtype)).sample
