"""Volume: thousands of hypothesis-generated cases per CI run, where each case is cheap.

Two tiers. (1) The pure functions every compiled model rests on, at high example counts: qparams
from a range, the fake-quant grid, 2/4-bit and base-3 packing, the timestep index. (2) The pipeline:
small random UNet- and DiT-like denoisers are captured, calibrated and converted once per (structure,
recipe) (capture costs seconds), and then called many times with generated batches, timesteps (in
and out of range, NaN, scalar or per sample, int or float) and inputs (some malformed): only typed
errors, float recipes bit-identical to the model, quantized outputs within their bound, the ONNX
file equal to the reference within tolerance. ``examples(n)`` scales every count with the loaded
hypothesis profile (``ci``: as written; ``nightly``: ×10; README "Tests").
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stepq
from stepq.calibration.probe import sqnr_db
from stepq.calibration.qparams import qparams_from_range
from stepq.compiler import ops
from stepq.compiler.errors import InputSignatureError, StepqError, TimestepClampWarning, TimestepRangeError
from stepq.compiler.ternary_ops import pack_base3, unpack_base3
from stepq.recipe.presets import get_preset
from stepq.recipe.specs import QuantSpec, Recipe
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser
from stepq.testing.strategies import examples

finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


# -- tier 1: pure functions ------------------------------------------------------------------------


@settings(max_examples=examples(2500), deadline=None)
@given(lo=finite, hi=finite, bits=st.integers(2, 8), symmetric=st.booleans(),
       x=st.lists(st.floats(0, 1, width=32), min_size=1, max_size=16))
def test_qparams_from_range_cover_the_range_and_zero(lo, hi, bits, symmetric, x):
    lo, hi = min(lo, hi), max(lo, hi)
    spec = QuantSpec(bits=bits, symmetric=symmetric, signed=symmetric)
    s, z = qparams_from_range(torch.tensor(lo), torch.tensor(hi), spec)
    assert float(s) > 0 and float(z) == round(float(z)) and spec.quant_min <= float(z) <= spec.quant_max
    zero = ops.fake_quant(torch.zeros(1), s, z, spec.quant_min, spec.quant_max)
    assert float(zero) == 0.0  # zero is exactly representable (padding, ReLU outputs)
    a, b = min(lo, 0.0), max(hi, 0.0)
    xs = torch.tensor([a + (b - a) * v for v in x], dtype=torch.float32)
    err = (ops.fake_quant(xs, s, z, spec.quant_min, spec.quant_max) - xs).abs().max()
    assert float(err) <= float(s) * 0.5 * (1 + 1e-3) + 1e-6 * max(1.0, abs(a), abs(b))


@settings(max_examples=examples(2500), deadline=None)
@given(x=st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=24), scale=st.floats(1e-3, 10.0),
       zp=st.integers(-8, 8), bits=st.sampled_from([2, 4, 8]), signed=st.booleans())
def test_fake_quant_lands_on_the_grid_and_is_idempotent(x, scale, zp, bits, signed):
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    zp = min(max(zp, qmin), qmax)
    xs = torch.tensor(x, dtype=torch.float32)
    s, z = torch.tensor(scale), torch.tensor(float(zp))
    y = ops.fake_quant(xs, s, z, qmin, qmax)
    codes = y / s + z
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert float(codes.min()) >= qmin - 1e-3 and float(codes.max()) <= qmax + 1e-3
    assert torch.equal(ops.fake_quant(y, s, z, qmin, qmax), y)
    q = ops.quantize(xs, s, z, qmin, qmax, dtype=torch.int8 if signed or bits < 8 else torch.uint8)
    assert torch.equal(ops.dequantize(q, s, z), y)


@settings(max_examples=examples(2000), deadline=None)
@given(bits=st.sampled_from([2, 4]), signed=st.booleans(), data=st.data())
def test_pack_unpack_round_trip(bits, signed, data):
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    codes = data.draw(st.lists(st.integers(qmin, qmax), min_size=1, max_size=40))
    q = torch.tensor(codes, dtype=torch.int8 if signed else torch.uint8)
    packed = ops.pack(q, bits, signed)
    assert packed.numel() == math.ceil(len(codes) * bits / 8)
    assert torch.equal(ops.unpack(packed, bits, signed, [len(codes)]), q)


@settings(max_examples=examples(1500), deadline=None)
@given(codes=st.lists(st.integers(-1, 1), min_size=1, max_size=40))
def test_base3_round_trip(codes):
    c = torch.tensor(codes, dtype=torch.int8)
    packed = pack_base3(c)
    assert packed.numel() == math.ceil(len(codes) / 5)
    assert torch.equal(unpack_base3(packed, [len(codes)]).to(torch.int8), c)


@settings(max_examples=examples(2000), deadline=None)
@given(t=st.one_of(st.integers(-50, 1100), st.floats(-50, 1100, width=32), st.just(float("nan")), st.just(float("inf"))),
       scale=st.sampled_from([1.0, 1000.0]), clamp=st.booleans())
def test_timestep_index_is_the_rounded_grid_point(t, scale, clamp):
    T = 1000
    tt = torch.tensor([t / scale if scale != 1.0 and isinstance(t, float) else t])
    v = float(tt.double() * scale) if tt.dtype.is_floating_point or scale != 1.0 else float(tt)
    if math.isnan(v):
        with pytest.raises(TimestepRangeError, match="NaN"):
            ops.timestep_index(tt, scale=scale, policy="clamp" if clamp else "error")
        return
    r = round(v) if math.isfinite(v) else v
    if 0 <= r <= T:
        idx = ops.timestep_index(tt, scale=scale, policy="error")
        assert int(idx) == min(int(r), T - 1)
    elif clamp:
        assert int(ops.timestep_index(tt, scale=scale, policy="clamp")) == (0 if r < 0 else T - 1)
    else:
        with pytest.raises(TimestepRangeError, match="outside the table range"):
            ops.timestep_index(tt, scale=scale, policy="error")


# -- tier 2: the pipeline, captured once per structure, called many times ---------------------------

STRUCTURES = {
    "dit": RandomDenoiserConfig(kind="dit", width=16, depth=1, heads=2, temb_dim=16, num_classes=5),
    "unet": RandomDenoiserConfig(kind="unet", width=16, depth=1, temb_dim=16, context_dim=12),
}
FLOAT = Recipe(name="float")  # every layer kept in float by the default: semantics preserved exactly
RECIPES = {"float": FLOAT, "w8a8": get_preset("w8a8"), "w4a8": get_preset("w4a8"),
           "w8a8-clamp": get_preset("w8a8").replace(timestep_policy="clamp")}
#: the bound on the output SQNR against FP of a random call (2-block random models, random calls)
SQNR_FLOOR = {"w8a8": 20.0, "w8a8-clamp": 20.0, "w4a8": 8.0}

_compiled: dict[tuple[str, str], tuple] = {}


def _compiled_model(structure: str, recipe: str):
    key = (structure, recipe)
    if key not in _compiled:
        cfg = STRUCTURES[structure]
        model = build_random_denoiser(cfg).eval()
        calib = [cfg.example_inputs(2, torch.tensor([i * 250, 999 - i * 250]), seed=i) for i in range(4)]
        qm = stepq.quantize(model, cfg.example_inputs(2), RECIPES[recipe], calibration=calib, progress=False)
        _compiled[key] = (cfg, model, qm)
    return _compiled[key]


@st.composite
def calls(draw):
    """A call: a batch, a timestep (valid or not, int or float, scalar or per sample) and a possible
    defect in another argument."""
    batch = draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["valid", "valid", "valid", "high", "low", "nan", "defect"]))
    dtype = draw(st.sampled_from([torch.int64, torch.float32]))
    scalar = draw(st.booleans())
    n = 1 if scalar else batch
    if kind in ("valid", "defect"):
        values = draw(st.lists(st.integers(0, 1000), min_size=n, max_size=n))
    elif kind == "high":
        values = draw(st.lists(st.integers(1001, 5000), min_size=n, max_size=n))
    elif kind == "low":
        values = draw(st.lists(st.integers(-500, -1), min_size=n, max_size=n))
    else:
        values = [float("nan")] * n
        dtype = torch.float32
    t = torch.tensor(values, dtype=torch.float64).to(dtype)
    t = t[0] if scalar else t
    defect = draw(st.sampled_from(["channels", "size", "dtype", "none"])) if kind == "defect" else None
    return batch, t, kind, defect, draw(st.integers(0, 10_000))


def _inputs(cfg, batch, t, defect, seed):
    x = cfg.example_inputs(batch, torch.zeros(batch, dtype=torch.int64), seed=seed)
    x["timestep"] = t
    if defect == "channels":
        x["sample"] = torch.randn(batch, cfg.channels + 1, cfg.size, cfg.size)
    elif defect == "size":
        x["sample"] = torch.randn(batch, cfg.channels, cfg.size * 2, cfg.size * 2)
    elif defect == "dtype":
        x["sample"] = x["sample"].double()
    elif defect == "batch":
        other = "class_labels" if "class_labels" in x else "encoder_hidden_states"
        x[other] = torch.cat([x[other], x[other][:1]])
    elif defect == "none":
        x["sample"] = None
    return x


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
@pytest.mark.parametrize("recipe", sorted(RECIPES))
@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=calls())
def test_generated_calls_through_compiled_models(structure, recipe, call):
    cfg, model, qm = _compiled_model(structure, recipe)
    batch, t, kind, defect, seed = call
    x = _inputs(cfg, batch, t, defect, seed)
    if defect is not None:
        with pytest.raises(InputSignatureError, match="argument '"):
            qm(**x)
        return
    if kind == "nan":
        with pytest.raises(TimestepRangeError, match="is NaN"):
            qm(**x)
        return
    if kind in ("high", "low"):
        if recipe != "w8a8-clamp":
            with pytest.raises(TimestepRangeError, match="outside \\[0, 1000\\]"):
                qm(**x)
            return
        with pytest.warns(TimestepClampWarning):
            out = qm(**x)
        edge = torch.full_like(t, 1000 if kind == "high" else 0)
        torch.testing.assert_close(out, qm(**{**x, "timestep": edge}), rtol=0, atol=0)
        return
    try:
        out = qm(**x)
    except StepqError as e:  # only typed errors may come out of a valid call
        pytest.fail(f"a valid call raised {type(e).__name__}: {e}")
    assert out.shape == x["sample"].shape and torch.isfinite(out).all()
    with torch.no_grad():
        ref = model(**x)
    if recipe == "float":
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    else:
        assert sqnr_db(ref, out) >= SQNR_FLOOR[recipe]


_onnx: dict[tuple[str, str], object] = {}


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
@pytest.mark.parametrize("recipe", ["w8a8", "w4a8"])
@settings(max_examples=examples(15), deadline=None)
@given(batch=st.integers(1, 4), step=st.integers(0, 1000), seed=st.integers(0, 10_000))
def test_onnx_equals_the_reference_on_a_sample(structure, recipe, batch, step, seed, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    cfg, _, qm = _compiled_model(structure, recipe)
    if (structure, recipe) not in _onnx:
        path = tmp_path_factory.mktemp("volume") / f"{structure}-{recipe}.onnx"
        qm.export_onnx(path)
        _onnx[(structure, recipe)] = stepq.backends.onnx.load(path, threads=1)
    om = _onnx[(structure, recipe)]
    x = cfg.example_inputs(batch, torch.full((batch,), step, dtype=torch.int64), seed=seed)
    ref, got = qm(**x), om(**x)
    got = got[0] if isinstance(got, tuple) else got
    assert np.isfinite(got.numpy()).all()
    assert sqnr_db(ref, got) >= 35.0
