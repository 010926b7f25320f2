"""TALSQ (EfficientDM, He et al. ICLR 2024): one learned activation step and zero point per timestep.

Per activation quantizer l and training timestep t ∈ [0, T), a free step Δ_l(t) and zero point
z_l(t), both starting from the calibrated static values (the authors start every step from the
same naive calibration) and learned by LSQ through ``stepq::fake_quant`` during distillation. The
module is a scale source (``stepq.passes.InsertScaleSource``): it maps the integer timestep index
[B] to the steps [L, B], and its ``zero_point_source`` maps it to the zero points [L, B], so the
pass feeds both. ``tables()`` / ``zero_point_tables()`` give the frozen [L, T] tables
(``freeze_scale_source``): the timesteps the trajectories never visited are interpolated linearly
between visited neighbours (zero points then rounded to the integer grid), so one model serves any
schedule and step count. The authors instead keep T = 100 entries and subsample them for 20 steps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stepq.compiler.fsdp import replicate_like
from stepq.compiler.timesteps import interpolate_unvisited
from stepq.recipe.specs import Recipe

__all__ = ["TemporalSteps", "TemporalZeroPoints", "make_temporal_steps"]

#: the smallest step a table entry may take (steps stay positive while training)
MIN_STEP = 1e-8


class TemporalZeroPoints(nn.Module):
    """The zero points of ``TemporalSteps``: z[l, t], a float parameter rounded inside the quantizer."""

    def __init__(self, zero_points: Tensor, num_train_timesteps: int):
        super().__init__()
        self.z = nn.Parameter(zero_points.detach().float()[:, None].repeat(1, num_train_timesteps))

    def forward(self, t: Tensor) -> Tensor:
        return self.z[:, t.long().reshape(-1)]  # [L, B]


class TemporalSteps(nn.Module):
    """A free activation step and zero point per quantizer and training timestep (see module docstring)."""

    def __init__(self, names: list[str], static_scales: Tensor, static_zero_points: Tensor, *,
                 num_train_timesteps: int = 1000):
        super().__init__()
        L = len(names)
        if static_scales.shape != (L,) or static_zero_points.shape != (L,):
            raise ValueError(f"need one static scale and zero point per quantizer ({L}), got shapes "
                             f"{tuple(static_scales.shape)} and {tuple(static_zero_points.shape)}")
        self.names = list(names)
        self.num_train_timesteps = num_train_timesteps
        self.delta = nn.Parameter(static_scales.detach().float()[:, None].repeat(1, num_train_timesteps))
        self.zero_point_source = TemporalZeroPoints(static_zero_points, num_train_timesteps)
        self.visited: Tensor
        self.register_buffer("visited", torch.zeros(num_train_timesteps, dtype=torch.bool))

    def forward(self, t: Tensor) -> Tensor:
        idx = t.long().reshape(-1)
        if self.training:
            self.visited[idx] = True
        return self.delta[:, idx]  # [L, B]

    @torch.no_grad()
    def clamp_(self, quant_min: Tensor, quant_max: Tensor) -> None:
        """Keep the steps positive and each row's zero points on its grid [quant_min, quant_max] ([L] each;
        the table may be an FSDP2 shard of its rows: the bounds are then replicated beside it)."""
        self.delta.clamp_(min=MIN_STEP)
        z = self.zero_point_source.z
        z.copy_(torch.maximum(torch.minimum(z, replicate_like(quant_max[:, None], z)), replicate_like(quant_min[:, None], z)))

    @torch.no_grad()
    def tables(self) -> Tensor:
        """[L, T] steps, unvisited timesteps interpolated."""
        return interpolate_unvisited(self.delta.detach().clamp_min(MIN_STEP), self.visited)

    @torch.no_grad()
    def zero_point_tables(self) -> Tensor:
        """[L, T] zero points, unvisited timesteps interpolated, rounded to the integer grid."""
        return torch.round(interpolate_unvisited(self.zero_point_source.z.detach(), self.visited))

    def extra_repr(self) -> str:
        return f"quantizers={len(self.names)}, timesteps={self.num_train_timesteps}, visited={int(self.visited.sum())}"


def make_temporal_steps(recipe: Recipe, names: list[str], static: Tensor, zero_points: Tensor) -> nn.Module:
    """The scale-source factory of a QALoRA recipe with TALSQ (``InsertScaleSource(make_temporal_steps)``)."""
    return TemporalSteps(names, static, zero_points, num_train_timesteps=recipe.num_train_timesteps)
