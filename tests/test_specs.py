"""Specs, rules and recipes: validation, first-match-wins, to_dict/from_dict round trips."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import stepq
from stepq.recipe.specs import (
    LayerRule,
    LayerSpec,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantSpec,
    Recipe,
)

observers = st.one_of(
    st.just(MinMaxObserver()),
    st.floats(90.0, 100.0).map(PercentileObserver),
    st.builds(MSEObserver, num_candidates=st.integers(1, 100), norm=st.floats(0.5, 4.0), max_shrink=st.floats(0.1, 0.9)),
)


@st.composite
def quant_specs(draw, weight: bool = True):
    signed = draw(st.booleans())
    symmetric = signed and draw(st.booleans())
    gran = st.just(PerTensor())
    if weight:
        gran = st.one_of(gran, st.integers(0, 1).map(PerChannel),
                         st.builds(PerGroup, group_size=st.sampled_from([2, 16, 64, 128]), axis=st.just(1)))
    return QuantSpec(bits=draw(st.integers(2, 8)), signed=signed, symmetric=symmetric, granularity=draw(gran),
                     observer=draw(observers))


layer_specs = st.builds(LayerSpec, weight=st.none() | quant_specs(True), activation=st.none() | quant_specs(False))
rules = st.builds(
    LayerRule,
    spec=st.none() | layer_specs,
    pattern=st.none() | st.sampled_from([r".*attn.*", r"conv_in", r"(.*\.)?to_[qkv]"]),
    ops=st.sets(st.sampled_from(["linear", "conv2d", "attention"]), min_size=1).map(frozenset),
    roles=st.sets(st.sampled_from(["input", "output", "timestep_embedding", "conditioning"])).map(frozenset),
    name=st.text(alphabet="abcdef-", max_size=8),
)
recipes = st.builds(Recipe, name=st.text(alphabet="abc123-", min_size=1, max_size=10),
                    rules=st.lists(rules, max_size=4).map(tuple), default=st.none() | layer_specs,
                    num_train_timesteps=st.integers(1, 4000), timestep_policy=st.sampled_from(["error", "clamp"]))


@given(recipes)
def test_recipe_round_trips_through_dict_and_json(recipe):
    d = recipe.to_dict()
    assert Recipe.from_dict(json.loads(json.dumps(d))) == recipe


@pytest.mark.parametrize("name", ["w8a8", "w4a8", "w4a4"])
def test_presets_round_trip_and_keep_io_layers_at_8_bits(name):
    r = stepq.get_preset(name)
    assert Recipe.from_dict(r.to_dict()) == r
    w, a = int(name[1]), int(name[3])
    spec, rule = r.spec_for("down_blocks.0.resnets.0.conv1", "conv2d", roles=())
    assert (spec.weight.bits, spec.activation.bits, rule) == (w, a, "default")
    assert spec.weight.granularity == PerChannel(0) and spec.weight.symmetric
    assert spec.activation.granularity == PerTensor() and not spec.activation.symmetric
    for role in ("input", "output", "timestep_embedding"):
        spec, _ = r.spec_for("anything", "linear", roles={role})
        assert spec.weight.bits == 8 and spec.activation.bits == 8
    assert r.spec_for("blocks.0.attn", "attention", roles=())[0] is None


def test_first_matching_rule_wins_and_none_keeps_float():
    w8 = LayerSpec(weight=QuantSpec(bits=8), activation=None)
    w4 = LayerSpec(weight=QuantSpec(bits=4), activation=None)
    r = Recipe(name="t", rules=(LayerRule(spec=None, pattern=r".*\.to_q", name="q-float"),
                                LayerRule(spec=w8, pattern=r".*attn.*"),
                                LayerRule(spec=w4, pattern=r".*")),
               default=w4)
    assert r.spec_for("blocks.0.attn.to_q", "linear") == (None, "q-float")
    assert r.spec_for("blocks.0.attn.to_k", "linear") == (w8, "rules[1]")
    assert r.spec_for("blocks.0.ff", "linear") == (w4, "rules[2]")
    # fullmatch: a pattern is not a substring search
    assert not LayerRule(spec=w8, pattern="attn").matches("blocks.0.attn.to_k", "linear")
    # op kind and role filters
    assert not LayerRule(spec=w8, ops=frozenset({"conv2d"})).matches("x", "linear")
    assert LayerRule(spec=w8, roles=frozenset({"input"})).matches("x", "linear", {"input", "conditioning"})
    assert not LayerRule(spec=w8, roles=frozenset({"input"})).matches("x", "linear", {"output"})


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 1}, "bits must be an integer in \\[2, 8\\], got 1"),
    ({"bits": 9}, "got 9"),
    ({"signed": False, "symmetric": True}, "symmetric spec needs a signed grid"),
    ({"granularity": "per_tensor"}, "granularity must be"),
    ({"observer": None}, "observer must be"),
])
def test_quant_spec_validation(kwargs, message):
    with pytest.raises(stepq.RecipeError, match=message):
        QuantSpec(**kwargs)


def test_other_validation_errors_name_the_bad_value():
    with pytest.raises(stepq.RecipeError, match="percentile must be in"):
        PercentileObserver(40.0)
    with pytest.raises(stepq.RecipeError, match="power of two"):
        PerGroup(group_size=12)
    with pytest.raises(stepq.RecipeError, match="per-group granularity is for weights only"):
        LayerSpec(activation=QuantSpec(granularity=PerGroup()))
    with pytest.raises(stepq.RecipeError, match="not a valid regex"):
        LayerRule(spec=None, pattern="(")
    with pytest.raises(stepq.RecipeError, match="unknown op kind"):
        LayerRule(spec=None, ops=frozenset({"matmul4"}))
    with pytest.raises(stepq.RecipeError, match="unknown role"):
        LayerRule(spec=None, roles=frozenset({"middle"}))
    with pytest.raises(stepq.RecipeError, match="timestep_policy"):
        Recipe(name="x", timestep_policy="wrap")
    with pytest.raises(stepq.RecipeError, match="version 7 is not supported"):
        Recipe.from_dict({"name": "x", "version": 7})
    with pytest.raises(stepq.RecipeError, match="unknown field"):
        Recipe.from_dict({"name": "x", "rulez": []})
    with pytest.raises(stepq.RecipeError, match="unknown observer kind 'fancy'"):
        QuantSpec.from_dict({"bits": 8, "observer": {"kind": "fancy"}})


def test_unknown_preset_lists_the_presets():
    with pytest.raises(stepq.RecipeError) as e:
        stepq.get_preset("w3a3")
    for name in ("w8a8", "w4a8", "w4a4"):
        assert name in str(e.value)


def test_grid_bounds():
    assert (QuantSpec(bits=4, signed=True).quant_min, QuantSpec(bits=4, signed=True).quant_max) == (-8, 7)
    s = QuantSpec(bits=4, signed=False, symmetric=False)
    assert (s.quant_min, s.quant_max) == (0, 15)
    s = QuantSpec(bits=2, signed=True)
    assert (s.quant_min, s.quant_max) == (-2, 1)
