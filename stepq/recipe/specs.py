"""Quantization specs, layer rules and recipes: frozen, validated dataclasses.

A ``Recipe`` is policy only. It maps a quantizable op (its module path, op kind and structural
roles) to a ``LayerSpec`` through an ordered list of ``LayerRule``; the first rule that matches
wins, a rule whose spec is None keeps the layer in floating point, and ``Recipe.default`` decides
every op no rule matches. The passes read the decision from ``node.meta``; nothing here touches a
graph, so policies can be tested on their own.

Grids are the standard ones: signed [−2^(b−1), 2^(b−1)−1], unsigned [0, 2^b−1], 2 ≤ b ≤ 8.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self

from stepq.compiler.errors import RecipeError

__all__ = [
    "DISTRIBUTED_MODES",
    "OP_KINDS",
    "RECIPE_VERSION",
    "ROLE_NAMES",
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
]

#: bump when the serialised form of a Recipe changes incompatibly.
RECIPE_VERSION = 1

#: op kinds a rule can select: Linear, Conv2d, and the activation×activation matmuls of attention.
OP_KINDS = frozenset({"linear", "conv2d", "attention"})

#: structural roles, computed from the graph (see ``stepq.compiler.analysis``):
#: "input" (first layers after the sample input), "output" (last layers before the model output),
#: "timestep_embedding" (the MLP on the sinusoidal timestep encoding), "conditioning" (every op
#: whose input does not depend on the noisy sample: timestep/class/adaLN projections).
ROLE_NAMES = frozenset({"input", "output", "timestep_embedding", "conditioning"})

#: ``Recipe.distributed``: replicated parameters with averaged gradients, or FSDP2-sharded ones
#: (``stepq.compiler.fsdp.MODES``: the same two)
DISTRIBUTED_MODES = ("ddp", "fsdp")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RecipeError(msg)


# ---------------------------------------------------------------------------------------------
# granularity


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero point for the whole tensor."""

    kind: ClassVar[str] = "per_tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale per slice along ``axis`` (output channels of a weight: axis 0)."""

    axis: int = 0
    kind: ClassVar[str] = "per_channel"


@dataclass(frozen=True)
class PerGroup:
    """Blocks of ``group_size`` consecutive elements along ``axis`` share a scale (weights only)."""

    group_size: int = 64
    axis: int = 1
    kind: ClassVar[str] = "per_group"

    def __post_init__(self) -> None:
        _check(self.group_size >= 2 and self.group_size & (self.group_size - 1) == 0,
               f"PerGroup.group_size must be a power of two >= 2, got {self.group_size}")


Granularity = PerTensor | PerChannel | PerGroup

# ---------------------------------------------------------------------------------------------
# observers


@dataclass(frozen=True)
class MinMaxObserver:
    """The range is [min, max] of everything seen."""

    kind: ClassVar[str] = "minmax"


@dataclass(frozen=True)
class PercentileObserver:
    """The range is the [100−p, p] percentile interval of the values seen."""

    percentile: float = 99.99
    kind: ClassVar[str] = "percentile"

    def __post_init__(self) -> None:
        _check(50.0 < self.percentile <= 100.0,
               f"PercentileObserver.percentile must be in (50, 100], got {self.percentile}")


@dataclass(frozen=True)
class MSEObserver:
    """Shrink the min-max range by (1 − i/num_candidates) and keep the candidate with the smallest
    mean |x − Q(x)|^norm (the LAPQ / Q-Diffusion search; norm 2.4 in their code, 2 here by default).

    ``num_candidates`` ranges are tried, from the full min-max range down to ``1 − max_shrink`` of it;
    the cost is one quantize-dequantize of the observed tensor per candidate."""

    num_candidates: int = 80
    norm: float = 2.0
    max_shrink: float = 0.8
    kind: ClassVar[str] = "mse"

    def __post_init__(self) -> None:
        _check(self.num_candidates >= 1, f"MSEObserver.num_candidates must be >= 1, got {self.num_candidates}")
        _check(self.norm > 0, f"MSEObserver.norm must be > 0, got {self.norm}")
        _check(0 < self.max_shrink < 1, f"MSEObserver.max_shrink must be in (0, 1), got {self.max_shrink}")


ObserverSpec = MinMaxObserver | PercentileObserver | MSEObserver

_GRANULARITIES: dict[str, type] = {c.kind: c for c in (PerTensor, PerChannel, PerGroup)}
_OBSERVERS: dict[str, type] = {c.kind: c for c in (MinMaxObserver, PercentileObserver, MSEObserver)}

