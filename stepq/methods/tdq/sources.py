"""Scale sources: modules that give every activation quantizer a step size per timestep.

Both take the integer training timestep i ∈ [0, T) of each sample (``stepq::timestep_index``'s
output) and return S of shape [L, B]: the step size of each of the L quantizers for each sample.

``ScaleGenerators`` is TDQ (So et al., NeurIPS 2023). Per quantizer l,

    enc(t)  = [cos(t·ω_k), sin(t·ω_k)],  k = 0 … D/2−1
    s_l(t)  = softplus(W4 · relu(W3 · relu(W2 · relu(W1 · enc(t) + b1) + b2) + b3) + b4)

with the frequencies ω (the buffer ``freqs``) either geometric, ω_k = t_max^(−k/(D/2))
(``fourier_frequencies``: periods 2π … 2π·t_max, the encoding of the paper), or chosen from the
timesteps the calibration visited (``grid_frequencies``, set by the fit before it starts):

    ω_max = π / (2·g),  g = the largest gap between visited timesteps  (period 4g: half Nyquist)
    ω_min = π / T                                                       (period 2T: one monotone half-cycle over [0, T))
    ω_k   = ω_max · (ω_min/ω_max)^(k/(D/2−1))                            (geometric between them)

Sampled every g timesteps, a frequency is identified only below the Nyquist frequency π/g; at π/g
itself sin(ω·t) vanishes at every sample, so its weight is free and fills the gaps with noise. At
half Nyquist every period holds at least four samples and both the cosine and the sine are seen.
The geometric encoding reaches ω = 1 rad/timestep (period ~6): against a calibration grid of 50
timesteps (DDIM-20) the MLP then fits noise between the timesteps it saw (docs/TDQ.md, "Smooth in t").

(4 linear layers, hidden width H, He-initialised hidden layers). The last layer starts at W4 = 0,
b4 = softplus⁻¹(s_static), so the generator begins exactly at the calibrated static solution. All L
MLPs are evaluated as one batched einsum, which keeps fitting fast.

``ScaleTable`` is the baseline without a generator: a free step size per training timestep,
s_l(t) = softplus(θ[l, t]), initialised to the static step. Timesteps never visited in fitting
get no gradient; ``tables()`` fills them by linear interpolation between visited neighbours, and so
does the forward outside training (the fit's held-out timesteps are judged by what ships).

``tables()`` evaluates a source at every t ∈ [0, T): that table is what the deployed graph gathers.
``make_scale_source`` is the factory ``stepq.passes.InsertScaleSource`` is built with: the recipe's
``tdq.method`` picks the kind.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stepq.compiler.timesteps import interpolate_unvisited
from stepq.recipe.specs import Recipe

__all__ = ["ScaleGenerators", "ScaleTable", "fourier_features", "fourier_frequencies", "grid_frequencies",
           "inverse_softplus", "make_scale_source"]


def inverse_softplus(s: Tensor) -> Tensor:
    """softplus⁻¹(s) = log(exp(s) − 1), computed stably (s > 0)."""
    s = s.double().clamp_min(1e-12)
    return torch.where(s > 20, s, torch.log(torch.expm1(s))).float()


def fourier_frequencies(dim: int, t_max: float, device: torch.device | None = None) -> Tensor:
    """The geometric frequencies [dim/2] of the paper's encoding: ω_k = t_max^(−k/(dim/2))."""
    half = dim // 2
    return torch.exp(-math.log(t_max) * torch.arange(half, dtype=torch.float32, device=device) / half)


def grid_frequencies(visited: Tensor, dim: int, num_train_timesteps: int) -> Tensor:
    """Frequencies [dim/2] limited by the calibration grid (module docstring): geometric from
    ω_max = π/(2g) down to ω_min = π/T, g the largest gap between the ``visited`` integer timesteps
    (any order, repeats allowed). With fewer than two distinct timesteps g = T; when ω_max < ω_min
    (g > T/2) every frequency is ω_min; a single frequency (dim = 2) is ω_max. Highest first, as
    ``fourier_frequencies``."""
    half = dim // 2
    T = int(num_train_timesteps)
    v = torch.unique(visited.detach().reshape(-1).long().cpu())
    gap = float((v[1:] - v[:-1]).max()) if v.numel() >= 2 else float(T)
    lo = math.pi / T
    hi = max(math.pi / (2.0 * gap), lo)
    k = torch.arange(half, dtype=torch.float64)
    return (hi * (lo / hi) ** (k / max(half - 1, 1))).float()


def _encode(t: Tensor, freqs: Tensor) -> Tensor:
    args = t.float().reshape(-1, 1) * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def fourier_features(t: Tensor, dim: int, t_max: float) -> Tensor:
    """Geometric Fourier encoding [B, dim] of timesteps t [B]."""
    return _encode(t, fourier_frequencies(dim, t_max, t.device))


