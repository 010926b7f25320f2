"""stepq: a compiler that makes PyTorch diffusion denoisers low-bit.

    qm = stepq.quantize(model, example_inputs, recipe="w8a8", calibration=data)
    qm(**inputs); qm.report(); qm.save(path); stepq.load(path)
    qpipe = stepq.quantize_pipeline(pipe, "w8a8", prompts=[...])   # a diffusers pipeline, calibrated on its own calls

Step by step: ``capture`` → ``prepare`` → ``calibrate`` → (``train``) → ``convert``; the stages of
every phase are listed in one place, ``stepq.build_pipeline(recipe)``.
"""

from __future__ import annotations

import logging as _logging

from stepq import ptqd
from stepq.artifact.quantized_model import QuantizedModel, load
from stepq.calibration.collect import Sampling
from stepq.compiler import ops as _ops  # noqa: F401  - registers the stepq:: ops
from stepq.compiler.api import calibrate, convert, prepare, quantize, train
from stepq.compiler.capture import capture
from stepq.compiler.errors import (
    ArtifactError,
    CalibrationError,
    CaptureError,
    FallbackWarning,
    InputSignatureError,
    PassError,
    RecipeError,
    StepqError,
    StepqWarning,
    TimestepRangeError,
    UnsupportedConversionError,
)
from stepq.compiler.pipeline import At, build_pipeline
from stepq.compiler.program import Program
from stepq.pipelines import quantize_pipeline
from stepq.recipe.presets import get_preset, preset_names
from stepq.recipe.specs import (  # TerDiT
    LayerRule,
    LayerSpec,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    PerChannel,
    PerGroup,
    PerTensor,
    PTQDConfig,
    QALoRAConfig,
    QuantSpec,
    Recipe,
    TerDiTConfig,
    TernarySpec,
)

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "At",
    "CalibrationError",
    "CaptureError",
    "InputSignatureError",
    "LayerRule",
    "LayerSpec",
    "MSEObserver",
    "MinMaxObserver",
    "PTQDConfig",
    "PassError",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "PercentileObserver",
    "Program",
    "QALoRAConfig",
    "QuantSpec",
    "QuantizedModel",
    "Recipe",
    "RecipeError",
    "Sampling",
    "StepqError",
    "TimestepRangeError",
    "build_pipeline",
    "calibrate",
    "capture",
    "convert",
    "get_preset",
    "load",
    "prepare",
    "preset_names",
    "ptqd",
    "quantize",
    "train",
]

__all__ += ["TerDiTConfig", "TernarySpec"]
__all__ += ["FallbackWarning", "StepqWarning", "UnsupportedConversionError", "quantize_pipeline"]

_logging.getLogger(__name__).addHandler(_logging.NullHandler())
