"""Calls checked at the door: a compiled model refuses what its graph cannot take with a typed error
naming the argument, and holds every timestep to [0, T] by the recipe's policy, with or without
timestep tables, in PyTorch and in the ONNX file."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import stepq
from stepq.compiler.errors import InputSignatureError, TimestepClampWarning, TimestepRangeError
from stepq.compiler.input_checks import TimestepRange
from stepq.recipe.presets import get_preset
from stepq.testing import strategies as sqs
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser
from stepq.testing.strategies import examples

CFG = RandomDenoiserConfig(kind="unet", width=16, depth=1, temb_dim=16, num_classes=5)


def _quantize(recipe, *, policy: str = "error"):
    model = build_random_denoiser(CFG)
    ex = CFG.example_inputs(2)
    calib = [CFG.example_inputs(2, seed=i) for i in range(2)]
    r = sqs.shorten(get_preset(recipe) if isinstance(recipe, str) else recipe).replace(timestep_policy=policy)
    return model, stepq.quantize(model, ex, recipe=r, calibration=calib)


@pytest.fixture(scope="module")
def qm():
    return _quantize("w8a8")[1]


@pytest.fixture(scope="module")
def qm_clamp():
    return _quantize("w8a8", policy="clamp")[1]


def _call(qm, **changes):
    inputs = CFG.example_inputs(2, seed=5)
    inputs.update(changes)
    return qm(**inputs)


@pytest.mark.parametrize("changes, message", [
    (dict(sample=torch.randn(2, 3, 8, 8)), r"argument 'sample' has shape \[2, 3, 8, 8\].*dim 1 must be 4, got 3"),
    (dict(sample=torch.randn(2, 4, 16, 16)), r"argument 'sample' has shape \[2, 4, 16, 16\].*dim 2 must be 8, got 16"),
    (dict(sample=torch.randn(2, 4, 8, 8, dtype=torch.float64)), r"argument 'sample' has dtype float64.*float32"),
    (dict(sample=torch.randn(2, 4, 8, 8, dtype=torch.float16)), r"argument 'sample' has dtype float16"),
    (dict(class_labels=torch.tensor([1, 2], dtype=torch.int32)), r"argument 'class_labels' has dtype int32.*int64"),
    (dict(timestep=torch.tensor([1, 2, 3])), r"argument 'timestep' has 3 timesteps for a batch of 2 samples"),
    (dict(timestep=None), r"argument 'timestep' is None; the model was captured with a int64 tensor of shape \[2\]"),
    (dict(sample=None), r"argument 'sample' is None"),
    (dict(class_labels=None), r"argument 'class_labels' is None"),
    (dict(timestep="ten"), r"argument 'timestep' \(the timestep\) must be a number or a tensor"),
])
def test_bad_call_is_refused_naming_the_argument(qm, changes, message):
    with pytest.raises(InputSignatureError, match=message):
        _call(qm, **changes)


def test_good_calls_still_run(qm):
    """Another batch, a scalar / Python-number / single-element timestep, t = T (flow matching's σ = 1)."""
    for batch in (1, 3):
        inputs = CFG.example_inputs(batch, seed=1)
        assert qm(**inputs).shape == inputs["sample"].shape
    for t in (7, torch.tensor(7), torch.tensor([7]), torch.tensor([7.0, 1000.0])):
        assert torch.isfinite(_call(qm, timestep=t)).all()


@pytest.mark.parametrize("t, shown", [(1500, "1500"), (-5, "-5"), (float("inf"), "inf"), (1e30, "1e+30"),
                                      (1000.5, "1000.5")])
def test_out_of_range_timestep_raises_on_a_model_without_tables(qm, t, shown):
    assert not any(n.target is torch.ops.stepq.timestep_index.default for n in qm.gm.graph.nodes)
    with pytest.raises(TimestepRangeError, match=rf"argument 'timestep' has timestep {re.escape(shown)} outside \[0, 1000\]"):
        _call(qm, timestep=torch.tensor([t, t]))


@pytest.mark.parametrize("model_fixture", ["qm", "qm_clamp"])
def test_nan_timestep_raises_under_both_policies(request, model_fixture):
    model = request.getfixturevalue(model_fixture)
    with pytest.raises(TimestepRangeError, match=r"argument 'timestep' is NaN") as info:
        _call(model, timestep=torch.tensor([float("nan"), 3.0]))
    assert "9223372036854775808" not in str(info.value)


def test_clamp_policy_warns_visibly_and_clamps(qm_clamp):
    with pytest.warns(TimestepClampWarning, match=r"timestep 1500 outside \[0, 1000\].*clamping"):
        high = _call(qm_clamp, timestep=torch.tensor([1500, 1500]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        edge = _call(qm_clamp, timestep=torch.tensor([1000, 1000]))
    torch.testing.assert_close(high, edge, rtol=0, atol=0)
    with pytest.warns(TimestepClampWarning, match=r"timestep -5 outside"):
        low = _call(qm_clamp, timestep=torch.tensor([-5, -5]))
    torch.testing.assert_close(low, _call(qm_clamp, timestep=torch.tensor([0, 0])), rtol=0, atol=0)


def test_table_model_nan_message_names_nan_not_int_min():
    """The graph's own timestep_index (reached without the door, e.g. by a bare GraphModule call)."""
    with pytest.raises(TimestepRangeError, match="timestep is NaN") as info:
        stepq.compiler.ops.timestep_index(torch.tensor([float("nan")]))
    assert "-9223372036854775808" not in str(info.value)
    with pytest.raises(TimestepRangeError, match="timestep 4611686018427387904 is outside"):
        stepq.compiler.ops.timestep_index(torch.tensor([float("inf")]))
    clamped = stepq.compiler.ops.timestep_index(torch.tensor([float("inf"), -float("inf")]), policy="clamp")
    assert clamped.tolist() == [999, 0]


@settings(max_examples=examples(500), deadline=None)
@given(t=st.floats(allow_nan=True, allow_infinity=True, width=32),
       scale=st.sampled_from([1.0, 1000.0]), policy=st.sampled_from(["error", "clamp"]))
def test_timestep_range_property(t, scale, policy):
    """Valid values pass unchanged; the rest raise (error, NaN) or clamp to the nearest end."""
    rng = TimestepRange(1000, scale, policy)
    x = torch.tensor([t], dtype=torch.float32)
    valid = math.isfinite(t) and 0 <= t <= 1000 / scale
    if valid:
        assert rng.check(x, name="t") is x
    elif math.isnan(t) or policy == "error":
        with pytest.raises(TimestepRangeError, match="argument 't'"):
            rng.check(x, name="t")
    else:
        with pytest.warns(TimestepClampWarning):
            y = rng.check(x, name="t")
        assert float(y) == (0.0 if t < 0 else pytest.approx(1000 / scale))


onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def onnx_file(qm, tmp_path_factory):
    path = tmp_path_factory.mktemp("door") / "m.onnx"
    qm.export_onnx(path)
    return path


def test_onnx_file_clamps_the_timestep_inside_the_graph(qm, onnx_file):
    """A bare ONNX Runtime session (no Python check): t outside [0, T] behaves as the nearest end,
    NaN as 0; the graph says so with a Clip (and Where(IsNaN)) on the timestep input."""
    import numpy as np
    import onnxruntime as ort

    model = onnx.load(str(onnx_file))
    kinds = [n.op_type for n in model.graph.node[:5]]
    assert "Clip" in kinds
    loaded = stepq.backends.onnx.load(onnx_file)
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    base = CFG.example_inputs(2, seed=3)
    feeds = loaded.feeds(loaded.bind((), base))
    t_name = next(name for name, key in loaded._inputs if "timestep" in key)

    def run(t):
        return sess.run(None, {**feeds, t_name: np.array(t, dtype=feeds[t_name].dtype)})[0]

    np.testing.assert_array_equal(run([1500, 5000]), run([1000, 1000]))
    np.testing.assert_array_equal(run([-5, -1]), run([0, 0]))
    assert np.isfinite(run([1500, -5])).all()


def test_onnx_model_checks_the_call_like_the_reference(onnx_file):
    loaded = stepq.backends.onnx.load(onnx_file)
    with pytest.raises(TimestepRangeError, match="timestep 1500 outside"):
        loaded(**{**CFG.example_inputs(2), "timestep": torch.tensor([1500, 1500])})
    with pytest.raises(InputSignatureError, match="argument 'sample' has shape"):
        loaded(**{**CFG.example_inputs(2), "sample": torch.randn(2, 3, 8, 8)})


def test_clamp_warning_points_at_the_callers_line(qm_clamp):
    with pytest.warns(TimestepClampWarning) as record:
        _call(qm_clamp, timestep=torch.tensor([2000, 2000]))
    assert record[0].filename == __file__