# ---------------------------------------------------------------------------------------------
# quant spec


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: grid, symmetry, granularity and how its range is observed.

    ``bits``: the grid width (2…8); ``signed``: the grid [−2^(b−1), 2^(b−1)−1], else [0, 2^b−1];
    ``symmetric``: zero point 0 (needs ``signed``), else an affine zero point; ``granularity``:
    ``PerTensor()``, ``PerChannel(axis)`` or ``PerGroup(axis, size)``; ``observer``: how the range
    is found (``MinMaxObserver``, ``PercentileObserver``, ``MSEObserver``)."""

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: Granularity = field(default_factory=PerTensor)
    observer: ObserverSpec = field(default_factory=MinMaxObserver)

    def __post_init__(self) -> None:
        _check(isinstance(self.bits, int) and 2 <= self.bits <= 8,
               f"QuantSpec.bits must be an integer in [2, 8], got {self.bits!r}")
        _check(not (self.symmetric and not self.signed),
               "QuantSpec: a symmetric spec needs a signed grid (signed=True); "
               "use symmetric=False for an unsigned (affine) grid")
        _check(isinstance(self.granularity, (PerTensor, PerChannel, PerGroup)),
               f"QuantSpec.granularity must be PerTensor, PerChannel or PerGroup, got {self.granularity!r}")
        _check(isinstance(self.observer, (MinMaxObserver, PercentileObserver, MSEObserver)),
               f"QuantSpec.observer must be MinMaxObserver, PercentileObserver or MSEObserver, got {self.observer!r}")

    @property
    def quant_min(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def quant_max(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "signed": self.signed,
            "symmetric": self.symmetric,
            "granularity": {"kind": self.granularity.kind, **dataclasses.asdict(self.granularity)},
            "observer": {"kind": self.observer.kind, **dataclasses.asdict(self.observer)},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantSpec:
        d = dict(d)
        gran = _tagged(d.pop("granularity", {"kind": "per_tensor"}), _GRANULARITIES, "granularity")
        obs = _tagged(d.pop("observer", {"kind": "minmax"}), _OBSERVERS, "observer")
        _no_unknown(d, {"bits", "signed", "symmetric"}, "QuantSpec")
        return cls(granularity=gran, observer=obs, **d)


def _tagged(d: Mapping[str, Any], table: Mapping[str, type], what: str) -> Any:
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in table:
        raise RecipeError(f"unknown {what} kind {kind!r}; expected one of {sorted(table)}")
    cls = table[kind]
    _no_unknown(d, {f.name for f in dataclasses.fields(cls)}, cls.__name__)
    return cls(**d)


def _no_unknown(d: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = set(d) - set(allowed)
    if unknown:
        raise RecipeError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


@dataclass(frozen=True)
class TernarySpec:
    """A ternary weight (TerDiT): W_q = α·clip(round(W/(γ+eps)), −1, 1), γ = mean|W| per tensor or
    per output channel, α learned (initialised to γ), identity straight-through estimator.

    Weight-only (a layer's activation spec stays None or any QuantSpec). ``packing`` is how the codes
    are stored at convert: ``"base3"`` (5 per byte, 1.6 bits) or ``"2bit"`` (4 per byte). ``bits`` is
    the width of the integer grid the codes live on (2), for reports and backends. ``granularity``:
    ``PerTensor()`` (one γ and α per tensor, TerDiT's) or ``PerChannel(0)`` (one per output channel);
    ``eps`` keeps the division finite for an all-zero weight.
    """

    granularity: PerTensor | PerChannel = field(default_factory=PerTensor)
    packing: Literal["base3", "2bit"] = "base3"
    eps: float = 1e-6
    kind: ClassVar[str] = "ternary"
    bits: ClassVar[int] = 2
    quant_min: ClassVar[int] = -1
    quant_max: ClassVar[int] = 1

    def __post_init__(self) -> None:
        _check(isinstance(self.granularity, PerTensor) or (isinstance(self.granularity, PerChannel)
                                                           and self.granularity.axis == 0),
               f"TernarySpec.granularity must be PerTensor() or PerChannel(0), got {self.granularity!r}")
        _check(self.packing in ("base3", "2bit"), f"TernarySpec.packing must be 'base3' or '2bit', got {self.packing!r}")
        _check(self.eps > 0, f"TernarySpec.eps must be > 0, got {self.eps}")

    @property
    def axis(self) -> int | None:
        return None if isinstance(self.granularity, PerTensor) else 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "packing": self.packing, "eps": self.eps,
                "granularity": {"kind": self.granularity.kind, **dataclasses.asdict(self.granularity)}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TernarySpec:
        d = dict(d)
        d.pop("kind", None)
        gran = _tagged(d.pop("granularity", {"kind": "per_tensor"}), _GRANULARITIES, "granularity")
        _no_unknown(d, {"packing", "eps"}, "TernarySpec")
        return cls(granularity=gran, **d)


WeightSpec = QuantSpec | TernarySpec


def _weight_from_dict(d: Mapping[str, Any]) -> WeightSpec:
    return TernarySpec.from_dict(d) if d.get("kind") == TernarySpec.kind else QuantSpec.from_dict(d)


# ---------------------------------------------------------------------------------------------
# layer spec and rules


@dataclass(frozen=True)
class LayerSpec:
    """What to do with one quantizable op: a weight spec and an input-activation spec (either may
    be None = leave that operand in floating point)."""

    weight: QuantSpec | TernarySpec | None = None
    activation: QuantSpec | None = None

    def __post_init__(self) -> None:
        _check(self.weight is None or isinstance(self.weight, (QuantSpec, TernarySpec)),
               f"LayerSpec.weight must be a QuantSpec, a TernarySpec or None, got {self.weight!r}")
        _check(self.activation is None or isinstance(self.activation, QuantSpec),
               f"LayerSpec.activation must be a QuantSpec or None, got {self.activation!r}")
        if self.activation is not None:
            _check(not isinstance(self.activation.granularity, PerGroup),
                   "LayerSpec.activation: per-group granularity is for weights only")
            _check(not isinstance(self.activation.granularity, PerChannel),
                   "LayerSpec.activation: integer kernels need one activation scale per tensor; "
                   "use PerTensor (timestep-dependent scales come from TDQ tables)")

    @property
    def is_float(self) -> bool:
        return self.weight is None and self.activation is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "weight": None if self.weight is None else self.weight.to_dict(),
            "activation": None if self.activation is None else self.activation.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> LayerSpec | None:
        if d is None:
            return None
        _no_unknown(d, {"weight", "activation"}, "LayerSpec")
        w, a = d.get("weight"), d.get("activation")
        return cls(weight=None if w is None else _weight_from_dict(w),
                   activation=None if a is None else QuantSpec.from_dict(a))


@dataclass(frozen=True)
class LayerRule:
    """Selects ops by module-path regex (``re.fullmatch``; None = any path), op kind and role.

    All given conditions must hold. ``spec`` None keeps the selected ops in floating point.
    ``pattern``: the regex over the op's module path (``transformer_blocks\\.0\\..*``); ``ops``: op
    kinds (``linear``, ``conv2d``, ``attention``…); ``roles``: structural roles found from the graph
    (``input``, ``output``, ``timestep_embedding``…; empty = any); ``name``: shown in reports and
    in the graph's ``stepq.rule`` meta.
    """

    spec: LayerSpec | None
    pattern: str | None = None
    ops: frozenset[str] = OP_KINDS
    roles: frozenset[str] = frozenset()
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", frozenset(self.ops))
        object.__setattr__(self, "roles", frozenset(self.roles))
        _check(self.spec is None or isinstance(self.spec, LayerSpec),
               f"LayerRule.spec must be a LayerSpec or None, got {self.spec!r}")
        bad = self.ops - OP_KINDS
        _check(not bad and bool(self.ops), f"LayerRule.ops: unknown op kind(s) {sorted(bad)}; known: {sorted(OP_KINDS)}")
        bad = self.roles - ROLE_NAMES
        _check(not bad, f"LayerRule.roles: unknown role(s) {sorted(bad)}; known: {sorted(ROLE_NAMES)}")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise RecipeError(f"LayerRule.pattern {self.pattern!r} is not a valid regex: {e}") from None

    def matches(self, path: str, op_kind: str, roles: Iterable[str] = ()) -> bool:
        if op_kind not in self.ops:
            return False
        if self.roles and not (self.roles & frozenset(roles)):
            return False
        return self.pattern is None or re.fullmatch(self.pattern, path) is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pattern": self.pattern,
            "ops": sorted(self.ops),
            "roles": sorted(self.roles),
            "spec": None if self.spec is None else self.spec.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerRule:
        _no_unknown(d, {"name", "pattern", "ops", "roles", "spec"}, "LayerRule")
        return cls(spec=LayerSpec.from_dict(d.get("spec")), pattern=d.get("pattern"),
                   ops=frozenset(d.get("ops", sorted(OP_KINDS))), roles=frozenset(d.get("roles", ())),
                   name=d.get("name", ""))


# ---------------------------------------------------------------------------------------------
# recipe


TimestepPolicy = Literal["error", "clamp"]


class _Section:
    """What the recipe's method sections (TDQ, QAT, PTQD) share: replace, to_dict, from_dict."""

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}  # JSON has no tuples

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Self | None:
        if d is None:
            return None
        _no_unknown(d, {f.name for f in dataclasses.fields(cls)}, cls.__name__)  # type: ignore[arg-type]
        return cls(**d)


@dataclass(frozen=True)
class TDQConfig(_Section):
    """Timestep-dependent activation step sizes (TDQ, So et al. 2023).

    ``method="mlp"``: per activation quantizer, s(t) = softplus(MLP(fourier(t))), an MLP of 4 linear
    layers (``hidden`` wide, ReLU) on a geometric Fourier encoding of t (``fourier_dim`` features,
    periods up to ``t_max``). ``method="table"``: the baseline without a generator, one free step size
    per training timestep (unvisited timesteps interpolated). Both start from the calibrated static
    step and are frozen into a length-T table at convert time. In PTQ (no ``Recipe.qat``) they are fit
    after calibration by reconstruction (``fit_objective``) for ``fit_steps`` Adam steps; a step takes
    ``fit_rows`` random samples from each of ``fit_batch`` random calibration batches (so one step
    sees ``fit_batch`` timesteps). ``fit_objective`` is what the fit reconstructs: the whole
    network's output (``"output"``, the default: the FP model as teacher, gradients through every
    quantizer by the STE) or each quantized layer's output from FP inputs (``"layer"``; on the
    digits models it made TDQ worse than static steps, see docs/TDQ.md).

    Smooth in t (the fit sees only the calibration's timesteps; the step sizes must behave between
    them, e.g. for another sampler; docs/TDQ.md, "Smooth in t"): ``frequencies`` is the encoding's
    frequency set, ``"geometric"`` (the paper's, ω_k = t_max^(−k/(D/2)): periods from ~6 timesteps
    up) or ``"grid"`` (set by the fit from the visited timesteps: periods from 4× the largest gap
    between them, half the Nyquist limit of that spacing, up to 2T; ``t_max`` is then unused).
    ``smoothness`` weights a penalty on the curvature of log s(t), the mean squared second difference
    on the integer grid at random timesteps, added to the fit's loss (``method="mlp"`` only).
    ``holdout`` is the fraction of the visited timesteps (whole timesteps, not samples) kept out of
    the fit; the held-out loss is evaluated every ``holdout_every`` steps and the parameters of its
    minimum are restored at the end (``prog.state.fit_holdout_curve``). The three act in the PTQ fit;
    QAT (``Recipe.qat``) trains at uniformly random timesteps and ignores them. ``frequencies="geometric"``,
    ``smoothness=0``, ``holdout=0`` (the defaults) are the fit without any of this; the defaults are
    kept because the behaviour lock records the TDQ presets.
    """

    method: Literal["mlp", "table"] = "mlp"
    fourier_dim: int = 64
    hidden: int = 64
    t_max: float = 10000.0
    fit_steps: int = 300
    fit_lr: float = 5e-3
    fit_batch: int = 8
    fit_rows: int = 4
    fit_objective: Literal["layer", "output"] = "output"
    time_budget_s: float | None = None
    seed: int = 0
    frequencies: Literal["grid", "geometric"] = "geometric"
    smoothness: float = 0.0
    holdout: float = 0.0
    holdout_every: int = 10

    def __post_init__(self) -> None:
        _check(self.method in ("mlp", "table"), f"TDQConfig.method must be 'mlp' or 'table', got {self.method!r}")
        _check(self.fourier_dim >= 2 and self.fourier_dim % 2 == 0,
               f"TDQConfig.fourier_dim must be an even integer >= 2, got {self.fourier_dim}")
        _check(self.hidden >= 1, f"TDQConfig.hidden must be >= 1, got {self.hidden}")
        _check(self.t_max > 0, f"TDQConfig.t_max must be > 0, got {self.t_max}")
        _check(self.fit_steps >= 0, f"TDQConfig.fit_steps must be >= 0, got {self.fit_steps}")
        _check(self.fit_lr > 0, f"TDQConfig.fit_lr must be > 0, got {self.fit_lr}")
        _check(self.fit_batch >= 1, f"TDQConfig.fit_batch must be >= 1, got {self.fit_batch}")
        _check(self.fit_rows >= 1, f"TDQConfig.fit_rows must be >= 1, got {self.fit_rows}")
        _check(self.fit_objective in ("layer", "output"),
               f"TDQConfig.fit_objective must be 'layer' or 'output', got {self.fit_objective!r}")
        _check(self.frequencies in ("grid", "geometric"),
               f"TDQConfig.frequencies must be 'grid' or 'geometric', got {self.frequencies!r}")
        _check(isinstance(self.smoothness, (int, float)) and math.isfinite(self.smoothness) and self.smoothness >= 0,
               f"TDQConfig.smoothness must be a finite number >= 0, got {self.smoothness!r}")
        _check(self.method == "mlp" or self.smoothness == 0,
               f"TDQConfig.smoothness penalises the generators' curvature; method={self.method!r} has none "
               f"(set smoothness=0)")
        _check(isinstance(self.holdout, (int, float)) and 0 <= self.holdout < 1,
               f"TDQConfig.holdout must be a fraction in [0, 1), got {self.holdout!r}")
        _check(isinstance(self.holdout_every, int) and self.holdout_every >= 1,
               f"TDQConfig.holdout_every must be an integer >= 1, got {self.holdout_every!r}")



@dataclass(frozen=True)
class QATConfig(_Section):
    """LSQ quantization-aware training on the denoising loss: weights, weight step sizes and
    activation step sizes (or TDQ generators) are learned with the straight-through estimator; the
    step sizes' gradients are scaled by 1/sqrt(N·Q_P) (Esser et al. 2020)."""

    steps: int = 500
    lr: float = 1e-4
    scale_lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.steps >= 1, f"QATConfig.steps must be >= 1, got {self.steps}")
        _check(self.lr > 0 and self.scale_lr > 0, "QATConfig learning rates must be > 0")
        _check(self.batch_size >= 1, f"QATConfig.batch_size must be >= 1, got {self.batch_size}")



