"""The whole pipeline, in order. Optional passes appear inline; a left-out pass says why.

    capture → prepare (build_pipeline) → calibrate (observers, then materialize) → convert
    (build_convert_pipeline) → lower (a backend)
"""

from __future__ import annotations

from stepq.compiler.pass_manager import Pass, Skip
from stepq.methods.ptqd.mixed import CalibrateWidths
from stepq.methods.tdq.sources import make_scale_source
from stepq.passes import (
    AnnotateLayers,
    AttachTimestepTables,
    CanonicalizeExport,
    CorrectNoise,
    FreezeScaleSource,
    InsertQuantizers,
    InsertScaleSource,
    MaterializeQuantizers,
    QuantizeWeights,
    SelectBits,
)
from stepq.recipe.specs import Recipe

__all__ = ["build_calibration_pipeline", "build_convert_pipeline", "build_pipeline"]


def build_pipeline(recipe: Recipe) -> list[Pass | Skip | None]:
    """Passes run by ``prepare``."""
    return [
        # canonical form: what torch.export leaves that later stages cannot take
        CanonicalizeExport(),
        # policy: the recipe annotates every quantizable op
        AnnotateLayers(recipe),
        # mechanism: quantizers and observers where the annotations ask for them
        InsertQuantizers() if recipe.quantizes_anything else Skip("insert_quantizers", "the recipe keeps every layer in floating point"),
    ]


def build_calibration_pipeline(recipe: Recipe) -> list[Pass | Skip | None]:
    """Passes run by ``calibrate`` once the observers have seen the data."""
    return [
        # observers → fake-quant ops with frozen scales
        MaterializeQuantizers(),
        # TDQ: step sizes from generators (or a free per-timestep table) of the timestep, trained next
        InsertScaleSource(make_scale_source) if recipe.tdq is not None else Skip("insert_scale_source", "the recipe has no TDQ section"),
    ]


def build_convert_pipeline(recipe: Recipe) -> list[Pass | Skip | None]:
    """Passes run by ``convert``."""
    return [
        # TDQ: generators evaluated at every training timestep → tables; the generators go
        FreezeScaleSource() if recipe.tdq is not None else Skip("freeze_scale_source", "the recipe has no TDQ section"),
        # activation scales → gathers from per-timestep tables (those in prog.state)
        AttachTimestepTables(),
        # PTQD step-aware mixed precision: each lower width's scales from the calibration statistics (state only)
        CalibrateWidths() if recipe.ptqd is not None and recipe.ptqd.mixed_bits
        else Skip("calibrate_widths", "the recipe has no PTQD mixed precision"),
        # PTQD step-aware mixed precision: a branch per activation width, picked by a bits table gathered by t
        SelectBits() if recipe.ptqd is not None and recipe.ptqd.mixed_bits
        else Skip("select_bits", "the recipe has no PTQD mixed precision"),
        # PTQD: (ε̂ − b_t)/(1 + k_t) on the output; identity until stepq.methods.ptqd.apply measures the statistics
        CorrectNoise() if recipe.ptqd is not None else Skip("correct_noise", "the recipe has no PTQD section"),
        # weights → integers (packed below 8 bits) + dequantize
        QuantizeWeights(),
    ]
