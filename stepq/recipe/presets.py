"""Preset recipes.

Every preset quantizes the input of every Linear and Conv2d per tensor (affine, unsigned grid) and
their weights per output channel (symmetric), keeps the attention matmuls in floating point, and
keeps at 8 bits, by rule, the first layers after the sample input (input conv / patch embedding),
the last layers before the output, and the timestep-embedding MLP. The roles are found from the
graph's structure, not from layer names, so the same preset works on any denoiser.

TDQ presets ``wXaY-tdq`` add timestep-dependent activation step sizes (an MLP of t, fitted in PTQ),
``wXaY-steptable`` the baseline with one free step per timestep, ``w4a4-qat`` LSQ quantization-aware
training with static steps and ``w4a4-tdq-qat`` LSQ with TDQ generators. PTQD presets
``w4a8-ptqd`` / ``w4a4-ptqd`` add the noise correction (correlated part, bias, variance schedule) and
``mixed-ptqd`` W4 weights with 4- or 8-bit activations chosen per timestep (SNR^Q > 100·SNR^F), plus
the correction;
``-tdq-ptqd`` variants put them on TDQ step sizes. EfficientDM presets ``w4a4-qalora``,
``w4a8-qalora``, ``w2a8-qalora`` train QALoRA adapters by distillation from the FP model with TALSQ
(a learned activation step and zero point per timestep); ``-no-talsq`` keeps static activation steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from stepq.compiler.errors import RecipeError
from stepq.recipe.specs import (
    LayerRule,
    LayerSpec,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    PerChannel,
    PerTensor,
    PTQDConfig,
    QALoRAConfig,
    QATConfig,
    QuantSpec,
    Recipe,
    TDQConfig,
)

__all__ = ["activation_spec", "get_preset", "preset_names", "qalora_recipe", "qalora_weight_spec", "register_preset",
           "static_recipe", "ternary_recipe", "weight_spec"]

_PRESETS: dict[str, Callable[[], Recipe]] = {}


def register_preset(name: str, factory: Callable[[], Recipe]) -> None:
    if name in _PRESETS:
        raise RecipeError(f"preset {name!r} is already registered")
    _PRESETS[name] = factory


def preset_names() -> list[str]:
    """The names of every registered preset, sorted (``stepq presets`` describes each in one line)."""
    return sorted(_PRESETS)


def get_preset(name: str) -> Recipe:
    """A fresh ``Recipe`` for the preset ``name``; an unknown name raises ``RecipeError`` listing the presets."""
    try:
        factory = _PRESETS[name]
    except KeyError:
        raise RecipeError(f"unknown preset {name!r}; available presets: {', '.join(preset_names())}") from None
    return factory()


def weight_spec(bits: int) -> QuantSpec:
    """Per-output-channel symmetric weights; below 8 bits the range is found by MSE search."""
    observer = MinMaxObserver() if bits >= 8 else MSEObserver()
    return QuantSpec(bits=bits, signed=True, symmetric=True, granularity=PerChannel(0), observer=observer)


def activation_spec(bits: int) -> QuantSpec:
    """Per-tensor affine activations on an unsigned grid (what ORT's u8 integer kernels take)."""
    observer = PercentileObserver(99.99) if bits >= 8 else MSEObserver()
    return QuantSpec(bits=bits, signed=False, symmetric=False, granularity=PerTensor(), observer=observer)


def static_recipe(name: str, w_bits: int, a_bits: int, *, keep_bits: int = 8) -> Recipe:
    """The static PTQ recipe family WxAy."""
    keep = LayerSpec(weight=weight_spec(keep_bits), activation=activation_spec(keep_bits))
    main = LayerSpec(weight=weight_spec(w_bits), activation=activation_spec(a_bits))
    return Recipe(
        name=name,
        rules=(
            LayerRule(spec=None, ops=frozenset({"attention"}), name="attention-matmuls-float"),
            LayerRule(spec=keep, roles=frozenset({"input", "output"}), name=f"io-layers-{keep_bits}bit"),
            LayerRule(spec=keep, roles=frozenset({"timestep_embedding"}), name=f"timestep-mlp-{keep_bits}bit"),
        ),
        default=main,
    )


def _static_factory(w_bits: int, a_bits: int) -> Callable[[], Recipe]:
    return lambda: static_recipe(f"w{w_bits}a{a_bits}", w_bits, a_bits)


def _tdq_factory(w_bits: int, a_bits: int, method: Literal["mlp", "table"] = "mlp",
                 qat: bool = False) -> Callable[[], Recipe]:
    suffix = ("-tdq" if method == "mlp" else "-steptable") + ("-qat" if qat else "")
    return lambda: static_recipe(f"w{w_bits}a{a_bits}", w_bits, a_bits).replace(
        name=f"w{w_bits}a{a_bits}{suffix}", tdq=TDQConfig(method=method), qat=QATConfig() if qat else None)


for _w, _a in ((8, 8), (4, 8), (4, 4), (8, 4)):
    register_preset(f"w{_w}a{_a}", _static_factory(_w, _a))
    register_preset(f"w{_w}a{_a}-tdq", _tdq_factory(_w, _a))
    register_preset(f"w{_w}a{_a}-steptable", _tdq_factory(_w, _a, "table"))
register_preset("w4a4-qat", lambda: static_recipe("w4a4", 4, 4).replace(name="w4a4-qat", qat=QATConfig()))
register_preset("w4a4-tdq-qat", _tdq_factory(4, 4, qat=True))


#: the SNR margin of the ``mixed-*ptqd`` presets
MIXED_SNR_MARGIN = 100.0


def _ptqd_factory(w_bits: int, a_bits: int, *, mixed: bool = False, tdq: bool = False) -> Callable[[], Recipe]:
    name = ("mixed" if mixed else f"w{w_bits}a{a_bits}") + ("-tdq" if tdq else "") + "-ptqd"
    # mixed: SNR^Q > 100·SNR^F. The paper's rule (margin 1) ran 85 % of the steps at A4 on both digits
    # models and sampled between W4A8 and W4A4; margin 100 runs 45-53 % at A4 with W4A8's FD (docs/PTQD.md)
    cfg = PTQDConfig(mixed_bits=(4, 8), snr_margin=MIXED_SNR_MARGIN) if mixed else PTQDConfig()
    return lambda: static_recipe(f"w{w_bits}a{a_bits}", w_bits, a_bits).replace(
        name=name, ptqd=cfg, tdq=TDQConfig() if tdq else None)


for _tdq in (False, True):
    register_preset(f"w4a8{'-tdq' if _tdq else ''}-ptqd", _ptqd_factory(4, 8, tdq=_tdq))
    register_preset(f"w4a4{'-tdq' if _tdq else ''}-ptqd", _ptqd_factory(4, 4, tdq=_tdq))
    # mixed precision: the W4A8 graph, whose default-rule activations switch to 4 bits per timestep
    register_preset(f"mixed{'-tdq' if _tdq else ''}-ptqd", _ptqd_factory(4, 8, mixed=True, tdq=_tdq))


def qalora_weight_spec(bits: int) -> QuantSpec:
    """EfficientDM's weight quantizer: per output channel, asymmetric (a zero point per channel); below
    8 bits the range is found by MSE search."""
    observer = MinMaxObserver() if bits >= 8 else MSEObserver()
    return QuantSpec(bits=bits, signed=True, symmetric=False, granularity=PerChannel(0), observer=observer)


def qalora_recipe(w_bits: int, a_bits: int, *, talsq: bool = True, **config: object) -> Recipe:
    """EfficientDM at WxAy: the static recipe's rules (8-bit input / output / timestep-embedding layers,
    float attention matmuls) with asymmetric per-channel weights, a QALoRA adapter on every other
    quantized Linear and Conv2d, and (``talsq``) a learned activation step and zero point per timestep."""
    base = static_recipe(f"w{w_bits}a{a_bits}", w_bits, a_bits)
    main = LayerSpec(weight=qalora_weight_spec(w_bits), activation=activation_spec(a_bits))
    name = f"w{w_bits}a{a_bits}-qalora" + ("" if talsq else "-no-talsq")
    return base.replace(name=name, default=main, qalora=QALoRAConfig(talsq=talsq, **config))  # type: ignore[arg-type]


for _w, _a in ((4, 4), (4, 8), (2, 8)):
    for _talsq in (True, False):
        register_preset(f"w{_w}a{_a}-qalora" + ("" if _talsq else "-no-talsq"),
                        (lambda w, a, t: lambda: qalora_recipe(w, a, talsq=t))(_w, _a, _talsq))


# -- TerDiT ------------------------------------------------------------------------------------------
#: the blocks of a DiT-like model (diffusers transformer_blocks / single_transformer_blocks, DiT's blocks)
TERNARY_BLOCKS = r"(.*\.)?(transformer_blocks|single_transformer_blocks|blocks|layers)\.\d+\..*"


def ternary_recipe(name: str, *, rmsnorm: bool = True, packing: Literal["base3", "2bit"] = "base3",
                   steps: int = 1000, lr: float = 2e-4, scale_lr: float = 1e-4) -> Recipe:
    """TerDiT: ternary weights (per-tensor γ, learned α) for the linears of the transformer blocks,
    adaLN modulation linears included; weight-only 8-bit for the patch embedding, the timestep MLP,
    the final layer and whatever else lies outside the blocks (the authors keep those in float);
    activations float. ``rmsnorm`` inserts the RMSNorm after each block's adaLN linear."""
    from stepq.recipe.specs import TerDiTConfig, TernarySpec

    w8 = LayerSpec(weight=weight_spec(8))
    return Recipe(
        name=name,
        rules=(
            LayerRule(spec=None, ops=frozenset({"attention"}), name="attention-matmuls-float"),
            LayerRule(spec=w8, roles=frozenset({"input", "output"}), name="io-layers-w8"),
            LayerRule(spec=w8, roles=frozenset({"timestep_embedding"}), name="timestep-mlp-w8"),
            LayerRule(spec=LayerSpec(weight=TernarySpec(packing=packing)), pattern=TERNARY_BLOCKS,
                      ops=frozenset({"linear"}), name="block-linears-ternary"),
        ),
        default=w8,
        qat=QATConfig(steps=steps, lr=lr, scale_lr=scale_lr, batch_size=64),
        terdit=TerDiTConfig(rmsnorm=rmsnorm),
    )


register_preset("ternary-dit", lambda: ternary_recipe("ternary-dit"))
register_preset("ternary-dit-no-rmsnorm", lambda: ternary_recipe("ternary-dit-no-rmsnorm", rmsnorm=False))