@dataclass(frozen=True)
class PTQDConfig(_Section):
    """PTQD (He et al., NeurIPS 2023): quantization-noise correction and step-aware mixed precision.

    The quantized prediction is modelled as ε̂ = (1 + k_t)·ε + b_t + r_t. ``correlated`` divides the
    output by (1 + k_t), ``bias`` subtracts b_t first, ``variance`` lets ``PTQDScheduler`` absorb the
    residual's variance σ_q(t)² into the sampler noise. ``mixed_bits`` (e.g. (4, 8)) switches the
    activation bit-width per timestep: the smallest width whose SNR^Q(t) exceeds SNR^F(t); empty =
    no mixed precision. The statistics are measured on the guidance-combined prediction at
    ``guidance_scale`` (the scale the measuring data was recorded with); ``normality_samples`` caps
    the residual elements per timestep kept for the normality test. ``snr_margin`` m makes the bit
    choice stricter: a width qualifies when SNR^Q(t) > m·SNR^F(t) (the paper's rule is m = 1).
    ``seed`` seeds the subsampling of residuals for the normality test. Cost: one pass of the
    quantized and the FP model over the measuring data (no training).

    The estimator (docs/PTQD.md, "Statistics that transfer"; ``stepq.methods.ptqd.statistics``).
    Every estimate carries a standard error from the between-sample variance (the sample, not the
    element, is the unit: the elements of one image are strongly correlated). ``shrinkage="kernel"``
    pools the sufficient statistics of neighbouring measured timesteps with Gaussian weights of
    ``bandwidth`` timesteps (None: the median gap between the measured timesteps) into smooth k_t,
    b_t, σ_q(t) over the whole grid; ``"none"`` keeps one estimate per measured timestep, linearly
    interpolated between them. ``bias_shrinkage`` pulls each b_t,c toward 0 (``"zero"``) or the
    all-channel bias (``"pooled"``) by b ← g + (b − g)·max(0, 1 − se²/(b − g)²). ``gate_z`` z > 0
    applies a term only where it exceeds z standard errors (k_t ≥ z·se, |b_t,c| ≥ z·se; else 0).
    ``shrinkage="none"``, ``bias_shrinkage="none"``, ``gate_z=0`` (the defaults) are the plain
    tables of the paper's estimator. ``sampler_samples``: the FP trajectories per sampler that
    ``stepq.quantize(..., samplers=[...])`` records as PTQD's measuring data.
    """

    correlated: bool = True
    bias: bool = True
    variance: bool = True
    mixed_bits: tuple[int, ...] = ()
    snr_margin: float = 1.0
    guidance_scale: float = 1.0
    normality_samples: int = 20000
    seed: int = 0
    shrinkage: Literal["none", "kernel"] = "none"
    bandwidth: float | None = None
    bias_shrinkage: Literal["none", "zero", "pooled"] = "none"
    gate_z: float = 0.0
    sampler_samples: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "mixed_bits", tuple(self.mixed_bits))
        bits = self.mixed_bits
        _check(all(isinstance(b, int) and 2 <= b <= 8 for b in bits),
               f"PTQDConfig.mixed_bits must be integers in [2, 8], got {bits!r}")
        _check(not bits or (len(bits) >= 2 and list(bits) == sorted(set(bits))),
               f"PTQDConfig.mixed_bits must be empty or at least two distinct widths in ascending order, got {bits!r}")
        _check(self.guidance_scale > 0, f"PTQDConfig.guidance_scale must be > 0, got {self.guidance_scale}")
        _check(self.snr_margin > 0, f"PTQDConfig.snr_margin must be > 0, got {self.snr_margin}")
        _check(self.normality_samples >= 8,
               f"PTQDConfig.normality_samples must be >= 8 (scipy's normaltest needs 8), got {self.normality_samples}")
        _check(self.shrinkage in ("none", "kernel"),
               f"PTQDConfig.shrinkage must be 'none' or 'kernel', got {self.shrinkage!r}")
        _check(self.bandwidth is None or (isinstance(self.bandwidth, (int, float)) and self.bandwidth > 0),
               f"PTQDConfig.bandwidth must be None or > 0 (timesteps), got {self.bandwidth!r}")
        _check(self.bandwidth is None or self.shrinkage == "kernel",
               f"PTQDConfig.bandwidth is the kernel's; it needs shrinkage='kernel', got shrinkage={self.shrinkage!r}")
        _check(self.bias_shrinkage in ("none", "zero", "pooled"),
               f"PTQDConfig.bias_shrinkage must be 'none', 'zero' or 'pooled', got {self.bias_shrinkage!r}")
        _check(isinstance(self.gate_z, (int, float)) and math.isfinite(self.gate_z) and self.gate_z >= 0,
               f"PTQDConfig.gate_z must be a finite number >= 0, got {self.gate_z!r}")
        _check(isinstance(self.sampler_samples, int) and self.sampler_samples >= 1,
               f"PTQDConfig.sampler_samples must be an integer >= 1, got {self.sampler_samples!r}")