class ScaleGenerators(nn.Module):
    """L TDQ step-size generators evaluated together (see module docstring)."""

    def __init__(self, names: list[str], static_scales: Tensor, *, fourier_dim: int = 64, hidden: int = 64,
                 t_max: float = 10000.0, num_train_timesteps: int = 1000, seed: int = 0):
        super().__init__()
        L = len(names)
        if static_scales.shape != (L,):
            raise ValueError(f"need one static scale per quantizer ({L}), got shape {tuple(static_scales.shape)}")
        self.names = list(names)
        self.fourier_dim, self.hidden, self.t_max = fourier_dim, hidden, float(t_max)
        self.num_train_timesteps = num_train_timesteps
        g = torch.Generator().manual_seed(seed)

        def he(fan_in: int, *shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=g) * math.sqrt(2.0 / fan_in))

        D, H = fourier_dim, hidden
        self.w1, self.b1 = he(D, L, D, H), nn.Parameter(torch.zeros(L, H))
        self.w2, self.b2 = he(H, L, H, H), nn.Parameter(torch.zeros(L, H))
        self.w3, self.b3 = he(H, L, H, H), nn.Parameter(torch.zeros(L, H))
        self.w4 = nn.Parameter(torch.zeros(L, H))
        self.b4 = nn.Parameter(inverse_softplus(static_scales.detach()))
        self.freqs: Tensor  # the encoding's frequencies: geometric until the fit sets them (set_frequencies)
        self.register_buffer("freqs", fourier_frequencies(D, self.t_max))

    @torch.no_grad()
    def set_frequencies(self, freqs: Tensor) -> None:
        """Replace the encoding's frequencies (``grid_frequencies``: the fit, once the calibration's
        timesteps are known). The MLP's output is unchanged while its last layer is zero (at the start)."""
        if freqs.shape != self.freqs.shape:
            raise ValueError(f"need {self.freqs.numel()} frequencies, got shape {tuple(freqs.shape)}")
        self.freqs.copy_(freqs)

    def forward(self, t: Tensor) -> Tensor:
        enc = _encode(t, self.freqs)  # [B, D]
        h = F.relu(torch.einsum("bd,ldh->lbh", enc, self.w1) + self.b1[:, None])
        h = F.relu(torch.einsum("lbh,lhk->lbk", h, self.w2) + self.b2[:, None])
        h = F.relu(torch.einsum("lbh,lhk->lbk", h, self.w3) + self.b3[:, None])
        return F.softplus(torch.einsum("lbh,lh->lb", h, self.w4) + self.b4[:, None])  # [L, B]

    @torch.no_grad()
    def tables(self) -> Tensor:
        """[L, T]: every generator at every training timestep."""
        return self.forward(torch.arange(self.num_train_timesteps))

    def extra_repr(self) -> str:
        periods = 2 * math.pi / self.freqs
        return (f"quantizers={len(self.names)}, fourier_dim={self.fourier_dim}, hidden={self.hidden}, "
                f"periods={float(periods.min()):.3g}..{float(periods.max()):.3g}")


class ScaleTable(nn.Module):
    """A free step size per quantizer and training timestep (the no-generator baseline)."""

    def __init__(self, names: list[str], static_scales: Tensor, *, num_train_timesteps: int = 1000):
        super().__init__()
        self.names = list(names)
        self.num_train_timesteps = num_train_timesteps
        self.theta = nn.Parameter(inverse_softplus(static_scales.detach())[:, None].repeat(1, num_train_timesteps))
        self.visited: Tensor
        self.register_buffer("visited", torch.zeros(num_train_timesteps, dtype=torch.bool))

    def forward(self, t: Tensor) -> Tensor:
        idx = t.long().reshape(-1)
        if self.training:
            self.visited[idx] = True
            return F.softplus(self.theta[:, idx])  # [L, B]
        return self.tables()[:, idx]

    @torch.no_grad()
    def tables(self) -> Tensor:
        """[L, T], unvisited timesteps linearly interpolated between visited ones (held at the ends)."""
        return interpolate_unvisited(F.softplus(self.theta), self.visited)


def make_scale_source(recipe: Recipe, names: list[str], static: Tensor, zero_points: Tensor | None = None) -> nn.Module:
    """The scale source ``recipe.tdq`` asks for, over the quantizers ``names`` starting at the static
    steps ``static`` [L]: ``ScaleGenerators`` for ``method="mlp"``, else a free ``ScaleTable``. TDQ
    keeps the zero points static (``zero_points`` is not used)."""
    cfg = recipe.tdq
    if cfg is None:
        raise ValueError(f"make_scale_source: recipe {recipe.name!r} has no tdq section")
    T = recipe.num_train_timesteps
    if cfg.method == "mlp":
        return ScaleGenerators(names, static, fourier_dim=cfg.fourier_dim, hidden=cfg.hidden, t_max=cfg.t_max,
                               num_train_timesteps=T, seed=cfg.seed)
    return ScaleTable(names, static, num_train_timesteps=T)
