"""The integer timestep grid that every timestep-indexed table uses.

A table has T entries (T = the scheduler's ``num_train_timesteps``, 1000 by default), indexed by the
integer training timestep. A model's timestep input ``t`` maps to ``round(t · timestep_scale)``, so
continuous timesteps (flow matching) land on the grid and one table serves any sampling schedule.
Continuous schedules reach t = T exactly (flow matching starts at σ = 1, t = 1000): the closed
range [0, T] is valid and T maps to the last entry, T − 1.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from stepq.compiler.errors import TimestepRangeError

__all__ = ["timestep_index"]

log = logging.getLogger(__name__)


def timestep_index(t: Tensor, *, scale: float = 1.0, num_train_timesteps: int = 1000,
                   policy: str = "error", where: str = "") -> Tensor:
    """int64 indices into a length-T table for the timestep tensor ``t`` (any shape)."""
    v = t.detach()
    if v.dtype.is_floating_point or scale != 1.0:
        v = torch.round(v.double() * scale)
    idx = v.to(torch.int64)
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if hi == num_train_timesteps and lo >= 0:
            return idx.clamp_max(num_train_timesteps - 1)
        if lo < 0 or hi > num_train_timesteps:
            msg = (f"timestep {lo if lo < 0 else hi} is outside the table range [0, {num_train_timesteps}]"
                   f"{' in ' + where if where else ''}")
            if policy == "error":
                raise TimestepRangeError(msg + "; set the recipe's timestep_policy='clamp' to clamp instead")
            log.warning("%s; clamping", msg)
            idx = idx.clamp(0, num_train_timesteps - 1)
    return idx
