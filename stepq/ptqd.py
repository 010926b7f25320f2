"""PTQD for users: ``stepq.ptqd.apply`` / ``with_config`` / ``scheduler_for`` and the types to read
its results (the method itself: ``stepq.methods.ptqd``; its stages: the pipeline's "ptqd" phase).

    qm = stepq.quantize(model, example, "w4a8", calibration=calib)        # any converted model
    qm = stepq.ptqd.apply(qm, model, data)                                 # data: FP-trajectory inputs
    sched = stepq.ptqd.scheduler_for(qm, DDPMScheduler.from_config(cfg))   # the variance schedule
    images = sample(make_denoiser(qm), sched, noise, 100)

``stepq.quantize`` does the same for recipes with a ``ptqd`` section (on its calibration data).
"""

from __future__ import annotations

from stepq.artifact.plots import plot_ptqd_statistics as plot_statistics
from stepq.compiler.api import apply_ptqd as apply
from stepq.compiler.api import ptqd_with_config as with_config
from stepq.methods.ptqd import (
    ChooseBits,
    ErrorAccumulator,
    Estimator,
    LayerCost,
    MeasureNoise,
    MixedPrecision,
    Normality,
    PTQDConfig,
    PTQDScheduler,
    PTQDStats,
    UnsupportedSchedulerError,
    bit_operations,
    choose_bits,
    copy_model,
    fill_table,
    forward_snr,
    kernel_bandwidth,
    layer_costs,
    measure,
    predictions,
    scheduler_for,
    scheduler_kind,
    set_bits,
    specialize,
)

__all__ = [
    "ChooseBits",
    "ErrorAccumulator",
    "Estimator",
    "LayerCost",
    "MeasureNoise",
    "MixedPrecision",
    "Normality",
    "PTQDConfig",
    "PTQDScheduler",
    "PTQDStats",
    "UnsupportedSchedulerError",
    "apply",
    "bit_operations",
    "choose_bits",
    "copy_model",
    "fill_table",
    "forward_snr",
    "kernel_bandwidth",
    "layer_costs",
    "measure",
    "plot_statistics",
    "predictions",
    "scheduler_for",
    "scheduler_kind",
    "set_bits",
    "specialize",
    "with_config",
]
