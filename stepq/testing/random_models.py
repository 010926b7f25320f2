"""Random small DiT- and UNet-like denoisers for property tests.

Each model takes ``(sample, timestep)`` and has what matters to the passes: a sinusoidal timestep
embedding and its MLP, timestep-conditioned blocks (adaLN modulation for DiT-like, a time projection
added to the features for UNet-like), convolutions, linears, attention through SDPA, residual
connections, a shared (reused) input tensor for q/k/v, and int64 inputs that must never be quantized.
The timestep may be a [B] tensor or a scalar (broadcast to the batch), integer or float.

Optional conditioning, off by default (a default config builds exactly the model it always did):
``num_classes > 0`` adds a ``class_labels`` input ([B] int64, embedded and added to the timestep
embedding, as in DiT); ``context_dim > 0`` adds an ``encoder_hidden_states`` input ([B, L,
context_dim], text-encoder-like) read by a cross-attention in every DiT block or after the UNet's
middle attention. Both are ``conditioning`` inputs: the layers that read only them never depend on
the sample.
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
    num_classes: int = 0  # > 0: a class_labels input
    context_dim: int = 0  # > 0: an encoder_hidden_states input [B, context_len, context_dim]
    context_len: int = 4

    def __post_init__(self) -> None:
        if self.kind not in ("dit", "unet"):
            raise ValueError(f"RandomDenoiserConfig.kind must be 'dit' or 'unet', got {self.kind!r}")
        if self.num_classes < 0 or self.context_dim < 0 or self.context_len < 1:
            raise ValueError("RandomDenoiserConfig: num_classes and context_dim must be >= 0, context_len >= 1")

    def example_inputs(self, batch: int = 2, timestep: torch.Tensor | None = None, seed: int = 0) -> dict:
        """Inputs at ``batch``: a standard-normal sample, ``timestep`` (default: spread over [0, 1000)),
        and the conditioning inputs the config asks for."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, self.channels, self.size, self.size, generator=g)
        t = timestep if timestep is not None else torch.linspace(0, 999, batch).round().to(torch.int64)
        out: dict = {"sample": x, "timestep": t}
        if self.num_classes:
            out["class_labels"] = torch.randint(0, self.num_classes, (batch,), generator=g)
        if self.context_dim:
            out["encoder_hidden_states"] = torch.randn(batch, self.context_len, self.context_dim, generator=g)
        return out


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


class _CrossAttention(nn.Module):
    """Queries from the features, keys and values from the context (q from x, k/v from the text)."""

    def __init__(self, width: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(context_dim, width)
        self.to_v = nn.Linear(context_dim, width)
        self.to_out = nn.Linear(width, width)

    def forward(self, x, ctx):
        b, n, c = x.shape
        h = self.heads

        def split(y):
            return y.view(b, y.shape[1], h, c // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(ctx)), split(self.to_v(ctx)))
        return self.to_out(y.transpose(1, 2).reshape(b, n, c))


class _DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, temb: int, attention: bool, context_dim: int = 0):
        super().__init__()
        self.adaln = nn.Linear(temb, 4 * width)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.attn = _Attention(width, heads) if attention else None
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        # created last, so a config without context initialises every other layer as before
        self.cross = _CrossAttention(width, context_dim, heads) if context_dim else None

    def forward(self, x, c, ctx=None):
        shift1, scale1, shift2, scale2 = self.adaln(F.silu(c)).chunk(4, dim=-1)
        h = self.norm1(x) * (1 + scale1[:, None]) + shift1[:, None]
        if self.attn is not None:
            x = x + self.attn(h)
        if self.cross is not None and ctx is not None:
            x = x + self.cross(x, ctx)
        h = self.norm2(x) * (1 + scale2[:, None]) + shift2[:, None]
        return x + self.fc2(F.gelu(self.fc1(h)))


def _batch_timestep(timestep: torch.Tensor, batch: int) -> torch.Tensor:
    # static under torch.export (the rank is known), so a [B] timestep traces exactly as before
    return timestep.reshape(1).expand(batch) if timestep.dim() == 0 else timestep


class RandomDiT(nn.Module):
    def __init__(self, cfg: RandomDenoiserConfig):
        super().__init__()
        self.cfg = cfg
        self.patch = nn.Conv2d(cfg.channels, cfg.width, 2, stride=2)
        self.time = _TimeMLP(cfg.temb_dim, cfg.temb_dim)
        self.blocks = nn.ModuleList(_DiTBlock(cfg.width, cfg.heads, cfg.temb_dim, cfg.attention, cfg.context_dim)
                                    for _ in range(cfg.depth))
        self.out = nn.Linear(cfg.width, cfg.channels * 4)
        self.class_embedding = nn.Embedding(cfg.num_classes, cfg.temb_dim) if cfg.num_classes else None

    def forward(self, sample, timestep, class_labels=None, encoder_hidden_states=None):
        b, _, hh, ww = sample.shape
        x = self.patch(sample).flatten(2).transpose(1, 2)
        c = self.time(_batch_timestep(timestep, b))
        if self.class_embedding is not None and class_labels is not None:
            c = c + self.class_embedding(class_labels)
        for blk in self.blocks:
            x = blk(x, c, encoder_hidden_states)
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
        self.class_embedding = nn.Embedding(cfg.num_classes, cfg.temb_dim) if cfg.num_classes else None
        self.cross = _CrossAttention(2 * w, cfg.context_dim, cfg.heads) if cfg.context_dim else None

    def forward(self, sample, timestep, class_labels=None, encoder_hidden_states=None):
        c = self.time(_batch_timestep(timestep, sample.shape[0]))
        if self.class_embedding is not None and class_labels is not None:
            c = c + self.class_embedding(class_labels)
        h0 = self.conv_in(sample)
        h = h0
        for blk in self.down:
            h = blk(h, c)
        if self.attn is not None:
            b, ch, hh, ww = h.shape
            seq = h.flatten(2).transpose(1, 2)
            h = h + self.attn(seq).transpose(1, 2).reshape(b, ch, hh, ww)
        if self.cross is not None and encoder_hidden_states is not None:
            b, ch, hh, ww = h.shape
            seq = h.flatten(2).transpose(1, 2)
            h = h + self.cross(seq, encoder_hidden_states).transpose(1, 2).reshape(b, ch, hh, ww)
        h = self.up(torch.cat([h, h0], dim=1), c)
        return self.conv_out(F.silu(self.norm_out(h)))


def build_random_denoiser(cfg: RandomDenoiserConfig) -> nn.Module:
    torch.manual_seed(cfg.seed)
    model = RandomDiT(cfg) if cfg.kind == "dit" else RandomUNet(cfg)
    return model.eval()
