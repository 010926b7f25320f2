"""QuantizedModel.cache_dequantized: weights dequantized once, the same outputs bit for bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import calib_set, count, denoiser_inputs
from hypothesis import given, settings
from hypothesis import strategies as st

import stepq
from stepq import zoo
from stepq.compiler import ops
from stepq.compiler.graph_utils import fold_constant_calls
from stepq.recipe.presets import qalora_weight_spec
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser

WEIGHT_PATH = (ops.DEQUANTIZE, ops.UNPACK, ops.UNPACK_BASE3)


def _recipe(name: str) -> stepq.Recipe | str:
    if name != "w2a8":
        return name
    r = stepq.get_preset("w4a8")  # 2-bit packed weights (4 codes per byte)
    return r.replace(name="w2a8", default=dataclasses.replace(r.default, weight=qalora_weight_spec(2)))


def _quantized(kind: str, recipe: str, seed: int = 0, depth: int = 2) -> stepq.QuantizedModel:
    m = build_random_denoiser(RandomDenoiserConfig(kind=kind, depth=depth, seed=seed))
    data = calib_set(2, seed=seed)
    return stepq.quantize(m, data[0], _recipe(recipe), calibration=data, progress=False)


def _outputs(qm, calls):
    with torch.no_grad():
        return [qm(**x) for x in calls]


CALLS = [denoiser_inputs(2, (5, 900), seed=1), denoiser_inputs(3, (0, 1, 999), seed=2)]


@pytest.mark.parametrize(("kind", "recipe"), [("dit", "w4a8"), ("unet", "w8a8"), ("unet", "w4a4-tdq"),
                                              ("dit", "w2a8")])
def test_cached_forward_is_bit_exact_and_reads_no_integer_weight(kind, recipe):
    qm = _quantized(kind, recipe)
    nodes_before = [(n.op, str(n.target)) for n in qm.gm.graph.nodes]
    tensors_before = {k: v.data_ptr() for k, v in qm.gm.state_dict().items()}
    ref = _outputs(qm, CALLS)
    assert not qm.dequantized_cached
    assert qm.cache_dequantized() is qm and qm.dequantized_cached
    got = _outputs(qm, CALLS)
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)
    cached = qm._cached
    n_weights = count(qm.gm, ops.DEQUANTIZE)
    assert n_weights > 0
    assert sum(count(cached, t) for t in WEIGHT_PATH) == 0  # every weight is one float tensor now
    assert len([k for k in cached.state_dict() if k.startswith("_stepq_dequantized")]) == n_weights
    assert count(cached, ops.FAKE_QUANT) == count(qm.gm, ops.FAKE_QUANT)  # activation quantizers stay
    # the program's own graph and tensors are untouched
    assert [(n.op, str(n.target)) for n in qm.gm.graph.nodes] == nodes_before
    assert {k: v.data_ptr() for k, v in qm.gm.state_dict().items()} == tensors_before
    # turning it off frees the cache and gives the reference graph back
    qm.cache_dequantized(False)
    assert qm._cached is None and not qm.dequantized_cached
    for a, b in zip(ref, _outputs(qm, CALLS), strict=True):
        assert torch.equal(a, b)


def test_save_ignores_the_cache_and_load_can_turn_it_on(tmp_path):
    qm = _quantized("dit", "w4a8")
    qm.save(tmp_path / "plain")
    qm.cache_dequantized()
    qm.save(tmp_path / "cached")
    for f in ("model.safetensors", "manifest.json"):
        assert (tmp_path / "plain" / f).read_bytes() == (tmp_path / "cached" / f).read_bytes()
    assert qm.weight_bytes() == stepq.load(tmp_path / "plain").weight_bytes()
    loaded = stepq.load(tmp_path / "plain", cache_dequantized=True)
    assert loaded.dequantized_cached and not stepq.load(tmp_path / "plain").dequantized_cached
    for a, b in zip(_outputs(qm, CALLS), _outputs(loaded, CALLS), strict=True):
        assert torch.equal(a, b)
    # .to(device) rebuilds the cache from the moved tensors and keeps it on
    loaded.to("cpu")
    assert loaded.dequantized_cached
    assert torch.equal(loaded(**CALLS[0]), qm(**CALLS[0]))


def test_ternary_base3_weights_cache_bit_exact():
    qm = zoo.load("digits-dit-ternary")
    entry = zoo.entry("digits-dit")
    g = torch.Generator().manual_seed(0)
    x = {"hidden_states": torch.randn(4, *entry.sample_shape, generator=g),
         "timestep": torch.tensor([999, 500, 20, 0]), "class_labels": torch.tensor([1, 3, entry.null_class, 7])}
    assert count(qm.gm, ops.UNPACK_BASE3) > 0
    ref = qm(**x, return_dict=False)[0]
    qm.cache_dequantized()
    assert sum(count(qm._cached, t) for t in WEIGHT_PATH) == 0
    assert torch.equal(qm(**x, return_dict=False)[0], ref)


@settings(max_examples=6, deadline=None)
@given(kind=st.sampled_from(["dit", "unet"]), recipe=st.sampled_from(["w8a8", "w4a8", "w4a4"]), seed=st.integers(0, 100),
       depth=st.integers(1, 2))
def test_property_cached_equals_reference(kind, recipe, seed, depth):
    qm = _quantized(kind, recipe, seed=seed, depth=depth)
    x = denoiser_inputs(2, (seed % 1000, 999 - seed % 1000), seed=seed)
    ref = qm(**x)
    assert torch.equal(qm.cache_dequantized()(**x), ref)


def test_fold_constant_calls_chains_and_budget():
    qm = _quantized("dit", "w4a8")
    n = count(qm.gm, ops.DEQUANTIZE)
    folded, held = fold_constant_calls(qm.gm, {ops.DEQUANTIZE, ops.UNPACK}, prefix="_t")
    assert held == n  # the unpacked intermediates of each chain are dropped once its dequantize is folded
    assert count(folded, ops.UNPACK) == 0 and count(folded, ops.DEQUANTIZE) == 0
    nothing, held = fold_constant_calls(qm.gm, {ops.DEQUANTIZE, ops.UNPACK}, prefix="_t", budget=0)
    assert held == 0 and count(nothing, ops.DEQUANTIZE) == n
    x = qm.program.bind((), CALLS[0])
    ref = qm.gm(**x)
    for gm in (folded, nothing):
        assert torch.equal(gm(**x), ref)
