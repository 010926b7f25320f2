"""Recipes: what to quantize and how. Quantizer specs, layer rules, method sections, presets.

Policy only: nothing here touches a graph. ``stepq.passes.annotate_layers`` applies a recipe.
"""

from stepq.recipe.presets import get_preset, preset_names, register_preset
from stepq.recipe.specs import (
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
    QATConfig,
    QuantSpec,
    Recipe,
    TDQConfig,
    TerDiTConfig,
    TernarySpec,
)

__all__ = [
    "LayerRule",
    "LayerSpec",
    "MSEObserver",
    "MinMaxObserver",
    "PTQDConfig",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "PercentileObserver",
    "QALoRAConfig",
    "QATConfig",
    "QuantSpec",
    "Recipe",
    "TDQConfig",
    "TerDiTConfig",
    "TernarySpec",
    "get_preset",
    "preset_names",
    "register_preset",
]
