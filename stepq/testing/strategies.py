"""Hypothesis strategies for testing passes: random denoisers with their inputs, recipes, timesteps.

    from hypothesis import given
    from stepq.testing import strategies as sqs

    @given(case=sqs.denoisers(), recipe=sqs.recipes())
    def test_my_pass(case, recipe):
        prog = stepq.prepare(stepq.capture(case.model(), case.example_inputs), recipe)
        ...

Everything is sized for CI (a handful of examples per property on two cores): models of one or two
blocks, 8×8 samples, batches of 2 or 3, TDQ fits of two steps. A ``DenoiserCase`` is a description,
not a model: it builds the model and its inputs on demand, deterministically from its fields, so a
failing example shrinks and replays.

* ``denoiser_configs`` / ``denoisers``: UNet- and DiT-like models (``stepq.testing.random_models``),
  optionally with a class-label and an ``encoder_hidden_states`` input, captured at a random batch
  (the graph has a symbolic batch, so check at another one).
* ``timesteps``: int64 or float32, a scalar or one per sample, within [0, T].
* ``static_recipes``, ``tdq_recipes``, ``ptqd_recipes``: the registered presets of each kind (TDQ
  fits shortened: ``fit_steps`` small, no time budget); ``composed_recipes``: random rule lists
  built from ``layer_rules`` / ``layer_specs`` / ``quant_specs``; ``recipes``: any of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

from stepq.recipe.presets import get_preset, preset_names
from stepq.recipe.specs import (
    OP_KINDS,
    ROLE_NAMES,
    LayerRule,
    LayerSpec,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    PerChannel,
    PerGroup,
    PerTensor,
    PTQDConfig,
    QuantSpec,
    Recipe,
    TDQConfig,
    TernarySpec,
)
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser

__all__ = [
    "DenoiserCase",
    "composed_recipes",
    "denoiser_configs",
    "denoisers",
    "examples",
    "layer_rules",
    "layer_specs",
    "ptqd_recipes",
    "qalora_recipes",
    "quant_specs",
    "recipes",
    "shorten",
    "static_recipes",
    "tdq_recipes",
    "ternary_specs",
    "timesteps",
]

#: the number of training timesteps every generated recipe and timestep uses (the presets' T).
T = 1000

#: the ``max_examples`` of the profile the counts in ``examples`` are written for (``ci``).
_BASE_EXAMPLES = 8


def examples(n: int) -> int:
    """``n`` examples scaled with the loaded hypothesis profile: as written under ``ci``
    (max_examples 8), ×10 under ``nightly`` (80), ×5 under ``dev`` (40). For properties whose
    examples are cheap, which set their own ``max_examples`` far above the profile's."""
    from hypothesis import settings

    current = settings.default
    base = current.max_examples if current is not None else _BASE_EXAMPLES
    return max(1, n * base // _BASE_EXAMPLES)


# -- timesteps -----------------------------------------------------------------------------------


def _timestep_tensor(values: Sequence[float], dtype: torch.dtype, scalar: bool) -> torch.Tensor:
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    t = t.round().to(dtype) if not dtype.is_floating_point else t.to(dtype)
    return t[0] if scalar else t


@st.composite
def timesteps(draw: st.DrawFn, batch: int, *, T: int = T,
              dtypes: Sequence[torch.dtype] = (torch.int64, torch.float32),
              shapes: Sequence[str] = ("batch", "scalar")) -> torch.Tensor:
    """A timestep for a call at ``batch``: ``dtype`` from ``dtypes``; shape ``"batch"`` ([B]) or
    ``"scalar"`` (one step for the whole batch); values in [0, T] (integers in [0, T − 1]: the
    integer grid; floats may reach T, as flow matching's σ = 1 does)."""
    dtype = draw(st.sampled_from(list(dtypes)))
    scalar = draw(st.sampled_from(list(shapes))) == "scalar"
    n = 1 if scalar else batch
    if dtype.is_floating_point:
        values = draw(st.lists(st.floats(0.0, float(T), allow_nan=False, width=32), min_size=n, max_size=n))
    else:
        values = draw(st.lists(st.integers(0, T - 1), min_size=n, max_size=n))
    return _timestep_tensor(values, dtype, scalar)


# -- models --------------------------------------------------------------------------------------


def denoiser_configs(*, kinds: Sequence[str] = ("dit", "unet"), conditioning: bool = True
                     ) -> st.SearchStrategy[RandomDenoiserConfig]:
    """Configs of tiny random denoisers. ``conditioning``: may add class labels and a text-like
    ``encoder_hidden_states`` input."""
    none = st.just(0)
    return st.builds(
        RandomDenoiserConfig,
        kind=st.sampled_from(list(kinds)),
        width=st.sampled_from([16, 32]),
        depth=st.integers(1, 2),
        heads=st.sampled_from([1, 2]),
        attention=st.booleans(),
        temb_dim=st.sampled_from([16, 32]),
        seed=st.integers(0, 1000),
        num_classes=st.sampled_from([0, 5]) if conditioning else none,
        context_dim=st.sampled_from([0, 12]) if conditioning else none,
        context_len=st.sampled_from([3, 4]),
    )


@dataclass(frozen=True, eq=False)
class DenoiserCase:
    """A random denoiser and how to call it: ``example_inputs`` (the capture call, at ``batch``),
    ``inputs(...)`` for other calls (another batch: the capture has a dynamic batch),
    ``calibration(n)`` for a calibration set whose timesteps cover [0, T]."""

    config: RandomDenoiserConfig
    batch: int
    timestep: torch.Tensor  # the capture call's timestep (dtype and shape are kept in every call)
    seed: int = 0
    _model: list[nn.Module] = field(default_factory=list, repr=False)

    def model(self) -> nn.Module:
        """The model (built once per case; the passes never modify it)."""
        if not self._model:
            self._model.append(build_random_denoiser(self.config))
        return self._model[0]

    @property
    def timestep_dtype(self) -> torch.dtype:
        return self.timestep.dtype

    @property
    def scalar_timestep(self) -> bool:
        return self.timestep.dim() == 0

    @property
    def example_inputs(self) -> dict[str, Any]:
        return self.config.example_inputs(self.batch, self.timestep.clone(), seed=self.seed)

    def inputs(self, batch: int, steps: Sequence[float] | None = None, *, seed: int = 1) -> dict[str, Any]:
        """A call at ``batch`` with the captured timestep dtype and shape; ``steps`` default to a
        spread over [0, T) (a scalar timestep takes ``steps[0]``)."""
        if steps is None:
            steps = [(T - 1) * (i + 0.5) / batch for i in range(batch)]
        t = _timestep_tensor(steps[:1] if self.scalar_timestep else steps, self.timestep_dtype, self.scalar_timestep)
        return self.config.example_inputs(batch, t, seed=seed)

    def calibration(self, n: int = 2, batch: int | None = None) -> list[dict[str, Any]]:
        """``n`` calls whose timesteps together cover [0, T)."""
        b = batch or self.batch
        out = []
        for i in range(n):
            steps = [(T - 1) * (i * b + j) / max(1, n * b - 1) for j in range(b)]
            if self.scalar_timestep:
                steps = [(T - 1) * i / max(1, n - 1)]
            out.append(self.inputs(b, steps, seed=self.seed + 10 + i))
        return out

    def __repr__(self) -> str:
        return f"DenoiserCase({self.config!r}, batch={self.batch}, timestep={self.timestep!r}, seed={self.seed})"


@st.composite
def denoisers(draw: st.DrawFn, *, configs: st.SearchStrategy[RandomDenoiserConfig] | None = None,
              batches: Sequence[int] = (2, 3), **timestep_kwargs: Any) -> DenoiserCase:
    """A ``DenoiserCase``: a config, a capture batch (≥ 2: torch.export specialises a batch of 1)
    and a capture timestep (``timesteps(**timestep_kwargs)``)."""
    cfg = draw(configs if configs is not None else denoiser_configs())
    batch = draw(st.sampled_from(list(batches)))
    t = draw(timesteps(batch, **timestep_kwargs))
    return DenoiserCase(cfg, batch, t, seed=draw(st.integers(0, 100)))


# -- recipes -------------------------------------------------------------------------------------


def shorten(recipe: Recipe, *, fit_steps: int = 2) -> Recipe:
    """``recipe`` with its TDQ fit cut to ``fit_steps`` steps on small batches and no time budget
    (what a property test can afford); recipes without TDQ come back unchanged."""
    if recipe.qalora is not None:
        recipe = recipe.replace(qalora=recipe.qalora.replace(steps=fit_steps, batch_size=2, rank=4))
    if recipe.tdq is None:
        return recipe
    tdq = recipe.tdq.replace(fit_steps=fit_steps, time_budget_s=None, fit_batch=2, fit_rows=2)
    return recipe.replace(tdq=tdq)


def _presets(kind: str) -> list[str]:
    out = []
    for name in preset_names():
        r = get_preset(name)
        if r.qat is not None:  # QAT needs training data: not a pass-level test
            continue
        if r.qalora is not None:
            if kind == "qalora":
                out.append(name)
            continue
        if kind == "static" and r.tdq is None and r.ptqd is None:
            out.append(name)
        elif kind == "tdq" and r.tdq is not None and r.ptqd is None:
            out.append(name)
        elif kind == "ptqd" and r.ptqd is not None:
            out.append(name)
    return out


def static_recipes() -> st.SearchStrategy[Recipe]:
    """The registered static presets (w8a8, w4a8, ...)."""
    return st.sampled_from(_presets("static")).map(get_preset)


def tdq_recipes(*, fit_steps: int = 2) -> st.SearchStrategy[Recipe]:
    """The TDQ presets (``-tdq``: generators, ``-steptable``: a free table), fits shortened."""
    return st.sampled_from(_presets("tdq")).map(lambda n: shorten(get_preset(n), fit_steps=fit_steps))


def qalora_recipes(*, fit_steps: int = 2) -> st.SearchStrategy[Recipe]:
    """The EfficientDM presets (QALoRA adapters, with or without TALSQ), rank and steps shortened; a
    walk without a teacher converts them with untrained adapters."""
    return st.sampled_from(_presets("qalora")).map(lambda n: shorten(get_preset(n), fit_steps=fit_steps))


def ptqd_recipes(*, mixed: bool | None = None, fit_steps: int = 2) -> st.SearchStrategy[Recipe]:
    """The PTQD presets; ``mixed`` True / False keeps only those with / without mixed precision."""
    names = [n for n in _presets("ptqd")
             if mixed is None or bool(get_preset(n).ptqd.mixed_bits) == mixed]  # type: ignore[union-attr]
    return st.sampled_from(names).map(lambda n: shorten(get_preset(n), fit_steps=fit_steps))


def quant_specs(kind: str = "weight") -> st.SearchStrategy[QuantSpec]:
    """Valid specs for a weight (any granularity) or an activation (per tensor)."""
    if kind not in ("weight", "activation"):
        raise ValueError(f"quant_specs: kind must be 'weight' or 'activation', got {kind!r}")
    observers = st.one_of(st.just(MinMaxObserver()),
                          st.builds(PercentileObserver, percentile=st.sampled_from([99.0, 99.9, 100.0])),
                          st.builds(MSEObserver, num_candidates=st.sampled_from([8, 16])))
    if kind == "weight":
        granularity = st.one_of(st.just(PerTensor()), st.just(PerChannel(0)),
                                st.builds(PerGroup, group_size=st.sampled_from([4, 8]), axis=st.just(1)))
    else:
        granularity = st.just(PerTensor())
    grid = st.sampled_from([(True, True), (True, False), (False, False)])  # (signed, symmetric)
    return st.builds(lambda bits, g, gran, obs: QuantSpec(bits=bits, signed=g[0], symmetric=g[1],
                                                          granularity=gran, observer=obs),
                     st.integers(2, 8), grid, granularity, observers)


def ternary_specs() -> st.SearchStrategy[TernarySpec]:
    """Valid TerDiT ternary weight specs (per tensor or per output channel, either packing)."""
    return st.builds(TernarySpec, granularity=st.sampled_from([PerTensor(), PerChannel(0)]),
                     packing=st.sampled_from(["base3", "2bit"]))


def layer_specs(*, allow_float: bool = True) -> st.SearchStrategy[LayerSpec]:
    """A weight spec (integer or ternary), an activation spec, either or both (``allow_float``:
    possibly neither)."""
    w = st.one_of(st.none(), quant_specs("weight"), ternary_specs())
    a = st.one_of(st.none(), quant_specs("activation"))
    spec = st.builds(LayerSpec, weight=w, activation=a)
    return spec if allow_float else spec.filter(lambda s: not s.is_float)


#: module-path patterns that select something in the random models (``re.fullmatch``).
_PATTERNS = (None, r".*time.*", r"blocks\.0\..*", r".*attn.*", r".*(conv|patch).*", r".*cross.*", r"nothing")


def layer_rules() -> st.SearchStrategy[LayerRule]:
    """Rules over paths, op kinds and roles; the spec may be None (keep in float)."""
    kinds = sorted(OP_KINDS)
    return st.builds(
        LayerRule,
        spec=st.one_of(st.none(), layer_specs()),
        pattern=st.sampled_from(_PATTERNS),
        ops=st.sets(st.sampled_from(kinds), min_size=1).map(frozenset),
        roles=st.sets(st.sampled_from(sorted(ROLE_NAMES)), max_size=2).map(frozenset),
        name=st.sampled_from(["", "rule"]),
    )


@st.composite
def composed_recipes(draw: st.DrawFn, *, methods: bool = False, fit_steps: int = 2) -> Recipe:
    """A random recipe: up to three rules and a default. ``methods``: may add a (shortened) TDQ
    section and a PTQD section."""
    rules = tuple(draw(st.lists(layer_rules(), max_size=3)))
    default = draw(st.one_of(st.none(), layer_specs()))
    tdq = ptqd = None
    if methods:
        if draw(st.booleans()):
            tdq = TDQConfig(method=draw(st.sampled_from(["mlp", "table"])), fit_steps=fit_steps, fit_batch=2,
                            fit_rows=2, hidden=16, fourier_dim=16)
        if draw(st.booleans()):
            ptqd = PTQDConfig(mixed_bits=draw(st.sampled_from([(), (4, 8)])))
    return Recipe(name="composed", rules=rules, default=default, tdq=tdq, ptqd=ptqd,
                  timestep_policy=draw(st.sampled_from(["error", "clamp"])))


def recipes(*, fit_steps: int = 2) -> st.SearchStrategy[Recipe]:
    """Any of the above: static, TDQ, PTQD and QALoRA presets, and composed recipes (with method sections)."""
    return st.one_of(static_recipes(), tdq_recipes(fit_steps=fit_steps), ptqd_recipes(fit_steps=fit_steps),
                     qalora_recipes(fit_steps=fit_steps), composed_recipes(methods=True, fit_steps=fit_steps))
