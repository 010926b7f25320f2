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

__all__ = ["ErrorAccumulator", "Normality", "PTQDStats", "fill_table", "measure", "predictions"]

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


@dataclass
class PTQDStats:
    """PTQD's per-timestep tables over the training-timestep grid [0, T) (see module docstring):
    ``k`` (the clipped slope) and ``slope`` (raw), ``bias`` [T, C], ``sigma`` (residual std),
    ``snr`` (‖ε‖/‖ε̂ − ε‖), ``visited`` (measured; other rows interpolated), ``count`` (elements
    measured) and ``normality`` (the residual's normality test, or None)."""

    k: Tensor  # [T] clipped slope
    slope: Tensor  # [T] the raw regression slope (may be negative)
    bias: Tensor  # [T, C]
    sigma: Tensor  # [T]
    snr: Tensor  # [T] ‖ε‖/‖ε̂ − ε‖
    visited: Tensor  # [T] bool: measured (the other rows are interpolated)
    count: Tensor  # [T] elements measured
    normality: Normality | None = None

    def __post_init__(self) -> None:
        T = self.k.shape[0]
        for name in ("slope", "sigma", "snr", "visited", "count"):
            if getattr(self, name).shape != (T,):
                raise ValueError(f"PTQDStats.{name} must have shape ({T},), got {tuple(getattr(self, name).shape)}")
        if self.bias.dim() != 2 or self.bias.shape[0] != T:
            raise ValueError(f"PTQDStats.bias must have shape ({T}, C), got {tuple(self.bias.shape)}")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.k.shape[0])

    @property
    def channels(self) -> int:
        return int(self.bias.shape[1])

    def tensors(self) -> dict[str, Tensor]:
        out = {n: getattr(self, n) for n in ("k", "slope", "bias", "sigma", "snr", "visited", "count")}
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
        return cls(**{n: ts[n] for n in ("k", "slope", "bias", "sigma", "snr", "visited", "count")}, normality=nm)


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
        self.n_c.index_add_(0, t_idx, torch.full((B, self.C), float(e.shape[2]), dtype=torch.float64))
        self.se_c.index_add_(0, t_idx, e.sum(2))
        self.sd_c.index_add_(0, t_idx, d.sum(2))
        self.see.index_add_(0, t_idx, (e * e).sum((1, 2)))
        self.sed.index_add_(0, t_idx, (e * d).sum((1, 2)))
        self.sdd.index_add_(0, t_idx, (d * d).sum((1, 2)))
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

    def finalize(self, *, normality: bool = True) -> PTQDStats:
        n_c = self.n_c
        n = n_c.sum(1)
        visited = n > 0
        if not bool(visited.any()):
            raise CalibrationError("no prediction pairs were accumulated")
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
        stats = PTQDStats(
            k=fill_table(k, visited).float(), slope=fill_table(slope, visited).float(),
            bias=fill_table(bias, visited).float(), sigma=fill_table(sigma, visited).float(),
            snr=log_snr.exp().float(), visited=visited, count=n,
        )
        if normality and self.subsamples:
            stats.normality = self._normality(k, bias)
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
            seed: int = 0) -> PTQDStats:
    """PTQD statistics of ``quantized`` against ``fp`` on the input dicts ``data``.

    ``data`` are denoiser inputs recorded along FP trajectories (``stepq.calibration.collect``); with
    ``guidance_scale != 1`` each dict is the batched [cond; uncond] call and the statistics are taken
    on the guidance-combined prediction. ``fp`` may be the list ``predictions(fp_model, data, ...)``
    (reused across measurements). ``channels`` keeps the first channels of the outputs (learned
    variance); by default all of them. ``timestep_arg`` names the timestep input, ``num_train_timesteps``
    is T, ``timestep_scale`` maps a call's timestep to the integer grid; ``normality_samples`` and
    ``seed`` as in ``ErrorAccumulator``. Timesteps map to table rows as in the compiled graph
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
    stats = acc.finalize(normality=bool(normality_samples))
    log.info("PTQD statistics on %d timesteps: k in [%.4f, %.4f], sigma_q in [%.4f, %.4f]",
             int(stats.visited.sum()), float(stats.k.min()), float(stats.k.max()), float(stats.sigma.min()),
             float(stats.sigma.max()))
    return stats
