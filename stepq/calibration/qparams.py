"""Scale and zero point from an observed range, and the range searches of the observers.

For a range [lo, hi] (widened to contain 0, so that 0 is exactly representable):

    symmetric:  s = max(|lo|, |hi|) / qmax,                 z = 0
    affine:     s = (hi − lo) / (qmax − qmin),              z = clamp(qmin − round(lo / s), qmin, qmax)

Percentile observers take [lo, hi] from the [100−p, p] percentiles of the observed values. MSE
observers shrink the min-max range by r ∈ [1 − max_shrink, 1] and keep, per channel, the r that
minimises mean |x − Q_r(x)|^norm: a coarse grid of ``num_candidates`` values, then the same number
again on a grid one coarse step wide around the best.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from stepq.compiler.distributed import full_weight
from stepq.recipe.specs import MSEObserver, PercentileObserver, PerChannel, PerGroup, PerTensor, QuantSpec

if TYPE_CHECKING:
    from stepq.calibration.observers import ActivationStats

__all__ = ["activation_qparams", "low_bit_qparams", "low_bit_spec", "observed", "qparams_from_range", "weight_qparams"]

_EPS = 1e-8


def qparams_from_range(lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    qmin, qmax = spec.quant_min, spec.quant_max
    if spec.symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / qmax, min=_EPS)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=_EPS)
    zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zp


def _qerror(x: Tensor, scale: Tensor, zp: Tensor, spec: QuantSpec, norm: float) -> Tensor:
    """Per-row mean |x − Q(x)|^norm for x [C, N] with scale, zp [C]."""
    s, z = scale[:, None], zp[:, None]
    q = torch.clamp(torch.round(x / s) + z, spec.quant_min, spec.quant_max)
    return ((q - z) * s - x).abs().pow(norm).mean(dim=1)


def _mse_search(x: Tensor, spec: QuantSpec, obs: MSEObserver) -> tuple[Tensor, Tensor]:
    """x: [C, N] rows searched independently."""
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    n = obs.num_candidates
    lo_r = 1.0 - obs.max_shrink
    best_err = torch.full((x.shape[0],), math.inf)
    best_r = torch.ones(x.shape[0])
    coarse = torch.linspace(lo_r, 1.0, n)
    for r in coarse.tolist():
        s, z = qparams_from_range(lo * r, hi * r, spec)
        err = _qerror(x, s, z, spec, obs.norm)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    if n > 1:
        step = (1.0 - lo_r) / (n - 1)
        for k in torch.linspace(-1.0, 1.0, n).tolist():
            r = torch.clamp(best_r + k * step, lo_r, 1.0)
            s, z = qparams_from_range(lo * r, hi * r, spec)
            err = _qerror(x, s, z, spec, obs.norm)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r = torch.where(better, r, best_r)
    return qparams_from_range(lo * best_r, hi * best_r, spec)


def _tail_quantiles(x: Tensor, q: Tensor) -> Tensor:
    """``torch.quantile(x, q, dim=1)`` (linear interpolation) for finite x [C, N], bit for bit, from
    the few order statistics each quantile reads: the two ranks around ``q·(N − 1)`` come from a
    partial ``topk`` of the nearer tail, so a percentile near 0 or 100 (99.99: the 7 largest of
    65,536 values) costs one pass instead of torch.quantile's full sort. Falls back to
    ``torch.quantile`` when a rank lies far from both tails."""
    n = x.shape[1]
    ranks = q.to(x.dtype) * (n - 1)  # torch.quantile's arithmetic, in x's dtype
    below = ranks.to(torch.int64)
    above = ranks.ceil().to(torch.int64)
    reach = max(64, n // 64)  # topk stays a partial sort for k up to n / 64
    if any(min(a + 1, n - b) > reach for b, a in zip(below.tolist(), above.tolist())):
        return torch.quantile(x, q.to(x.dtype), dim=1)
    cols = []
    for r_below, r_above in zip(below.tolist(), above.tolist()):
        if r_above + 1 <= n - r_below:  # the lower tail: ascending order statistics 0 … r_above
            tail = torch.topk(x, r_above + 1, dim=1, largest=False).values
            cols.append((tail[:, r_below], tail[:, r_above]))
        else:  # the upper tail: descending, order statistic r sits at n − 1 − r
            tail = torch.topk(x, n - r_below, dim=1, largest=True).values
            cols.append((tail[:, n - 1 - r_below], tail[:, n - 1 - r_above]))
    values_below = torch.stack([c[0] for c in cols])
    values_above = torch.stack([c[1] for c in cols])
    weights = (ranks - below)[:, None].expand_as(values_below)
    return values_below.lerp_(values_above, weights)


def _rows_qparams(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    obs = spec.observer
    if isinstance(obs, MSEObserver):
        return _mse_search(x, spec, obs)
    if isinstance(obs, PercentileObserver) and obs.percentile < 100.0:
        q = torch.tensor([1.0 - obs.percentile / 100.0, obs.percentile / 100.0])
        if x.shape[1] > 16_000_000 // max(1, x.shape[0]):  # torch.quantile's input limit
            idx = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(0))[: 16_000_000 // x.shape[0]]
            x = x[:, idx]
        lohi = _tail_quantiles(x.float(), q)
        return qparams_from_range(lohi[0], lohi[1], spec)
    return qparams_from_range(x.amin(dim=1), x.amax(dim=1), spec)


def weight_qparams(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, int | None, int]:
    """Scale and zero point of a weight in ONNX layout, with the op's ``axis`` and ``group_size``.

    A sharded weight (a ``DTensor``: FSDP2) is gathered first: the scales are the full weight's."""
    w = full_weight(w.detach()).float()
    g = spec.granularity
    if isinstance(g, PerTensor):
        s, z = _rows_qparams(w.reshape(1, -1), spec)
        return s.reshape(()), z.reshape(()), None, 0
    if isinstance(g, PerChannel):
        ax = g.axis % w.dim()
        rows = w.movedim(ax, 0).reshape(w.shape[ax], -1)
        s, z = _rows_qparams(rows, spec)
        return s, z, ax, 0
    assert isinstance(g, PerGroup)
    ax = g.axis % w.dim()
    n = w.shape[ax]
    groups = math.ceil(n / g.group_size)
    moved = w.movedim(ax, -1)
    pad = groups * g.group_size - n
    if pad:
        # pad with copies of the last element so padding never widens a group's range
        moved = torch.cat([moved, moved[..., -1:].expand(*moved.shape[:-1], pad)], dim=-1)
    blocks = moved.reshape(*moved.shape[:-1], groups, g.group_size)
    s, z = _rows_qparams(blocks.reshape(-1, g.group_size), spec)
    shape = (*moved.shape[:-1], groups)
    s = s.reshape(shape).movedim(-1, ax).contiguous()
    z = z.reshape(shape).movedim(-1, ax).contiguous()
    return s, z, ax, g.group_size


