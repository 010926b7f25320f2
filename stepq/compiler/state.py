"""The program's typed state: what the methods know about a program that is not in its graph.

Every field has one writer (named below) and a fixed type. The artefact saves the fields that
have a codec (``stepq.artifact.store.STATE_CODECS``) under the state version ``STATE_VERSION``;
a loaded model whose state was written under another version is refused, not guessed at.

| field | type | written by | read by |
|---|---|---|---|
| activation_stats | {quantizer: ActivationStats} | materialize_quantizers | calibrate_widths, PTQD, TDQ benchmarks |
| timestep_tables | {quantizer: TimestepTable} | freeze_scale_source (TDQ), users | attach_timestep_tables, refresh_tables, calibrate_widths |
| report_batch | one bound calibration call | calibrate | convert's report |
| report | [LayerReport] | convert | QuantizedModel.report, the artefact |
| fit_curve | [float] | the TDQ fit | benchmarks, tests |
| fit_holdout_curve | [(steps done, float)] | the TDQ fit with held-out timesteps | benchmarks, tests |
| qat_curve | [float] | LSQ QAT | benchmarks, tests |
| distill_curve | [float] | EfficientDM's distillation | benchmarks, tests |
| ptqd | PTQDStats | PTQD statistics | correct_noise, refresh_tables, PTQDScheduler |
| ptqd_bits | MixedPrecision | PTQD mixed precision | calibrate_widths, select_bits, refresh_tables, the ONNX backend |
| ptqd_scales | {quantizer: {bits: QParams}} | calibrate_widths (PTQD mixed precision) | select_bits, refresh_tables |

``ptqd_scales`` holds, per switched activation quantizer and lower width b, the scale and zero point
of its b-bit branch: 0-d for a static quantizer, [T] tables when the quantizer reads timestep tables
(TDQ). It is derived from ``activation_stats`` and not saved (a loaded model has no statistics).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from stepq.artifact.report import LayerReport
    from stepq.calibration.observers import ActivationStats
    from stepq.methods.ptqd.mixed import MixedPrecision
    from stepq.methods.ptqd.statistics import PTQDStats

__all__ = ["STATE_VERSION", "ProgramState", "QParams", "TimestepTable"]

#: the version of the state layout the artefact records; bump it when a field changes meaning.
STATE_VERSION = 2


@dataclass
class TimestepTable:
    """Per-timestep quantizer parameters: ``scale[t]`` and ``zero_point[t]`` for t in [0, T)."""

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __post_init__(self) -> None:
        if self.scale.dim() != 1 or self.scale.shape != self.zero_point.shape:
            raise ValueError(f"a timestep table needs 1-D scale and zero point of one length, got "
                             f"{tuple(self.scale.shape)} and {tuple(self.zero_point.shape)}")
        if not bool((self.scale > 0).all()):
            raise ValueError("a timestep table's scales must be positive")


@dataclass
class QParams:
    """A scale and zero point of one shape: 0-d (one value) or [T] (one per training timestep)."""

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __post_init__(self) -> None:
        if self.scale.shape != self.zero_point.shape or self.scale.dim() > 1:
            raise ValueError(f"QParams needs a scale and zero point of one shape, 0-d or 1-D, got "
                             f"{tuple(self.scale.shape)} and {tuple(self.zero_point.shape)}")


@dataclass
class ProgramState:
    """Named, typed method state of a ``Program`` (see the module docstring for who writes what)."""

    activation_stats: dict[str, ActivationStats] = field(default_factory=dict)
    timestep_tables: dict[str, TimestepTable] = field(default_factory=dict)
    report_batch: dict[str, Any] | None = None
    report: list[LayerReport] = field(default_factory=list)
    fit_curve: list[float] | None = None
    fit_holdout_curve: list[tuple[int, float]] | None = None
    qat_curve: list[float] | None = None
    distill_curve: list[float] | None = None
    ptqd: PTQDStats | None = None
    ptqd_bits: MixedPrecision | None = None
    ptqd_scales: dict[str, dict[int, QParams]] = field(default_factory=dict)

    def copy(self) -> ProgramState:
        """A shallow copy: new containers at the top, the same statistics objects inside."""
        return dataclasses.replace(self, activation_stats=dict(self.activation_stats),
                                   timestep_tables=dict(self.timestep_tables), report=list(self.report),
                                   ptqd_scales=dict(self.ptqd_scales))

    def has(self, name: str) -> bool:
        """Whether the field ``name`` holds something (a non-empty container, or not None)."""
        value = getattr(self, name)
        return bool(value) if isinstance(value, (dict, list)) else value is not None

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))
