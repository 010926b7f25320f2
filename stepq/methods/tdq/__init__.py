"""TDQ (So et al., NeurIPS 2023): activation step sizes as a function of the timestep.

``sources``: the scale sources (``ScaleGenerators``, the MLP of a Fourier encoding; ``ScaleTable``,
the free per-step baseline); ``fit``: their PTQ fit by reconstruction. The graph side is the
``insert_scale_source`` / ``freeze_scale_source`` passes; docs/TDQ.md.
"""

from stepq.methods.tdq.fit import FitScaleSource, ScaleFit, curvature, fit_scale_source, merge_batches
from stepq.methods.tdq.sources import (
    ScaleGenerators,
    ScaleTable,
    fourier_features,
    fourier_frequencies,
    grid_frequencies,
    inverse_softplus,
)

__all__ = ["FitScaleSource", "ScaleFit", "ScaleGenerators", "ScaleTable", "curvature", "fit_scale_source",
           "fourier_features", "fourier_frequencies", "grid_frequencies", "inverse_softplus", "merge_batches"]
