"""Timestep tables in ONNX: initializers read by a Gather on the rounded, clamped timestep input;
one session answers every timestep; a batch shares its first timestep (documented)."""

from __future__ import annotations

import onnx
import pytest
import torch
from helpers import calib_set, denoiser_inputs
from hypothesis import given
from hypothesis import strategies as st

import stepq
import stepq.backends.onnx as sx
from stepq.testing.onnx_cases import attach_synthetic_tables, rel_l2
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


def _tdq_qm(kind="dit", policy="error"):
    m = build_random_denoiser(RandomDenoiserConfig(kind=kind, depth=1))
    data = calib_set(3)
    prog = stepq.calibrate(stepq.prepare(stepq.capture(m, data[0]), "w8a8"), data, progress=False)
    prog.recipe = prog.recipe.replace(timestep_policy=policy)
    n = attach_synthetic_tables(prog, spread=0.4)
    return stepq.convert(prog), n


@pytest.fixture(scope="module")
def tdq(tmp_path_factory):
    qm, n = _tdq_qm(policy="clamp")
    path = tmp_path_factory.mktemp("tdq") / "tdq.onnx"
    result = qm.export_onnx(path)
    return qm, n, path, result, sx.load(path, threads=1)


def test_tables_are_initializers_read_by_gather(tdq):
    qm, n, path, result, _ = tdq
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    gathers = [nd for nd in model.graph.node if nd.op_type == "Gather" and nd.input[0] in inits
               and list(inits[nd.input[0]].dims) == [1000]]
    assert len(gathers) == 2 * n  # one for the scale table, one for the zero-point table, per quantizer
    assert {inits[g.input[0]].data_type for g in gathers} == {onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8}
    assert len(result.per_tensor_timestep) == n  # per-sample scales became per tensor (first timestep)
    assert sum(nd.op_type == "Round" for nd in model.graph.node) == 1  # one timestep_index per forward


def test_gathered_scales_still_give_integer_kernels(tdq):
    qm, _, path, _, _ = tdq
    counts = sx.count_kernels(path)
    assert counts.integer["MatMulIntegerToFloat"] == len(qm.quantized_layers())
    assert not counts.quantized_in_float


@given(t=st.integers(0, 999))
def test_one_session_answers_every_timestep(tdq, t):
    qm, _, _, _, om = tdq
    x = denoiser_inputs(2, (t, t), seed=t % 7)
    assert rel_l2(om(**x), qm(**x)) <= 1e-2


def test_different_timesteps_use_different_rows(tdq):
    qm, _, _, _, om = tdq
    x = denoiser_inputs(2, (100, 100))
    y = denoiser_inputs(2, (900, 900))
    y["sample"] = x["sample"]
    a, b = om(**x), om(**y)
    assert rel_l2(a, qm(**x)) <= 1e-2 and rel_l2(b, qm(**y)) <= 1e-2
    assert rel_l2(a, b) > 1e-2


def test_a_batch_shares_its_first_timestep(tdq):
    qm, _, _, _, om = tdq
    x = denoiser_inputs(2, (100, 800), seed=3)
    mixed = om(**x)
    # sample 0 is exactly the reference at its own timestep; sample 1 used timestep 100's scales
    assert rel_l2(mixed[:1], qm(sample=x["sample"][:1], timestep=x["timestep"][:1])) <= 1e-2
    assert rel_l2(mixed[1:], qm(sample=x["sample"][1:], timestep=x["timestep"][1:])) > 1e-3


def test_out_of_range_timesteps_clamp(tdq):
    qm, _, _, _, om = tdq
    x = denoiser_inputs(1, (999,))
    hi = dict(x, timestep=torch.tensor([5000]))
    lo = dict(x, timestep=torch.tensor([-7]))
    assert rel_l2(om(**hi), qm(**hi)) <= 1e-2  # the reference clamps too (timestep_policy="clamp")
    assert rel_l2(om(**lo), qm(**lo)) <= 1e-2
    last = dict(x, timestep=torch.tensor([1000]))  # t = T is in range and reads row T − 1 in both backends
    assert rel_l2(om(**last), qm(**last)) <= 1e-2


def test_error_policy_model_still_exports_and_clamps(tmp_path):
    qm, _ = _tdq_qm(policy="error")
    qm.export_onnx(tmp_path / "e.onnx")
    om = sx.load(tmp_path / "e.onnx", threads=1)
    x = denoiser_inputs(1, (1500,))
    with pytest.raises(stepq.TimestepRangeError):
        qm(**x)
    with pytest.raises(stepq.TimestepRangeError):  # the ONNX model's Python call checks like the reference
        om(**x)
    # the file itself cannot raise: it clamps (docs/ONNX.md); a bare session gets the last row
    raw = om.run_raw(om.feeds(om.signature.bind((), x)))[0]
    edge = om.run_raw(om.feeds(om.signature.bind((), denoiser_inputs(1, (1000,)))))[0]
    assert torch.isfinite(torch.from_numpy(raw)).all()
    torch.testing.assert_close(torch.from_numpy(raw), torch.from_numpy(edge), rtol=0, atol=0)


def test_fitted_tdq_on_a_diffusers_dit_exports_and_matches_the_reference(tmp_path):
    """diffusers' DiT calls block 0's timestep embedder twice; each call has its own fitted table."""
    from stepq.calibration import collect
    from stepq.recipe.specs import TDQConfig
    from stepq.testing.families import FAMILIES

    f = FAMILIES["dit"]
    m = f.model()
    data = list(collect(m, f.scheduler(), num_samples=2, num_inference_steps=6, make_inputs=f.make_inputs,
                        conditions=f.conditions, sample_shape=f.sample_shape, channels=f.channels, progress=False))
    recipe = stepq.get_preset("w8a8-tdq").replace(tdq=TDQConfig(fit_steps=5, fit_batch=2))
    qm = stepq.quantize(m, data[0], recipe, calibration=data, progress=False)
    tables = qm.program.state.timestep_tables
    assert any(name.endswith(".input_call2") for name in tables)
    qm.export_onnx(tmp_path / "dit_tdq.onnx")
    om = sx.load(tmp_path / "dit_tdq.onnx", threads=1)
    for t in (980.0, 500.0, 30.0):
        x = f.example_inputs(2, t, seed=3)
        assert rel_l2(om(**x)[0], qm(**x)[0]) <= 1e-2
