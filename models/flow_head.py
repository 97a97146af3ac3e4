"""The rectified-flow head: vis_head, the AdaLN velocity MLP, and the Euler sampler with CFG.

Convention (UPSTREAM.md 2.3): t = 1 is noise, t = 0 is data, v = data - noise, so Euler integrates
x <- x + v * dt from t = 1 down to t = 1/S. Noise is always an explicit input: one (C,) draw per
prompt, shared by that prompt's CFG rows (upstream draws randn(1, C) and repeats it).

Rows: a batch of B prompts with R CFG rows each is laid out prompt-major, row = b * R + r, with
r = 0 cond, 1 uncond, 2 text-uncond (editing only).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import FlowHeadConfig
from .vit_layers import SwiGLUFFN


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """[cos | sin] sinusoid over `frequency_dim/2` frequencies, then Linear-SiLU-Linear."""

    def __init__(self, width: int, frequency_dim: int, max_period: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.frequency_dim, self.max_period = frequency_dim, max_period
        self.register_buffer("freqs", self._freqs(), persistent=False)

    def _freqs(self) -> torch.Tensor:
        half = self.frequency_dim // 2
        return torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32) / half)

    def _apply(self, fn, recurse=True):
        # fp32, computed on the CPU as upstream does: recomputed after any move or cast, never rounded.
        super()._apply(fn, recurse)
        self._buffers["freqs"] = self._freqs().to(self.freqs.device)
        return self

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        args = t[:, None].float() * self.freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = self.sinusoid(t)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    def __init__(self, width: int, mlp_mult: int, eps: float):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=eps)
        self.mlp = SwiGLUFFN(width, mlp_mult)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int, eps: float):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=eps)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class VelocityNet(nn.Module):
    """v = net(x_t, t, c): x_t (N, C) latent, t (N,) in [0, 1], c (N, Z) condition (Z = W upstream)."""

    def __init__(self, cfg: FlowHeadConfig):
        super().__init__()
        w = cfg.width
        self.time_embed = TimestepEmbedder(w, cfg.frequency_dim, cfg.max_period)
        self.cond_embed = nn.Linear(cfg.condition_dim, w)
        self.input_proj = nn.Linear(cfg.latent_dim, w)
        self.res_blocks = nn.ModuleList(ResBlock(w, cfg.mlp_mult, cfg.norm_eps) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(w, cfg.latent_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(x)
        y = self.time_embed(t * 1000) + self.cond_embed(c)
        for blk in self.res_blocks:
            h = blk(h, y)
        return self.final_layer(h, y)


def euler_schedule(num_steps: int, time_shift: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps t_k (S,) and step sizes dt_k (S,), both fp32, exactly as upstream forms them."""
    if time_shift:
        s = float(time_shift)
        u = torch.linspace(0.0, 1.0, num_steps + 1)
        u = u / (u + s - s * u)
        times = 1 - u
        return times[:-1].clone(), (times[:-1] - times[1:]).clone()
    times = torch.linspace(1.0, 0.0, num_steps + 1)[:-1]
    return times, torch.full((num_steps,), 1.0 / num_steps, dtype=torch.float32)


def guide(v: torch.Tensor, text_cfg, image_cfg, renorm: bool) -> torch.Tensor:
    """Combine per-row velocities (B, R, C), R in {1, 2, 3}, into one guided velocity (B, C).

    One formula serves every R: v_u + image_cfg * (v_tu - v_u) + text_cfg * (v_c - v_tu), where a
    missing text-uncond row is the uncond row and a missing uncond row is the cond row. The extra terms
    are then exact zeros, so R=2 gives upstream's v_u + text_cfg * (v_c - v_u) bit for bit and R=1
    gives v_c; one exported graph covers all three.
    """
    rows = v.shape[1]
    if not 1 <= rows <= 3:
        raise ValueError(f"CFG needs 1, 2 or 3 rows per prompt, got {rows}")
    v_c = v[:, 0]
    v_u = v[:, min(1, rows - 1)]
    v_tu = v[:, min(2, rows - 1)]
    out = v_u + image_cfg * (v_tu - v_u) + text_cfg * (v_c - v_tu)
    if renorm:  # 'channel' renorm: never let the guided velocity be longer than the cond one
        scale = (torch.linalg.vector_norm(v_c, dim=-1, keepdim=True)
                 / torch.linalg.vector_norm(out, dim=-1, keepdim=True) + 1e-8).clamp(0.0, 1.0)
        out = out * scale
    return out


class FlowHead(nn.Module):
    """Holds `net` (key prefix `diffloss.net.` upstream) and runs the whole Euler loop."""

    def __init__(self, cfg: FlowHeadConfig):
        super().__init__()
        self.cfg = cfg
        self.net = VelocityNet(cfg)

    def sample(self, z: torch.Tensor, noise: torch.Tensor, *, text_cfg=3.0, image_cfg=1.1, temperature=1.0,
               time_shift: float | None = None, renorm: bool = False, schedule=None) -> torch.Tensor:
        """z (B*R, W) conditions, prompt-major; noise (B, C) -> latent (B, C) in fp32.

        Every row of a prompt starts from the same noise and the guided velocity moves them together,
        so the state is kept once per prompt. `schedule` = (times, dts) overrides cfg.num_steps/time_shift.
        """
        b, c = noise.shape
        rows = z.shape[0] // b
        if rows * b != z.shape[0]:
            raise ValueError(f"{z.shape[0]} condition rows are not a multiple of {b} noise rows")
        times, dts = schedule if schedule is not None else euler_schedule(self.cfg.num_steps, time_shift)
        times, dts = times.to(z.device), dts.to(z.device)
        x = noise.float() * temperature  # (B, C)
        for k in range(times.shape[0]):
            t = times[k].expand(b * rows)
            x_rows = x[:, None].expand(b, rows, c).reshape(b * rows, c).to(z.dtype)  # (B*R, C)
            v = self.net(x_rows, t, z).view(b, rows, c)
            x = x + guide(v, text_cfg, image_cfg, renorm).float() * dts[k]
        return x


class VisHead(nn.Sequential):
    """LLM final hidden (.., H) -> flow condition (.., W): Linear then LayerNorm (keys vis_head.0/.1)."""

    def __init__(self, cfg: FlowHeadConfig):
        super().__init__(nn.Linear(cfg.hidden_size, cfg.condition_dim), nn.LayerNorm(cfg.condition_dim, eps=cfg.norm_eps))


def draw_noise(generator: torch.Generator | None, batch: int, num_tokens: int, latent_dim: int,
               device=None) -> torch.Tensor:
    """Noise for a whole image up front: (num_tokens + 1, batch, C), one row per LLM step.

    The +1 is the step whose sample upstream discards; drawing it keeps a seed's stream aligned with
    upstream's 257 draws per image.
    """
    return torch.randn(num_tokens + 1, batch, latent_dim, generator=generator, device=device, dtype=torch.float32)


__all__ = ["FlowHead", "VisHead", "VelocityNet", "euler_schedule", "guide", "draw_noise"]
