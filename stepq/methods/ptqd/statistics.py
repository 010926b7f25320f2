"""PTQD's noise statistics: what the quantized prediction's error is made of, per timestep.

With ε the FP prediction and ε̂ the quantized one on the same input (x_t, t, c), PTQD writes the
error Δ = ε̂ − ε as a part correlated with ε, a bias and a residual:

    ε̂ = (1 + k_t)·ε + b_t + r_t

Per integer training timestep t, over every element of every sample measured at t:

    k_t   = max(cov(ε, Δ) / var(ε), 0)          least-squares slope of Δ on ε with an intercept
                                                (scipy.stats.linregress in the authors' code), clipped
    b_t,c = mean(Δ) over the elements of channel c      (the raw error's mean, as the authors do)
    σ_q(t) = std(ε̂ − (1 + k_t)·ε − b_t)                 pooled over the elements (the issue's text)
    SNR^Q(t) = ‖ε‖ / ‖Δ‖                                 for step-aware mixed precision

Everything is accumulated as float64 sufficient statistics (counts, Σε, Σε², ΣΔ, ΣεΔ, ΣΔ², per
channel where needed), so the amount of data is unbounded; σ_q follows in closed form:

    Σr = −k·Σε,   Σr² = ΣΔ² + k²Σε² − Σ_c n_c b_c² − 2kΣεΔ + 2k·Σ_c b_c Σε_c

Differences from the authors' ``analyze_error.py``: σ_q is the pooled std over all elements at t,
not the mean over samples of each sample's std, and the residual also subtracts b_t (per channel);
with E[ε] ≈ 0 both differences are second order. The statistics are tables over the whole grid
[0, T): timesteps never measured are linearly interpolated between measured neighbours (held at the
ends), so one measurement serves any schedule and step count (the authors' tables are keyed by the
20 DDIM timesteps they were collected on).

Under a torch.distributed process group each rank measures its share of the data and the sums are
all-reduced before the tables are formed (``ErrorAccumulator.reduce``): every rank gets the tables
of all the data, equal to one process's up to float64 summation order.

**Uncertainty and estimators that transfer** (docs/PTQD.md, "Statistics that transfer"). The
elements of one sample are strongly correlated (one image, one trajectory), so element counts
overstate the information; the unit of replication is the sample (one row of one call at t). Per
sample i the accumulator also keeps the vector of its own sums

    z_i = (1, n_i, Σε, ΣΔ, Σε², ΣεΔ, ΣΔ², ΣΔ_c (C), Σε_c (C), n_ic (C))

and sums z_i z_iᵀ per timestep ([T, P, P], P = 7 + 3C; its first row is the pooled sums and the
number of samples m_t). Each estimate is a root of a sum of per-sample scores, Σ_i u_i(θ) = 0, and
every score is linear in z_i at fixed θ (u_i = w(θ)·z_i), so the cluster-robust (sandwich)
variance Var θ̂ ≈ m/(m−1) · Σ_i u_i² / (∂Σu/∂θ)² = m/(m−1) · w M wᵀ / bread² is a quadratic form in
the summed outer products (exact sums: all-reduced like the rest):

    slope   u_i = Σ_j (ε_ij − ε̄)(Δ_ij − a − k ε_ij),        bread = Σ_j (ε − ε̄)² = N·var(ε)
    b_c     u_i = ΣΔ_ic − b_c n_ic,                          bread = N_c
    σ_q²    u_i = Σ_j (r_ij − r̄)² − σ_q² n_i,                bread = N      (k, b held fixed)

and se(σ_q) = se(σ_q²)/(2σ_q). With m_t < 2 samples the standard errors are infinite.

``finalize`` then forms the tables with an estimator (``PTQDConfig``: shrinkage, bandwidth,
bias_shrinkage, gate_z):

* ``shrinkage="kernel"``: Nadaraya–Watson on the sums: the estimate at any τ ∈ [0, T) is the one of
  the pooled sums Σ_t w_τt S_t over the measured t, w_τt = exp(−(t − τ)²/2h²) (a Gaussian kernel,
  bandwidth h in timesteps; default the median gap between measured timesteps), and its variance
  uses Σ_t w_τt² M_t; the effective number of samples is Kish's (Σ w m)²/Σ w² m. This treats the
  samples at different timesteps as independent (they are, across trajectories; one trajectory's
  samples at neighbouring t are not, so the kernel's standard errors are somewhat optimistic).
* ``bias_shrinkage="zero"`` / ``"pooled"``: b_c ← g + (b_c − g)·max(0, 1 − se_c²/(b_c − g)²), g = 0 or
  the all-channel bias b̄_t (a positive-part James–Stein / non-negative-garrote rule per element:
  a difference within one standard error of the target is set to it, larger ones shrink by se²/d).
* ``gate_z`` = z > 0: k_t ← 0 where k_t < z·se(k_t), b_t,c ← 0 where |b_t,c| < z·se(b_t,c); the masks
  are kept (``k_gated``, ``bias_gated``). σ_q is then the residual std around the applied k and b
  (what a gated term leaves stays in the residual, like a clipped negative slope).

With shrinkage "none", bias_shrinkage "none" and gate_z 0 the tables are exactly the raw ones.

The residual's normality (PTQD models r_t as Gaussian to fold it into the sampler noise) is tested
with ``scipy.stats.normaltest`` (D'Agostino–Pearson) on a uniform subsample of at most
``normality_samples`` residual elements per measured timestep, with skewness and excess kurtosis.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from stepq.compiler.distributed import all_reduce, gather_rows, is_distributed, raise_on_any_rank, rank_seed
from stepq.compiler.errors import CalibrationError
from stepq.compiler.timesteps import timestep_index

__all__ = ["ErrorAccumulator", "Estimator", "Normality", "PTQDStats", "fill_table", "kernel_bandwidth", "measure",
           "predictions"]

log = logging.getLogger(__name__)

Model = Callable[..., Any]


def fill_table(values: Tensor, visited: Tensor) -> Tensor:
    """Fill the rows of ``values`` ([T, ...]) at unvisited timesteps by linear interpolation between
    the visited neighbours (rows before the first / after the last visited one are held)."""
    seen = torch.nonzero(visited).reshape(-1)
    if seen.numel() == 0:
        raise CalibrationError("no timestep was measured; the data yielded no batches")
    T = values.shape[0]
    out = values.clone()
    if seen.numel() == 1:
        out[:] = values[seen[0]]
        return out
    t = torch.arange(T, dtype=torch.float64)
    pos = torch.searchsorted(seen.double(), t).clamp(1, seen.numel() - 1)
    lo, hi = seen[pos - 1], seen[pos]
    w = ((t - lo.double()) / (hi - lo).double()).clamp(0, 1)
    w = w.reshape(T, *([1] * (values.dim() - 1))).to(values.dtype)
    out = values[lo] * (1 - w) + values[hi] * w
    out[seen] = values[seen]
    return out


@dataclass
class Normality:
    """``scipy.stats.normaltest`` of the residual at each measured timestep (ascending t): the
    ``timesteps``, the D'Agostino–Pearson ``statistic`` and its ``pvalue``, ``skew``, excess
    ``kurtosis`` and ``n`` (elements tested), each [V]."""

    timesteps: Tensor  # [V] int64
    statistic: Tensor  # [V] D'Agostino–Pearson K²
    pvalue: Tensor  # [V]
    skew: Tensor  # [V]
    kurtosis: Tensor  # [V] excess (Fisher): 0 for a Gaussian
    n: Tensor  # [V] elements tested

    def rejection_rate(self, alpha: float = 0.01) -> float:
        """Fraction of timesteps at which normality is rejected at level ``alpha``."""
        return float((self.pvalue < alpha).double().mean()) if self.pvalue.numel() else math.nan

    def summary(self, alpha: float = 0.01) -> dict[str, float]:
        def q(x: Tensor) -> tuple[float, float, float]:
            v = x.double()
            return float(v.quantile(0.1)), float(v.median()), float(v.quantile(0.9))

        return {
            "timesteps": int(self.timesteps.numel()),
            "elements_per_timestep": float(self.n.double().median()) if self.n.numel() else 0.0,
            "rejected_fraction": self.rejection_rate(alpha),
            "statistic_p10_median_p90": q(self.statistic),  # type: ignore[dict-item]
            "skew_p10_median_p90": q(self.skew),  # type: ignore[dict-item]
            "excess_kurtosis_p10_median_p90": q(self.kurtosis),  # type: ignore[dict-item]
        }


#: optional PTQDStats tables (absent in statistics saved before they existed)
_OPTIONAL = ("k_se", "bias_se", "sigma_se", "bias_pooled", "bias_pooled_se", "k_gated", "bias_gated", "samples",
             "raw_k", "raw_bias")


@dataclass
class PTQDStats:
    """PTQD's per-timestep tables over the training-timestep grid [0, T) (see module docstring):
    ``k`` (the applied slope: clipped, smoothed / gated as the estimator says) and ``slope`` (before
    clipping and gating), ``bias`` [T, C], ``sigma`` (residual std around the applied k and b),
    ``snr`` (‖ε‖/‖ε̂ − ε‖, raw), ``visited`` (measured; other rows interpolated or kernel-smoothed),
    ``count`` (elements measured) and ``normality`` (the residual's normality test, or None).

    Uncertainty (None in statistics saved before it existed): ``k_se`` [T] (of the slope),
    ``bias_se`` [T, C], ``sigma_se`` [T], the all-channel bias ``bias_pooled`` [T] and its
    ``bias_pooled_se``, all from the between-sample (cluster-robust) variance of the estimator in
    use; ``k_gated`` [T] / ``bias_gated`` [T, C] (bool: the gate set the term to 0), ``samples``
    [T] (independent samples measured at t) and ``raw_k`` / ``raw_bias`` (the per-timestep
    estimates without shrinkage or gate, interpolated: the tables of the plain estimator)."""

    k: Tensor  # [T] clipped slope
    slope: Tensor  # [T] the raw regression slope (may be negative)
    bias: Tensor  # [T, C]
    sigma: Tensor  # [T]
    snr: Tensor  # [T] ‖ε‖/‖ε̂ − ε‖
    visited: Tensor  # [T] bool: measured (the other rows are interpolated)
    count: Tensor  # [T] elements measured
    normality: Normality | None = None
    k_se: Tensor | None = None  # [T]
    bias_se: Tensor | None = None  # [T, C]
    sigma_se: Tensor | None = None  # [T]
    bias_pooled: Tensor | None = None  # [T]
    bias_pooled_se: Tensor | None = None  # [T]
    k_gated: Tensor | None = None  # [T] bool
    bias_gated: Tensor | None = None  # [T, C] bool
    samples: Tensor | None = None  # [T]
    raw_k: Tensor | None = None  # [T]
    raw_bias: Tensor | None = None  # [T, C]

    def __post_init__(self) -> None:
        T = self.k.shape[0]
        for name in ("slope", "sigma", "snr", "visited", "count"):
            if getattr(self, name).shape != (T,):
                raise ValueError(f"PTQDStats.{name} must have shape ({T},), got {tuple(getattr(self, name).shape)}")
        if self.bias.dim() != 2 or self.bias.shape[0] != T:
            raise ValueError(f"PTQDStats.bias must have shape ({T}, C), got {tuple(self.bias.shape)}")
        for name in _OPTIONAL:
            v = getattr(self, name)
            want = tuple(self.bias.shape) if name in ("bias_se", "bias_gated", "raw_bias") else (T,)
            if v is not None and tuple(v.shape) != want:
                raise ValueError(f"PTQDStats.{name} must have shape {want}, got {tuple(v.shape)}")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.k.shape[0])

    @property
    def channels(self) -> int:
        return int(self.bias.shape[1])

    def tensors(self) -> dict[str, Tensor]:
        out = {n: getattr(self, n) for n in ("k", "slope", "bias", "sigma", "snr", "visited", "count")}
        out.update({n: getattr(self, n) for n in _OPTIONAL if getattr(self, n) is not None})
        if self.normality is not None:
            nm = self.normality
            out.update({f"normality.{n}": getattr(nm, n) for n in ("timesteps", "statistic", "pvalue", "skew",
                                                                    "kurtosis", "n")})
        return out

    @classmethod
    def from_tensors(cls, ts: Mapping[str, Tensor]) -> PTQDStats:
        nm = None
        if "normality.pvalue" in ts:
            nm = Normality(**{n: ts[f"normality.{n}"] for n in ("timesteps", "statistic", "pvalue", "skew",
                                                                 "kurtosis", "n")})
        return cls(**{n: ts[n] for n in ("k", "slope", "bias", "sigma", "snr", "visited", "count")}, normality=nm,
                   **{n: ts[n] for n in _OPTIONAL if n in ts})


@dataclass(frozen=True)
class Estimator:
    """How ``ErrorAccumulator.finalize`` turns the sums into tables (module docstring; the fields
    are ``PTQDConfig``'s of the same names). The default is the plain per-timestep estimator.

    ``shrinkage``: "none" or "kernel" (pool neighbouring timesteps); ``bandwidth``: the kernel's width
    in timesteps (None: ``kernel_bandwidth``); ``bias_shrinkage``: "none", "zero" or "pooled";
    ``gate_z``: a term is applied only where it exceeds ``gate_z`` standard errors (0: always)."""

    shrinkage: str = "none"  # "none" | "kernel"
    bandwidth: float | None = None  # kernel bandwidth in timesteps; None: ``kernel_bandwidth``
    bias_shrinkage: str = "none"  # "none" | "zero" | "pooled"
    gate_z: float = 0.0

    def __post_init__(self) -> None:
        if self.shrinkage not in ("none", "kernel"):
            raise CalibrationError(f"PTQD shrinkage must be 'none' or 'kernel', got {self.shrinkage!r}")
        if self.bias_shrinkage not in ("none", "zero", "pooled"):
            raise CalibrationError(f"PTQD bias_shrinkage must be 'none', 'zero' or 'pooled', got {self.bias_shrinkage!r}")
        if self.bandwidth is not None and not self.bandwidth > 0:
            raise CalibrationError(f"PTQD bandwidth must be > 0, got {self.bandwidth}")
        if not self.gate_z >= 0:
            raise CalibrationError(f"PTQD gate_z must be >= 0, got {self.gate_z}")

    @property
    def plain(self) -> bool:
        return self.shrinkage == "none" and self.bias_shrinkage == "none" and self.gate_z == 0

    @classmethod
    def of(cls, cfg: Any) -> Estimator:
        """The estimator of a ``PTQDConfig`` (or anything with the four fields)."""
        return cls(cfg.shrinkage, cfg.bandwidth, cfg.bias_shrinkage, float(cfg.gate_z))


def kernel_bandwidth(visited: Tensor) -> float:
    """The default kernel bandwidth for the ``visited`` mask [T]: the median gap between consecutive measured timesteps (so each
    estimate pools about one neighbour on either side at weights ≈ 0.6 and 0.14); 1 with one
    measured timestep."""
    seen = torch.nonzero(visited).reshape(-1).double()
    return float((seen[1:] - seen[:-1]).median()) if seen.numel() > 1 else 1.0


@dataclass
class _Subsample:
    """A uniform random subsample (without replacement) of at most ``size`` (ε, Δ, channel) triples."""

    size: int
    parts: list[Tensor] = field(default_factory=list)  # [3, m] chunks
    keys: list[Tensor] = field(default_factory=list)
    pending: int = 0

    def add(self, e: Tensor, d: Tensor, c: Tensor, gen: torch.Generator) -> None:
        self.parts.append(torch.stack([e.double(), d.double(), c.double()]))
        self.keys.append(torch.rand(e.numel(), generator=gen, dtype=torch.float64))
        self.pending += e.numel()
        if self.pending > 4 * self.size:
            self._compact()

    def _compact(self) -> None:
        vals, keys = torch.cat(self.parts, dim=1), torch.cat(self.keys)
        if keys.numel() > self.size:
            top = torch.topk(keys, self.size).indices
            vals, keys = vals[:, top], keys[top]
        self.parts, self.keys, self.pending = [vals], [keys], keys.numel()

    def values(self) -> Tensor:
        self._compact()
        return self.parts[0] if self.parts else torch.empty(3, 0, dtype=torch.float64)


#: z_i's scalar entries: 1, n, Σε, ΣΔ, Σε², ΣεΔ, ΣΔ²; then ΣΔ_c, Σε_c, n_c (C each)
_ONE, _N, _E, _D, _EE, _ED, _DD = range(7)
_P0 = 7


def _kernel_weights(visited: Tensor, h: float) -> Tensor:
    """[T, V] Gaussian weights exp(−(t − τ)²/2h²) of the measured timesteps t for every τ, each row
    scaled by its largest weight (the estimates are ratios, so the scale cancels; no underflow)."""
    t = torch.nonzero(visited).reshape(-1).double()
    tau = torch.arange(visited.numel(), dtype=torch.float64)
    logw = -((tau[:, None] - t[None, :]) ** 2) / (2 * h * h)
    return (logw - logw.max(1, keepdim=True).values).exp()


def _slope_bias(n_c: Tensor, se_c: Tensor, sd_c: Tensor, see: Tensor, sed: Tensor) -> tuple[Tensor, Tensor]:
    nn = n_c.sum(1).clamp_min(1)
    me, md = se_c.sum(1) / nn, sd_c.sum(1) / nn
    var_e = (see / nn - me * me).clamp_min(0)
    cov = sed / nn - me * md
    slope = torch.where(var_e > 0, cov / var_e.clamp_min(1e-300), torch.zeros_like(cov))
    return slope, sd_c / n_c.clamp_min(1)


def _quad(M: Tensor, w: Tensor) -> Tensor:
    """w_r M_r w_rᵀ per row: Σ_i u_i² of the scores u_i = w·z_i."""
    return torch.einsum("rp,rpq,rq->r", w, M, w).clamp_min(0)


def _corrected(eff: Tensor, var: Tensor) -> Tensor:
    """``var`` times the small-sample factor G/(G − 1) of the cluster-robust variance; infinite
    below 2 samples (one sample's scores sum to 0: no between-sample spread to measure)."""
    eff = eff.reshape(eff.shape + (1,) * (var.dim() - eff.dim()))
    return torch.where(eff > 1, eff / (eff - 1).clamp_min(1e-300) * var, torch.full_like(var, math.inf))


def _slope_bias_se(sums: tuple[Tensor, ...], M: Tensor, eff: Tensor,
                   slope: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(se of the slope, se of b_c, the all-channel bias b̄, its se) from the (pooled) sums and meat."""
    n_c, se_c, sd_c, see, _, _ = sums
    C = n_c.shape[1]
    nn = n_c.sum(1).clamp_min(1)
    me, md = se_c.sum(1) / nn, sd_c.sum(1) / nn
    var_e = (see / nn - me * me).clamp_min(0)
    a = md - slope * me
    w = torch.zeros(M.shape[:2], dtype=torch.float64)
    w[:, _N], w[:, _E], w[:, _D], w[:, _EE], w[:, _ED] = me * a, -a + me * slope, -me, -slope, 1.0
    k_var = _corrected(eff, _quad(M, w) / (nn * var_e).clamp_min(1e-300) ** 2)
    k_var = torch.where(var_e > 0, k_var, torch.full_like(k_var, math.inf))
    bias = sd_c / n_c.clamp_min(1)
    iD, iN = torch.arange(_P0, _P0 + C), torch.arange(_P0 + 2 * C, _P0 + 3 * C)
    Mdd, Mdn, Mnn = M[:, iD, iD], M[:, iD, iN], M[:, iN, iN]
    b_var = _corrected(eff, (Mdd - 2 * bias * Mdn + bias * bias * Mnn).clamp_min(0) / n_c.clamp_min(1) ** 2)
    pooled = sd_c.sum(1) / nn
    p_var = _corrected(eff, (M[:, _D, _D] - 2 * pooled * M[:, _D, _N] + pooled * pooled * M[:, _N, _N]).clamp_min(0)
                       / nn**2)
    return k_var.sqrt(), b_var.sqrt(), pooled, p_var.sqrt()


def _residual(sums: tuple[Tensor, ...], k: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """(σ_q, the residual's mean r̄) of r = Δ − kε − b_c from the sums, for any k and b."""
    n_c, se_c, sd_c, see, sed, sdd = sums
    nn = n_c.sum(1).clamp_min(1)
    kk = k[:, None]
    sum_r = (sd_c - kk * se_c - n_c * bias).sum(1)
    sum_r2 = (sdd + k * k * see - 2 * k * sed
              + (n_c * bias * bias - 2 * bias * sd_c + 2 * kk * bias * se_c).sum(1))
    r_mean = sum_r / nn
    return (sum_r2 / nn - r_mean**2).clamp_min(0).sqrt(), r_mean


def _sigma_se(sums: tuple[Tensor, ...], M: Tensor, eff: Tensor, k: Tensor, bias: Tensor, sigma: Tensor,
              r_mean: Tensor, nn: Tensor) -> Tensor:
    """se(σ_q) = se(σ_q²)/(2σ_q), the score u_i = Σ_j (r_ij − r̄)² − σ_q² n_i with k, b held fixed."""
    C = bias.shape[1]
    w = torch.zeros(M.shape[:2], dtype=torch.float64)
    w[:, _DD], w[:, _EE], w[:, _ED] = 1.0, k * k, -2 * k
    w[:, _D], w[:, _E], w[:, _N] = -2 * r_mean, 2 * r_mean * k, r_mean**2 - sigma**2
    w[:, _P0:_P0 + C] = -2 * bias
    w[:, _P0 + C:_P0 + 2 * C] = 2 * k[:, None] * bias
    w[:, _P0 + 2 * C:] = bias * bias + 2 * r_mean[:, None] * bias
    var2 = _corrected(eff, _quad(M, w) / nn**2)
    sd2 = var2.sqrt()
    return torch.where(sigma > 0, sd2 / (2 * sigma).clamp_min(1e-300), sd2.sqrt())


class ErrorAccumulator:
    """Accumulates (ε, ε̂) pairs by training timestep and turns them into ``PTQDStats``.

    ``num_train_timesteps`` (T) rows of ``channels`` channels each; ``normality_samples`` caps the
    residual elements kept per timestep for the normality test (None: no test), drawn with ``seed``."""

    def __init__(self, num_train_timesteps: int, channels: int, *, normality_samples: int | None = 20000,
                 seed: int = 0):
        T, C = num_train_timesteps, channels
        f64 = torch.float64
        self.T, self.C = T, C
        self.n_c, self.se_c, self.sd_c = (torch.zeros(T, C, dtype=f64) for _ in range(3))
        self.see, self.sed, self.sdd = (torch.zeros(T, dtype=f64) for _ in range(3))
        # Σ_i z_i z_iᵀ of the per-sample sums z_i (module docstring): the between-sample variance
        self.zz = torch.zeros(T, _P0 + 3 * C, _P0 + 3 * C, dtype=f64)
        self.normality_samples = normality_samples
        self.subsamples: dict[int, _Subsample] = {}
        self._gen = torch.Generator().manual_seed(rank_seed(seed))

    @torch.no_grad()
    def add(self, t_idx: Tensor, eps: Tensor, eps_hat: Tensor) -> None:
        """``t_idx`` [B] int64 training timesteps; ``eps``, ``eps_hat`` [B, C, ...]."""
        if eps.shape != eps_hat.shape:
            raise CalibrationError(f"FP and quantized predictions differ in shape: {tuple(eps.shape)} vs "
                                   f"{tuple(eps_hat.shape)}")
        if eps.dim() < 2 or eps.shape[1] != self.C:
            raise CalibrationError(f"predictions must be [B, {self.C}, ...], got {tuple(eps.shape)}")
        B = eps.shape[0]
        e = eps.detach().double().reshape(B, self.C, -1)
        d = (eps_hat.detach().double().reshape(B, self.C, -1) - e)
        if not bool(torch.isfinite(d).all()):
            raise CalibrationError("non-finite quantized predictions while measuring PTQD statistics")
        t_idx = t_idx.reshape(-1).long()
        n_bc = torch.full((B, self.C), float(e.shape[2]), dtype=torch.float64)
        e_c, d_c = e.sum(2), d.sum(2)
        ee, ed, dd = (e * e).sum((1, 2)), (e * d).sum((1, 2)), (d * d).sum((1, 2))
        self.n_c.index_add_(0, t_idx, n_bc)
        self.se_c.index_add_(0, t_idx, e_c)
        self.sd_c.index_add_(0, t_idx, d_c)
        self.see.index_add_(0, t_idx, ee)
        self.sed.index_add_(0, t_idx, ed)
        self.sdd.index_add_(0, t_idx, dd)
        z = torch.cat([torch.ones(B, 1, dtype=torch.float64), n_bc.sum(1, keepdim=True), e_c.sum(1, keepdim=True),
                       d_c.sum(1, keepdim=True), ee[:, None], ed[:, None], dd[:, None], d_c, e_c, n_bc], 1)
        self.zz.index_add_(0, t_idx, z[:, :, None] * z[:, None, :])
        if self.normality_samples:
            chan = torch.arange(self.C, dtype=torch.float64).reshape(1, self.C, 1).expand_as(e)
            for tv in torch.unique(t_idx).tolist():
                rows = t_idx == tv
                sub = self.subsamples.setdefault(int(tv), _Subsample(self.normality_samples))
                sub.add(e[rows].reshape(-1), d[rows].reshape(-1), chan[rows].reshape(-1), self._gen)

    def reduce(self) -> None:
        """Sum the statistics over the ranks of the process group and merge the normality subsamples
        (the ``normality_samples`` largest uniform keys of the union: a uniform subsample of all the
        ranks' residuals), in place; every rank then holds what one process would have accumulated."""
        if not is_distributed():
            return
        per_c = all_reduce(torch.stack([self.n_c, self.se_c, self.sd_c]))
        self.n_c, self.se_c, self.sd_c = per_c[0].clone(), per_c[1].clone(), per_c[2].clone()
        tot = all_reduce(torch.stack([self.see, self.sed, self.sdd]))
        self.see, self.sed, self.sdd = tot[0].clone(), tot[1].clone(), tot[2].clone()
        self.zz = all_reduce(self.zz).clone()
        if not self.normality_samples:
            return
        parts = []
        for t, sub in sorted(self.subsamples.items()):
            v = sub.values()
            keys = sub.keys[0] if sub.keys else torch.empty(0, dtype=torch.float64)
            parts.append(torch.cat([torch.full((1, keys.numel()), float(t), dtype=torch.float64), keys[None], v]).T)
        mine = torch.cat(parts) if parts else torch.empty(0, 5, dtype=torch.float64)
        rows = torch.cat(gather_rows(mine))  # [n, 5]: t, key, ε, Δ, channel; rank order
        self.subsamples = {}
        for t in torch.unique(rows[:, 0].long()).tolist():
            r = rows[rows[:, 0].long() == t]
            sub = _Subsample(self.normality_samples, [r[:, 2:].T.contiguous()], [r[:, 1].contiguous()], r.shape[0])
            sub._compact()
            self.subsamples[int(t)] = sub

    def finalize(self, *, normality: bool = True, estimator: Estimator | None = None) -> PTQDStats:
        """The tables of the accumulated sums under ``estimator`` (default: the plain per-timestep
        one); pure, so it may be called again with another estimator."""
        est = estimator if estimator is not None else Estimator()
        n_c = self.n_c
        n = n_c.sum(1)
        visited = n > 0
        if not bool(visited.any()):
            raise CalibrationError("no prediction pairs were accumulated")
        # the plain per-timestep estimate (the tables before estimators existed, bit for bit)
        nn = n.clamp_min(1)
        se, sd = self.se_c.sum(1), self.sd_c.sum(1)
        me, md = se / nn, sd / nn
        var_e = (self.see / nn - me * me).clamp_min(0)
        cov = self.sed / nn - me * md
        slope = torch.where(var_e > 0, cov / var_e.clamp_min(1e-300), torch.zeros_like(cov))
        k = slope.clamp_min(0)
        bias = self.sd_c / n_c.clamp_min(1)
        sum_r = -k * se
        sum_r2 = (self.sdd + k * k * self.see - (n_c * bias * bias).sum(1) - 2 * k * self.sed
                  + 2 * k * (bias * self.se_c).sum(1))
        sigma = (sum_r2 / nn - (sum_r / nn) ** 2).clamp_min(0).sqrt()
        snr = (self.see / self.sdd.clamp_min(1e-300)).sqrt().clamp_max(1e12)
        log_snr = fill_table(torch.where(visited, snr.log(), torch.zeros_like(snr)), visited)
        samples = self.zz[:, 0, 0].clone()
        sums = (n_c, self.se_c, self.sd_c, self.see, self.sed, self.sdd)
        if est.shrinkage == "kernel":  # every row of [0, T) from the kernel-pooled sums
            W = _kernel_weights(visited, est.bandwidth if est.bandwidth is not None else kernel_bandwidth(visited))
            vis = torch.nonzero(visited).reshape(-1)
            sums = tuple(W @ x[vis] for x in sums)  # type: ignore[assignment]
            P = self.zz.shape[1]
            meat = ((W * W) @ self.zz[vis].reshape(vis.numel(), P * P)).reshape(-1, P, P)
            m = samples[vis]
            eff = (W @ m) ** 2 / ((W * W) @ m).clamp_min(1e-300)  # Kish's effective number of samples
            slope_e, bias_e = _slope_bias(*sums[:5])
            rows = torch.ones_like(visited)
        else:
            meat, eff, slope_e, bias_e, rows = self.zz, samples, slope, bias, visited
        n_e = sums[0].sum(1).clamp_min(1)
        k_se, bias_se, pooled, pooled_se = _slope_bias_se(sums, meat, eff, slope_e)
        k_e = slope_e.clamp_min(0)
        if est.bias_shrinkage != "none":
            target = pooled[:, None] if est.bias_shrinkage == "pooled" else torch.zeros_like(bias_e)
            dev = bias_e - target
            keep = (1 - bias_se**2 / (dev * dev).clamp_min(1e-300)).clamp_min(0)
            bias_e = target + dev * torch.where(dev == 0, torch.zeros_like(keep), keep)
        k_gated = torch.zeros_like(visited)
        bias_gated = torch.zeros(bias_e.shape, dtype=torch.bool)
        if est.gate_z > 0:
            k_gated = (k_e < est.gate_z * k_se) & rows
            bias_gated = (bias_e.abs() < est.gate_z * bias_se) & rows[:, None]
            k_e = torch.where(k_gated, torch.zeros_like(k_e), k_e)
            bias_e = torch.where(bias_gated, torch.zeros_like(bias_e), bias_e)
        sigma_e, r_mean = _residual(sums, k_e, bias_e)
        if est.plain:
            sigma_e = sigma
        sigma_se = _sigma_se(sums, meat, eff, k_e, bias_e, sigma_e, r_mean, n_e)
        out = dict(k=k_e, slope=slope_e, bias=bias_e, sigma=sigma_e, k_se=k_se, bias_se=bias_se, sigma_se=sigma_se,
                   bias_pooled=pooled, bias_pooled_se=pooled_se)
        if est.shrinkage != "kernel":  # measured rows only: interpolate the rest (an se of a 1-sample row: inf)
            out = {name: fill_table(v, visited) for name, v in out.items()}
            for name in ("k_se", "bias_se", "sigma_se", "bias_pooled_se"):
                out[name] = out[name].nan_to_num(nan=math.inf)
        f = {name: v.float() for name, v in out.items()}
        stats = PTQDStats(
            k=f["k"], slope=f["slope"], bias=f["bias"], sigma=f["sigma"], snr=log_snr.exp().float(), visited=visited,
            count=n, k_se=f["k_se"], bias_se=f["bias_se"], sigma_se=f["sigma_se"], bias_pooled=f["bias_pooled"],
            bias_pooled_se=f["bias_pooled_se"], k_gated=k_gated, bias_gated=bias_gated, samples=samples,
            raw_k=fill_table(k, visited).float(), raw_bias=fill_table(bias, visited).float(),
        )
        if normality and self.subsamples:
            stats.normality = self._normality(k if est.plain else stats.k.double(),
                                              bias if est.plain else stats.bias.double())
        return stats

    def _normality(self, k: Tensor, bias: Tensor) -> Normality:
        from scipy import stats as sps

        rows = []
        for t in sorted(self.subsamples):
            e, d, c = self.subsamples[t].values()
            if e.numel() < 8:
                continue
            r = (d - k[t] * e - bias[t][c.long()]).numpy()
            if float(r.std()) == 0.0:
                rows.append((t, 0.0, 1.0, 0.0, 0.0, r.size))
                continue
            res = sps.normaltest(r)
            rows.append((t, float(res.statistic), float(res.pvalue), float(sps.skew(r)), float(sps.kurtosis(r)), r.size))
        cols = list(zip(*rows)) if rows else [()] * 6
        return Normality(timesteps=torch.tensor(cols[0], dtype=torch.int64),
                         statistic=torch.tensor(cols[1], dtype=torch.float64),
                         pvalue=torch.tensor(cols[2], dtype=torch.float64),
                         skew=torch.tensor(cols[3], dtype=torch.float64),
                         kurtosis=torch.tensor(cols[4], dtype=torch.float64),
                         n=torch.tensor(cols[5], dtype=torch.int64))


def _prediction(out: Any, guidance_scale: float, channels: int | None) -> Tensor:
    from stepq.calibration.samplers import model_output

    y = model_output(out)
    if channels is not None and y.shape[1] != channels:
        y = y[:, :channels]
    if guidance_scale != 1.0:
        if y.shape[0] % 2:
            raise CalibrationError(f"guidance_scale={guidance_scale} expects batches of [cond; uncond] inputs, "
                                   f"got an odd batch of {y.shape[0]}")
        c, u = y.chunk(2)
        y = u + guidance_scale * (c - u)
    return y


@torch.no_grad()
def predictions(model: Model, data: Iterable[Mapping[str, Any]], *, guidance_scale: float = 1.0,
                channels: int | None = None) -> list[Tensor]:
    """The (guidance-combined at ``guidance_scale``, first ``channels``) prediction of ``model`` on
    every input dict of ``data``."""
    return [_prediction(model(**item), guidance_scale, channels) for item in data]


def _item_timesteps(item: Mapping[str, Any], timestep_arg: str, batch: int, scale: float, T: int,
                    guided: bool, policy: str) -> Tensor:
    if timestep_arg not in item:
        raise CalibrationError(f"an input dict has no timestep argument {timestep_arg!r}")
    t = torch.as_tensor(item[timestep_arg]).reshape(-1)
    idx = timestep_index(t, scale=scale, num_train_timesteps=T, policy=policy, where="PTQD statistics")
    if guided and idx.numel() == 2 * batch:
        idx = idx[:batch]
    if idx.numel() == 1:
        idx = idx.expand(batch)
    if idx.numel() != batch:
        raise CalibrationError(f"cannot match {idx.numel()} timesteps to a batch of {batch} predictions")
    return idx


@torch.no_grad()
def measure(fp: Model | Sequence[Tensor], quantized: Model, data: Iterable[Mapping[str, Any]], *,
            timestep_arg: str = "timestep", num_train_timesteps: int = 1000, timestep_scale: float = 1.0,
            timestep_policy: str = "error", guidance_scale: float = 1.0, channels: int | None = None, normality_samples: int | None = 20000,
            seed: int = 0, estimator: Estimator | None = None) -> PTQDStats:
    """PTQD statistics of ``quantized`` against ``fp`` on the input dicts ``data``.

    ``data`` are denoiser inputs recorded along FP trajectories (``stepq.calibration.collect``); with
    ``guidance_scale != 1`` each dict is the batched [cond; uncond] call and the statistics are taken
    on the guidance-combined prediction. ``fp`` may be the list ``predictions(fp_model, data, ...)``
    (reused across measurements). ``channels`` keeps the first channels of the outputs (learned
    variance); by default all of them. ``timestep_arg`` names the timestep input, ``num_train_timesteps``
    is T, ``timestep_scale`` maps a call's timestep to the integer grid; ``normality_samples`` and
    ``seed`` as in ``ErrorAccumulator``; ``estimator`` as in ``ErrorAccumulator.finalize`` (default
    the plain per-timestep tables). Timesteps map to table rows as in the compiled graph
    (``stepq.compiler.timesteps.timestep_index`` with the recipe's ``timestep_policy``: a timestep
    outside [0, T] raises, or clamps with a warning).
    """
    items = list(data)
    refs = fp if isinstance(fp, Sequence) else None
    if refs is not None and len(refs) != len(items):
        raise CalibrationError(f"got {len(refs)} FP predictions for {len(items)} input dicts")
    acc: ErrorAccumulator | None = None
    guided = guidance_scale != 1.0
    error: Exception | None = None
    try:
        for i, item in enumerate(items):
            eps = refs[i] if refs is not None else _prediction(fp(**item), guidance_scale, channels)  # type: ignore[operator]
            eps_hat = _prediction(quantized(**item), guidance_scale, channels)
            if acc is None:
                acc = ErrorAccumulator(num_train_timesteps, eps.shape[1], normality_samples=normality_samples,
                                       seed=seed)
            t_idx = _item_timesteps(item, timestep_arg, eps.shape[0], timestep_scale, num_train_timesteps, guided,
                                    timestep_policy)
            acc.add(t_idx, eps, eps_hat)
    except Exception as e:  # under a process group: every rank learns of it before anyone raises
        if not is_distributed():
            raise
        error = e
    raise_on_any_rank(error, CalibrationError)
    if is_distributed():  # a rank without a share of the data still takes part in the reduction
        C = int(all_reduce(torch.tensor([acc.C if acc is not None else 0]), dist.ReduceOp.MAX))
        if C and acc is None:
            acc = ErrorAccumulator(num_train_timesteps, C, normality_samples=normality_samples, seed=seed)
        if acc is not None:
            acc.reduce()
    if acc is None:
        raise CalibrationError("PTQD statistics need data: the iterable yielded no input dicts")
    stats = acc.finalize(normality=bool(normality_samples), estimator=estimator)
    log.info("PTQD statistics on %d timesteps: k in [%.4f, %.4f], sigma_q in [%.4f, %.4f]",
             int(stats.visited.sum()), float(stats.k.min()), float(stats.k.max()), float(stats.sigma.min()),
             float(stats.sigma.max()))
    return stats