def activation_qparams(values: Tensor, lo: float, hi: float, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Per-tensor scale and zero point of an activation from its observed sample and range."""
    obs = spec.observer
    if isinstance(obs, (MSEObserver, PercentileObserver)) and values.numel() > 0:
        x = values.float().reshape(1, -1)
        if isinstance(obs, MSEObserver):
            s, z = _mse_search(x, spec, obs)
            return s.reshape(()), z.reshape(())
        s, z = _rows_qparams(x, spec)
        return s.reshape(()), z.reshape(())
    s, z = qparams_from_range(torch.tensor([lo]), torch.tensor([hi]), spec)
    return s.reshape(()), z.reshape(())


# -- a quantizer at a lower width (PTQD step-aware mixed precision) -------------------------------


def low_bit_spec(spec: QuantSpec, bits: int) -> QuantSpec:
    """``spec`` at ``bits`` bits (MSE range search below 8 bits, as the presets do)."""
    observer = MSEObserver() if bits < 8 else spec.observer
    return dataclasses.replace(spec, bits=bits, observer=observer)


def observed(st: ActivationStats, steps: Tensor | None) -> tuple[Tensor, float, float]:
    """(values, lo, hi) of a quantizer's calibration statistics, restricted to the training timesteps
    ``steps`` where calibration saw them, else (or with ``steps`` None) over every timestep."""
    if steps is not None:
        seen = [t for t in steps.tolist() if int(t) in st.per_timestep]
        if seen:
            idx = torch.tensor(seen, dtype=torch.int64)
            values = torch.cat([st.samples_at(t) for t in seen])
            return values, float(st.min[idx].min()), float(st.max[idx].max())
    return st.overall.values, st.global_min, st.global_max


def low_bit_qparams(st: ActivationStats, spec: QuantSpec, low: QuantSpec, steps: Tensor | None,
                    tables: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Scale and zero point of an activation quantizer (``spec``, statistics ``st``) at the lower
    width ``low``, calibrated on the training timesteps ``steps`` (None: all).

    Static: ``activation_qparams`` of the observed values at ``low``. With per-timestep tables
    ``tables = (S, Z)`` at ``spec`` (TDQ), the low width gets tables too: the range at each t,
    [qmin − Z(t), qmax − Z(t)]·S(t), shrunk by ``ratio`` = (static ``low`` range) / (static ``spec``
    range) and re-gridded at ``low`` bits.
    """
    values, lo, hi = observed(st, steps)
    s_low, z_low = activation_qparams(values, lo, hi, low)
    if tables is None:
        return s_low, z_low
    s_tab, z_tab = tables
    s_hi, _ = activation_qparams(values, lo, hi, spec)
    ratio = (s_low * (low.quant_max - low.quant_min)) / (s_hi * (spec.quant_max - spec.quant_min))
    lo_t = (spec.quant_min - torch.round(z_tab)) * s_tab * ratio
    hi_t = (spec.quant_max - torch.round(z_tab)) * s_tab * ratio
    s_t, z_t = qparams_from_range(lo_t, hi_t, low)
    return s_t.float(), z_t.float()
