"""Observers reduced over the ranks of a process group: every rank ends with what one process would
have recorded on all the ranks' data together.

Per observer and per training-timestep entry (``ActivationStats``):

    count, Σx, Σx²   SUM    (float64; a rank that saw nothing for a layer or a timestep adds zeros)
    min, max         MIN / MAX (exact: the same floats as one process, bit for bit)
    reservoirs       all-gathered (value, key) pairs, then the same A-ES selection: the ``size``
                     largest keys of the union. A-ES keys are u^(1/w) per item, independent of which
                     stream drew them, so the top keys of the union are a weighted sample of the
                     union of the streams: the sample one process would keep, drawn with other
                     random numbers (each rank's observers draw from ``rank_seed(seed)``). Ranks
                     are concatenated in rank order, so the result is deterministic for a seed and a
                     world size.

Percentile and MSE scales, TDQ's per-timestep initial tables and PTQD's lower-width scales read
these statistics, so they see the global data; they match a one-process run up to the sampling
error of the reservoir (see docs/DISTRIBUTED.md), min-max scales match exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from stepq.calibration.observers import ActivationObserver, ActivationStats, Reservoir
from stepq.compiler.distributed import all_reduce, gather_rows, is_distributed, rank_seed

__all__ = ["reduce_observers", "reseed_observers"]

_OVERALL = -1  # the row tag of the overall reservoir (per-timestep ones carry their timestep)


def reseed_observers(observers: Sequence[ActivationObserver]) -> None:
    """Give every rank's observers their own random stream (rank 0 keeps the single-process one)."""
    if not is_distributed():
        return
    for obs in observers:
        obs._gen.manual_seed(rank_seed(obs.seed))


def reduce_observers(observers: Sequence[ActivationObserver]) -> None:
    """Reduce every observer's statistics over the ranks, in place (see the module docstring)."""
    if not is_distributed() or not observers:
        return
    stats = [obs.stats for obs in observers]
    sums = all_reduce(torch.cat([torch.stack([s.count, s.sum, s.sumsq]) for s in stats]), dist.ReduceOp.SUM)
    mins = all_reduce(torch.cat([torch.stack([s.min, -s.max]) for s in stats]), dist.ReduceOp.MIN)
    for i, s in enumerate(stats):
        s.count, s.sum, s.sumsq = sums[3 * i].clone(), sums[3 * i + 1].clone(), sums[3 * i + 2].clone()
        s.min, s.max = mins[2 * i].clone(), -mins[2 * i + 1]
        _merge_reservoirs(s)


def _rows(s: ActivationStats) -> Tensor:
    """[n, 3] float64 (tag, key, value): every kept value of the observer's reservoirs."""
    parts = []
    for tag, res in [(_OVERALL, s.overall), *sorted(s.per_timestep.items())]:
        v, k = res.sample()
        parts.append(torch.stack([torch.full_like(v, float(tag), dtype=torch.float64), k.double(), v.double()], 1))
    return torch.cat(parts) if parts else torch.empty(0, 3, dtype=torch.float64)


def _merge_reservoirs(s: ActivationStats) -> None:
    rows = torch.cat(gather_rows(_rows(s)))  # rank order
    tags = rows[:, 0].long()
    overall = Reservoir(s.overall.size)
    sel = tags == _OVERALL
    overall.merge(rows[sel, 2].float(), rows[sel, 1].float())
    s.overall = overall
    per: dict[int, Reservoir] = {}
    for t in torch.unique(tags[tags >= 0]).tolist():
        sel = tags == t
        res = Reservoir(s.per_timestep_size)
        res.merge(rows[sel, 2].float(), rows[sel, 1].float())
        per[int(t)] = res
    s.per_timestep = per
