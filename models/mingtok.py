"""MingTok: the continuous visual tokenizer (low-level encoder, causal semantic decoder, pixel decoder).

Layout facts that matter for equivalence (UPSTREAM.md 1.3-1.6):
  * the encoder appends its cls token AFTER the patch tokens; pos_embed's last row is the cls position;
  * the encoder's out layer adds a shortcut averaging contiguous channel groups;
  * the semantic decoder's in_proj adds a shortcut repeating every latent channel contiguously;
  * neither decoder has a positional embedding; the semantic decoder is causal;
  * sem_to_pix lays its output out as (x, y, c) and the pixel head as (row, col, channel).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import MingTokConfig
from .vit_layers import Block


class PatchEmbed(nn.Module):
    """The checkpoint's stride-p, p x p `proj` Conv2d. On a GPU it runs as one GEMM over the patches: the same
    sums (each output is one patch dotted with one filter) in another order; the convolution took an
    implicit-GEMM fallback there, 226 us at 512 px on an H200 (benchmarks/results/
    tokenizer_modes_h200_s8_start.json).
    On the CPU it stays the convolution upstream ran, which the golden fixtures were made with, and so does
    every export (ONNX, torch.export) on any device: an exported graph does not depend on where it was made,
    and TensorRT / onnxruntime get the Conv they have their own kernels for."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.is_cuda and not torch.compiler.is_exporting():
            return self.as_gemm(image)
        return self.proj(image).flatten(2).transpose(1, 2)  # (B, 3, H, W) -> (B, gh*gw, D), raster order

    def as_gemm(self, image: torch.Tensor) -> torch.Tensor:
        b, c, h, w = image.shape
        p = self.proj.kernel_size[0]
        gh, gw = h // p, w // p  # a remainder is dropped, as the convolution drops it
        # (B, C, gh*p, gw*p) -> (B, gh, gw, C, p, p): raster order of patches, each in the filter's (C, kh, kw) order
        patches = image[:, :, :gh * p, :gw * p].reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
        weight = self.proj.weight.reshape(self.proj.out_channels, c * p * p)  # (D, C*p*p)
        return F.linear(patches.reshape(b, gh * gw, c * p * p), weight, self.proj.bias)  # (B, gh*gw, D)