@dataclass(frozen=True)
class QALoRAConfig(_Section):
    """EfficientDM (He et al., ICLR 2024): QALoRA adapters trained by data-free distillation.

    Every weight-quantized Linear and Conv2d whose structural roles avoid ``exclude_roles`` (the
    8-bit input, output and timestep-embedding layers, as in the authors' code) gets a rank-``rank``
    adapter: the forward weight is fake_quant(deq(W₀) + B·A) with the calibrated per-channel steps,
    so the adapter is trained through the quantizer that ships. Training runs the FP model along
    its own sampler trajectories (the calibration's sampling, or ``stepq.Sampling``); at every
    denoising step the quantized model's (guidance-combined) ε is pulled to the FP ε by MSE, one
    AdamW step per denoising step (``steps`` of them, linear decay), ``batch_size`` trajectories at
    a time of ``num_inference_steps`` steps each (None: the sampling's).

    Learning rates: a LoRA layer's is ``lora_lr · mean(Δ_w)`` of that layer when ``scale_aware``
    (the authors' per-layer form, lr = mean(Δ_w)/2500 over 16 000 steps; it works under Adam,
    gradient scaling does not; 0.1 was the best of 4e-4 … 0.4 at a 200-step budget on the digits
    DiT, docs/EFFICIENTDM.md), else ``lora_lr`` times the mean of mean(Δ_w) over the adapted layers (one rate, the same
    average). Weight steps Δ_w learn at ``weight_step_lr``; zero points of weights stay fixed.
    ``talsq``: one learned activation step and zero point per timestep (a table gathered by t) at
    ``act_lr``; timesteps the trajectories never visit are interpolated. ``order``: ``"shuffled"``
    (default: the teacher's steps of ``buffer_trajectories`` trajectory batches kept and served as
    shuffled minibatches across samples and timesteps; same cost; on the digits DiT at DDIM-20 FD
    5.43 → 3.67 at W4A4 and 3.02 → 2.23 at W4A8, FP 2.17) or ``"trajectory"`` (the authors' loop, one
    step per denoising step in sampling order, docs/EFFICIENTDM.md). At convert the adapters are
    folded: W_int = round((deq(W₀) + B·A)/Δ_w) + z_w with the trained Δ_w, z_w. ``seed`` seeds the
    adapters' initialisation and the trajectories' noise.

    Cost: ``steps`` forward + backward passes of the quantized model plus as many FP forwards, on
    ``batch_size`` samples (with guidance, twice that); the 400-step digits-DiT run of
    docs/EFFICIENTDM.md took minutes on 2 CPU cores (its measured time: results/efficientdm_cost.json).
    """

    rank: int = 32
    steps: int = 400
    batch_size: int = 8
    num_inference_steps: int | None = None
    lora_lr: float = 0.1
    scale_aware: bool = True
    weight_step_lr: float = 1e-6
    act_lr: float = 5e-4
    talsq: bool = True
    exclude_roles: tuple[str, ...] = ("input", "output", "timestep_embedding")
    seed: int = 0
    order: str = "shuffled"
    buffer_trajectories: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude_roles", tuple(self.exclude_roles))
        _check(isinstance(self.rank, int) and self.rank >= 1, f"QALoRAConfig.rank must be an integer >= 1, got {self.rank!r}")
        _check(isinstance(self.steps, int) and self.steps >= 0, f"QALoRAConfig.steps must be an integer >= 0, got {self.steps!r}")
        _check(self.batch_size >= 1, f"QALoRAConfig.batch_size must be >= 1, got {self.batch_size}")
        _check(self.num_inference_steps is None or self.num_inference_steps >= 1,
               f"QALoRAConfig.num_inference_steps must be None or >= 1, got {self.num_inference_steps}")
        _check(self.lora_lr > 0 and self.act_lr > 0 and self.weight_step_lr >= 0,
               "QALoRAConfig learning rates must be > 0 (weight_step_lr >= 0)")
        _check(self.order in ("trajectory", "shuffled"),
               f"QALoRAConfig.order must be 'trajectory' or 'shuffled', got {self.order!r}")
        _check(isinstance(self.buffer_trajectories, int) and self.buffer_trajectories >= 1,
               f"QALoRAConfig.buffer_trajectories must be an integer >= 1, got {self.buffer_trajectories!r}")
        bad = set(self.exclude_roles) - ROLE_NAMES
        _check(not bad, f"QALoRAConfig.exclude_roles: unknown role(s) {sorted(bad)}; known: {sorted(ROLE_NAMES)}")


