"""PTQD (He et al., NeurIPS 2023) for any denoiser and any diffusers DDPM / DDIM schedule.

* ``statistics``: k_t, b_t, σ_q(t), SNR^Q(t) and the residual's normality, measured on FP-trajectory
  inputs, as tables over the training timesteps;
* ``stepq.passes.correct_noise``: (ε̂ − b_t)/(1 + k_t) on the denoiser output, gathered by timestep;
* ``scheduler``: ``PTQDScheduler`` lowers DDPM / DDIM noise by the residual variance;
* ``mixed``: step-aware activation bit-widths (``stepq.passes.select_bits`` in the graph), BOPs;
* ``steps``: the pipeline's PTQD steps (choose_bits, measure_noise); ``stepq.ptqd.apply`` runs the
  pipeline's "ptqd" phase on a compiled model. Recipes: ``w4a8-ptqd``, ``w4a4-ptqd``, ``mixed-ptqd``
  (and ``-tdq-ptqd``). See docs/PTQD.md.

ONNX: ``qm.export_onnx(path)`` of a mixed-precision model writes one file with an If over its widths
(each branch one ``specialize(qm, b)``); that export belongs to the ONNX backend
(``stepq.backends.onnx.mixed``).
"""

from __future__ import annotations

from stepq.methods.ptqd.mixed import (
    LayerCost,
    MixedPrecision,
    bit_operations,
    choose_bits,
    forward_snr,
    layer_costs,
    set_bits,
    specialize,
)
from stepq.methods.ptqd.scheduler import (
    PTQDScheduler,
    UnsupportedSchedulerError,
    scheduler_for,
    scheduler_kind,
)
from stepq.methods.ptqd.state import register_codecs
from stepq.methods.ptqd.statistics import (
    ErrorAccumulator,
    Estimator,
    Normality,
    PTQDStats,
    fill_table,
    kernel_bandwidth,
    measure,
    predictions,
)
from stepq.methods.ptqd.steps import ChooseBits, MeasureNoise, copy_model
from stepq.recipe.specs import PTQDConfig

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
    "bit_operations",
    "choose_bits",
    "copy_model",
    "fill_table",
    "forward_snr",
    "kernel_bandwidth",
    "layer_costs",
    "measure",
    "predictions",
    "scheduler_for",
    "scheduler_kind",
    "set_bits",
    "specialize",
]


register_codecs()