class LowLevelEncoder(nn.Module):
    def __init__(self, cfg: MingTokConfig):
        super().__init__()
        d = cfg.encoder_dim
        self.patch_size = cfg.patch_size
        self.grid = cfg.grid
        self.patch_embed = PatchEmbed(cfg.patch_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens + 1, d))
        self.blocks = nn.ModuleList(Block(d, cfg.head_dim, cfg.mlp_ratio, cfg.encoder_ffn, cfg.norm_eps) for _ in range(cfg.encoder_depth))
        self.out_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(d, cfg.latent_dim)

    def position_embedding(self, gh: int, gw: int) -> torch.Tensor:
        """pos_embed for a gh x gw patch grid (+ cls last); bicubic resize as DINOv2 does it."""
        if gh == self.grid and gw == self.grid:
            return self.pos_embed
        m = self.grid
        table = self.pos_embed.float()
        patch = table[:, :-1].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        # A scale factor with the historical +0.1 offset, not a target size: it sets the sampling grid.
        patch = F.interpolate(patch, scale_factor=((gh + 0.1) / m, (gw + 0.1) / m), mode="bicubic", antialias=False)
        if patch.shape[-2:] != (gh, gw):
            raise ValueError(f"position-embedding resize gave {tuple(patch.shape[-2:])}, expected {(gh, gw)}")
        patch = patch.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([patch, table[:, -1:]], dim=1).to(self.pos_embed.dtype)

    def tokens(self, image: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens then the cls token, plus position embeddings: (B, N+1, D).

        pos_embed: a precomputed `position_embedding(gh, gw)` (exported pieces bake it in per resolution).
        """
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"expected an image batch (B, 3, H, W), got {tuple(image.shape)}")
        gh, gw = image.shape[-2] // self.patch_size, image.shape[-1] // self.patch_size
        if gh * self.patch_size != image.shape[-2] or gw * self.patch_size != image.shape[-1]:
            raise ValueError(f"image size {tuple(image.shape[-2:])} is not a multiple of the patch size {self.patch_size}")
        x = self.patch_embed(image)
        x = torch.cat([x, self.cls_token.expand(x.shape[0], -1, -1)], dim=1)
        return x + (self.position_embedding(gh, gw) if pos_embed is None else pos_embed)

    def forward(self, image: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> raw latents (B, N+1, C), the cls token last."""
        x = self.tokens(image, pos_embed)
        for blk in self.blocks:
            x = blk(x)
        b, n, d = x.shape
        c = self.out_proj.out_features
        shortcut = x.view(b, n, c, d // c).mean(-1)  # channel c averages inputs [c*d/C, (c+1)*d/C)
        return shortcut + self.out_proj(F.gelu(self.out_norm(x)))


class SemanticDecoder(nn.Module):
    """Causal transformer from raw latents (B, N, C) to semantic features (B, N, D)."""

    def __init__(self, cfg: MingTokConfig):
        super().__init__()
        d = cfg.semantic_dim
        self.repeat = d // cfg.latent_dim
        self.num_heads = d // cfg.head_dim
        self.head_dim = cfg.head_dim
        self.in_proj = nn.Linear(cfg.latent_dim, d)
        self.blocks = nn.ModuleList(Block(d, cfg.head_dim, cfg.mlp_ratio, cfg.semantic_ffn, cfg.norm_eps) for _ in range(cfg.semantic_depth))
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)

    def embed(self, raw: torch.Tensor) -> torch.Tensor:
        return self.in_proj(raw) + raw.repeat_interleave(self.repeat, dim=-1)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        """Full causal pass, no cache: every token's feature (cls included if the caller passed it)."""
        x = self.embed(raw)
        for blk in self.blocks:
            x = blk(x, causal=True)
        return self.norm(x)

    def forward_cached(self, raw, past_keys: list[torch.Tensor], past_values: list[torch.Tensor]):
        """N new tokens after a cache of P: features (B, N, D) and present caches (B, H, P+N, d)."""
        x = self.embed(raw)
        keys, values = [], []
        for blk, pk, pv in zip(self.blocks, past_keys, past_values):
            x, k, v = blk.forward_cached(x, pk, pv)
            keys.append(k)
            values.append(v)
        return self.norm(x), keys, values

    def forward_static(self, raw, k_caches, v_caches, cache_position, fused: bool = False):
        """Like forward_cached, but writes into preallocated (B, H, S_max, d) buffers in place.
        fused: one-token steps use the decode-attention kernel prepare_decode installed."""
        x = self.embed(raw)
        for blk, kc, vc in zip(self.blocks, k_caches, v_caches):
            x = blk.forward_static(x, kc, vc, cache_position, fused)
        return self.norm(x)

    def empty_cache(self, batch: int, dtype=torch.float32, device=None, length: int = 0):
        shape = (batch, self.num_heads, length, self.head_dim)
        return ([torch.zeros(shape, dtype=dtype, device=device) for _ in self.blocks],
                [torch.zeros(shape, dtype=dtype, device=device) for _ in self.blocks])


class PixelDecoder(nn.Module):
    """Bidirectional transformer over the (G*r)^2 pixel tokens; no positional embedding."""

    def __init__(self, cfg: MingTokConfig):
        super().__init__()
        d = cfg.pixel_dim
        self.patch_size = cfg.pixel_patch_size
        self.blocks = nn.ModuleList(Block(d, cfg.head_dim, cfg.mlp_ratio, "mlp", cfg.norm_eps) for _ in range(cfg.pixel_depth))
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.head = nn.Linear(d, cfg.pixel_patch_size ** 2 * 3)

    def head_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, g*g, D) pixel tokens -> (B, g*g, p*p*3) patches laid out (row, col, channel)."""
        x = tokens
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))

    def forward(self, tokens: torch.Tensor, grid: int) -> torch.Tensor:
        """(B, grid*grid, D) pixel tokens -> (B, 3, grid*p, grid*p), not clamped."""
        out = self.head_tokens(tokens)
        b = out.shape[0]
        g, p = grid, self.patch_size
        # (B, g, g, p, p, 3) laid out (row, col, channel) -> image (B, 3, g*p, g*p)
        return out.view(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, g * p, g * p)


class MingTok(nn.Module):
    def __init__(self, cfg: MingTokConfig):
        super().__init__()
        self.cfg = cfg
        self.low_level_encoder = LowLevelEncoder(cfg)
        self.semantic_decoder = SemanticDecoder(cfg)
        self.pixel_decoder = PixelDecoder(cfg)
        self.sem_to_pix = nn.Linear(cfg.semantic_dim, cfg.pixel_dim * cfg.pixel_ratio ** 2)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.cfg.mean) / self.cfg.scaling_factor

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.cfg.scaling_factor + self.cfg.mean

    def encode_latents(self, image: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> normalised latents (B, N + 1, C), cls last: the tokenizer's encode
        alone (what an SD-VAE encode gives), without the semantic features that `encode` adds."""
        return self.normalize(self.low_level_encoder(image, pos_embed))

    def encode(self, image: torch.Tensor, pos_embed: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Image (B, 3, H, W) in [-1, 1] -> normalised latents (cls last) and patch features.

        The semantic decoder sees the raw latents including cls; being causal, the patch features
        never see the cls, which is dropped afterwards.
        """
        raw = self.low_level_encoder(image, pos_embed)
        features = self.semantic_decoder(raw)[:, :-1]
        return {"latent": self.normalize(raw), "latent_raw": raw, "features": features}

    def decode_features(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, N, C) -> features (B, N, D) by one parallel causal pass."""
        return self.semantic_decoder(self.denormalize(z))

    def features_to_pixel_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(B, G*G, D) semantic features -> (B, (G*r)^2, D_pix): each token becomes an r x r block."""
        b, n, _ = features.shape
        g, r = math.isqrt(n), self.cfg.pixel_ratio  # n is a fixed size, also when exported
        if g * g != n:
            raise ValueError(f"the pixel decoder takes a square grid of semantic tokens, got {n}")
        t = self.sem_to_pix(features).view(b, g, g, r, r, -1)  # (B, h, w, x, y, c)
        return t.permute(0, 1, 3, 2, 4, 5).reshape(b, g * g * r * r, -1)  # row-major over (h x, w y)

    def decode_pixels(self, features: torch.Tensor) -> torch.Tensor:
        """Semantic features (B, N, D) -> image (B, 3, S, S) clamped to [-1, 1]."""
        tokens = self.features_to_pixel_tokens(features)
        return self.pixel_decoder(tokens, math.isqrt(features.shape[1]) * self.cfg.pixel_ratio).clamp(-1.0, 1.0)