@dataclass(frozen=True)
class TerDiTConfig(_Section):
    """TerDiT (ternary DiT): ``rmsnorm`` inserts an RMSNorm (weight initialised to 1, ``rmsnorm_eps``)
    over every block's adaLN modulation output before its chunk into shift / scale / gate
    (``stepq.passes.insert_rmsnorm``); the ternary weights themselves are ``TernarySpec`` rules, and
    the training settings are the recipe's ``qat`` section (steps, lr for weights, ``scale_lr`` for α).
    ``grad_clip`` clips the global gradient norm of each training step (None: no clipping).

    Cost: ``qat.steps`` forward + backward passes on ``qat.batch_size`` real images (the shipped
    digits DiT: 1000 steps of 64, docs/TERDIT.md)."""

    rmsnorm: bool = True
    rmsnorm_eps: float = 1e-6
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        _check(self.rmsnorm_eps > 0, f"TerDiTConfig.rmsnorm_eps must be > 0, got {self.rmsnorm_eps}")
        _check(self.grad_clip is None or self.grad_clip > 0,
               f"TerDiTConfig.grad_clip must be None or > 0, got {self.grad_clip}")


@dataclass(frozen=True)
class Recipe:
    """An ordered rule list, a default, and the settings the method passes read.

    ``name`` names it in reports and artefacts; ``rules`` are tried in order for every op (first
    match wins) and ``default`` (a ``LayerSpec``, or None = float) takes the ops no rule selects.
    ``num_train_timesteps`` is T: timestep-indexed tables have T entries, indexed by the integer
    training timestep. ``timestep_policy`` says what a timestep outside [0, T) does: raise
    (``"error"``) or clamp with a warning (``"clamp"``). Method sections (None = not used):
    ``tdq`` (``TDQConfig``), ``qat`` (``QATConfig``), ``ptqd`` (``PTQDConfig``), ``qalora``
    (``QALoRAConfig``), ``terdit`` (``TerDiTConfig``); their docstrings say what each costs.
    ``version`` is the recipe format's version (checked by ``from_dict``). ``distributed`` says how
    the training loops (TDQ fit, QAT, QALoRA, ternary QAT) run under a process group: ``"ddp"``
    (every rank holds every parameter, gradients all-reduced) or ``"fsdp"`` (FSDP2: the program's
    parameters sharded over the ranks while a loop runs, gathered back after it; docs/DISTRIBUTED.md);
    without a process group both run as one process does.
    """

    name: str
    rules: tuple[LayerRule, ...] = ()
    default: LayerSpec | None = None
    num_train_timesteps: int = 1000
    timestep_policy: TimestepPolicy = "error"
    tdq: TDQConfig | None = None
    qat: QATConfig | None = None
    ptqd: PTQDConfig | None = None
    qalora: QALoRAConfig | None = None
    version: int = RECIPE_VERSION
    terdit: TerDiTConfig | None = None
    distributed: Literal["ddp", "fsdp"] = "ddp"

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        _check(self.tdq is None or isinstance(self.tdq, TDQConfig), f"Recipe.tdq must be a TDQConfig or None, got {self.tdq!r}")
        _check(self.qat is None or isinstance(self.qat, QATConfig), f"Recipe.qat must be a QATConfig or None, got {self.qat!r}")
        _check(self.ptqd is None or isinstance(self.ptqd, PTQDConfig),
               f"Recipe.ptqd must be a PTQDConfig or None, got {self.ptqd!r}")
        _check(self.qalora is None or isinstance(self.qalora, QALoRAConfig),
               f"Recipe.qalora must be a QALoRAConfig or None, got {self.qalora!r}")
        _check(self.qalora is None or self.qat is None,
               "Recipe: qalora (distillation of adapters) and qat (LSQ on the denoising loss) both train; pick one")
        _check(self.terdit is None or isinstance(self.terdit, TerDiTConfig),
               f"Recipe.terdit must be a TerDiTConfig or None, got {self.terdit!r}")
        _check(isinstance(self.name, str) and bool(self.name), "Recipe.name must be a non-empty string")
        for i, r in enumerate(self.rules):
            _check(isinstance(r, LayerRule), f"Recipe.rules[{i}] must be a LayerRule, got {type(r).__name__}")
        _check(self.default is None or isinstance(self.default, LayerSpec),
               f"Recipe.default must be a LayerSpec or None, got {self.default!r}")
        _check(isinstance(self.num_train_timesteps, int) and self.num_train_timesteps >= 1,
               f"Recipe.num_train_timesteps must be a positive integer, got {self.num_train_timesteps!r}")
        _check(self.timestep_policy in ("error", "clamp"),
               f"Recipe.timestep_policy must be 'error' or 'clamp', got {self.timestep_policy!r}")
        _check(self.distributed in DISTRIBUTED_MODES,
               f"Recipe.distributed must be one of {', '.join(map(repr, DISTRIBUTED_MODES))}, got {self.distributed!r}")
        _check(self.version == RECIPE_VERSION,
               f"Recipe.version {self.version} is not supported (this stepq reads version {RECIPE_VERSION})")

    def spec_for(self, path: str, op_kind: str, roles: Iterable[str] = ()) -> tuple[LayerSpec | None, str]:
        """The spec for one op and the name of the rule that decided it ("default" if none)."""
        roles = frozenset(roles)
        for i, rule in enumerate(self.rules):
            if rule.matches(path, op_kind, roles):
                return rule.spec, rule.name or f"rules[{i}]"
        return self.default, "default"

    @property
    def quantizes_anything(self) -> bool:
        specs = [r.spec for r in self.rules] + [self.default]
        return any(s is not None and not s.is_float for s in specs)

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "name": self.name,
            "num_train_timesteps": self.num_train_timesteps,
            "timestep_policy": self.timestep_policy,
            "rules": [r.to_dict() for r in self.rules],
            "default": None if self.default is None else self.default.to_dict(),
            "tdq": None if self.tdq is None else self.tdq.to_dict(),
            "qat": None if self.qat is None else self.qat.to_dict(),
            "ptqd": None if self.ptqd is None else self.ptqd.to_dict(),
        } | ({} if self.qalora is None else {"qalora": self.qalora.to_dict()}) \
          | ({} if self.terdit is None else {"terdit": self.terdit.to_dict()}) \
          | ({} if self.distributed == "ddp" else {"distributed": self.distributed})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        if not isinstance(d, Mapping):
            raise RecipeError(f"a recipe must be a mapping, got {type(d).__name__}")
        _no_unknown(d, {"version", "name", "num_train_timesteps", "timestep_policy", "rules", "default", "tdq", "qat",
                          "ptqd", "qalora", "terdit", "distributed"},
                    "Recipe")
        version = d.get("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise RecipeError(f"recipe version {version} is not supported (this stepq reads {RECIPE_VERSION})")
        return cls(
            name=d["name"],
            rules=tuple(LayerRule.from_dict(r) for r in d.get("rules", ())),
            default=LayerSpec.from_dict(d.get("default")),
            num_train_timesteps=d.get("num_train_timesteps", 1000),
            timestep_policy=d.get("timestep_policy", "error"),
            tdq=TDQConfig.from_dict(d.get("tdq")),
            qat=QATConfig.from_dict(d.get("qat")),
            ptqd=PTQDConfig.from_dict(d.get("ptqd")),
            qalora=QALoRAConfig.from_dict(d.get("qalora")),
            version=version,
            terdit=TerDiTConfig.from_dict(d.get("terdit")),
            distributed=d.get("distributed", "ddp"),
        )
