"""Random small DiT- and UNet-like denoisers for property tests.

Each model takes ``(sample, timestep)`` and has what matters to the passes: a sinusoidal timestep
embedding and its MLP, timestep-conditioned blocks (adaLN modulation for DiT-like, a time projection
added to the features for UNet-like), convolutions, linears, attention through SDPA, residual
connections, a shared (reused) input tensor for q/k/v, and int64 inputs that must never be quantized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RandomDenoiserConfig", "build_random_denoiser"]


@dataclass(frozen=True)
class RandomDenoiserConfig:
    kind: str = "dit"  # "dit" or "unet"
    channels: int = 4
    size: int = 8
    width: int = 32
    depth: int = 2
    heads: int = 2
    attention: bool = True
    temb_dim: int = 32
    seed: int = 0


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _TimeMLP(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.dim = dim
        self.linear_1 = nn.Linear(dim, out)
        self.linear_2 = nn.Linear(out, out)

    def forward(self, t):
        return self.linear_2(F.silu(self.linear_1(sinusoid(t, self.dim))))


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(width, width)
        self.to_v = nn.Linear(width, width)
        self.to_out = nn.Linear(width, width)

    def forward(self, x):
        b, n, c = x.shape
        h = self.heads

        def split(y):
            return y.view(b, n, h, c // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)))
        return self.to_out(y.transpose(1, 2).reshape(b, n, c))


class _DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, temb: int, attention: bool):
        super().__init__()
        self.adaln = nn.Linear(temb, 4 * width)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.attn = _Attention(width, heads) if attention else None
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x, c):
        shift1, scale1, shift2, scale2 = self.adaln(F.silu(c)).chunk(4, dim=-1)
        h = self.norm1(x) * (1 + scale1[:, None]) + shift1[:, None]
        if self.attn is not None:
            x = x + self.attn(h)
        h = self.norm2(x) * (1 + scale2[:, None]) + shift2[:, None]
        return x + self.fc2(F.gelu(self.fc1(h)))


class RandomDiT(nn.Module):
    def __init__(self, cfg: RandomDenoiserConfig):
        super().__init__()
        self.cfg = cfg
        self.patch = nn.Conv2d(cfg.channels, cfg.width, 2, stride=2)
        self.time = _TimeMLP(cfg.temb_dim, cfg.temb_dim)
        self.blocks = nn.ModuleList(_DiTBlock(cfg.width, cfg.heads, cfg.temb_dim, cfg.attention)
                                    for _ in range(cfg.depth))
        self.out = nn.Linear(cfg.width, cfg.channels * 4)

    def forward(self, sample, timestep):
        b, _, hh, ww = sample.shape
        x = self.patch(sample).flatten(2).transpose(1, 2)
        c = self.time(timestep)
        for blk in self.blocks:
            x = blk(x, c)
        x = self.out(x)
        return x.view(b, hh // 2, ww // 2, self.cfg.channels, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(sample.shape)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(4, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(4, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, c):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(c))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.skip(x) if self.skip is not None else x)


class RandomUNet(nn.Module):
    def __init__(self, cfg: RandomDenoiserConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.conv_in = nn.Conv2d(cfg.channels, w, 3, padding=1)
        self.time = _TimeMLP(cfg.temb_dim, cfg.temb_dim)
        self.down = nn.ModuleList(_ResBlock(w if i == 0 else 2 * w, 2 * w, cfg.temb_dim) for i in range(cfg.depth))
        self.attn = _Attention(2 * w, cfg.heads) if cfg.attention else None
        self.up = _ResBlock(3 * w, w, cfg.temb_dim)
        self.norm_out = nn.GroupNorm(4, w)
        self.conv_out = nn.Conv2d(w, cfg.channels, 3, padding=1)

    def forward(self, sample, timestep):
        c = self.time(timestep)
        h0 = self.conv_in(sample)
        h = h0
        for blk in self.down:
            h = blk(h, c)
        if self.attn is not None:
            b, ch, hh, ww = h.shape
            seq = h.flatten(2).transpose(1, 2)
            h = h + self.attn(seq).transpose(1, 2).reshape(b, ch, hh, ww)
        h = self.up(torch.cat([h, h0], dim=1), c)
        return self.conv_out(F.silu(self.norm_out(h)))


def build_random_denoiser(cfg: RandomDenoiserConfig) -> nn.Module:
    torch.manual_seed(cfg.seed)
    model = RandomDiT(cfg) if cfg.kind == "dit" else RandomUNet(cfg)
    return model.eval()
