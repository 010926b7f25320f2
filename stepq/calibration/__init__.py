"""Calibration: denoiser inputs along real sampler trajectories, and the statistics taken on them.

* ``collect``: the inputs a denoiser receives along FP trajectories of a diffusers scheduler
  (``combine``: several collections, e.g. several samplers, as one);
* ``samplers``: the sampling loop, classifier-free guidance, model-output conventions;
* ``observers``: activation statistics, overall and per training timestep (reservoir samples);
* ``qparams``: scales and zero points from ranges (min-max, percentile, MSE search);
* ``probe``: the program run with its quantizers bypassed, per-layer outputs, SQNR.
"""

from stepq.calibration.collect import CalibrationData, Sampling, collect, collect_samplings, combine

__all__ = ["CalibrationData", "Sampling", "collect", "collect_samplings", "combine"]
