"""Calibration data from real schedulers, and the calibration step's errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from helpers import calib_set, denoiser_inputs

import stepq
from stepq.calibration import collect
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


def _model():
    return build_random_denoiser(RandomDenoiserConfig(kind="unet"))


def _make(x, t, cond):
    return {"sample": x, "timestep": torch.as_tensor(t).reshape(-1).expand(x.shape[0]).round().long()}


@pytest.mark.parametrize("sched", [DDPMScheduler(), DDIMScheduler(), FlowMatchEulerDiscreteScheduler()],
                         ids=["ddpm", "ddim", "flow"])
def test_collect_records_every_step_of_the_real_schedule(sched):
    m = _model()
    data = collect(m, sched, num_samples=3, num_inference_steps=5, make_inputs=_make, sample_shape=(4, 8, 8),
                   batch_size=2, seed=1, progress=False)
    ref = type(sched).from_config(sched.config)
    ref.set_timesteps(5)
    expected = [float(t) for t in ref.timesteps]
    assert len(data) == 2 * 5  # 2 batches (2 + 1 samples) x 5 steps
    assert data.timesteps == expected * 2
    assert data.num_samples == 3 * 5
    assert [d["sample"].shape[0] for d in data][:6] == [2] * 5 + [1]
    # the first input of each batch is the initial noise scaled by init_noise_sigma
    assert data[0]["sample"].std() > 0.5
    # the caller's scheduler is not touched
    assert getattr(sched, "num_inference_steps", None) is None


def test_collect_is_seeded():
    m = _model()
    kw = dict(num_samples=2, num_inference_steps=4, make_inputs=_make, sample_shape=(4, 8, 8), progress=False)
    a = collect(m, DDPMScheduler(), seed=3, **kw)
    b = collect(m, DDPMScheduler(), seed=3, **kw)
    c = collect(m, DDPMScheduler(), seed=4, **kw)
    assert all(torch.equal(x["sample"], y["sample"]) for x, y in zip(a, b))
    assert not torch.equal(a[-1]["sample"], c[-1]["sample"])


def test_collect_with_guidance_records_the_batched_call():
    from stepq.testing.families import FAMILIES

    f = FAMILIES["dit"]
    m = f.model()
    data = collect(m, DDIMScheduler(), num_samples=2, num_inference_steps=3, make_inputs=f.make_inputs,
                   conditions=f.conditions, uncond=lambda c: {"class_labels": torch.full_like(c["class_labels"], 10)},
                   guidance_scale=4.0, sample_shape=f.sample_shape, channels=4, progress=False)
    assert len(data) == 3
    labels = data[0]["class_labels"]
    assert labels.shape == (4,) and labels[2:].tolist() == [10, 10]
    assert data[0]["hidden_states"].shape == (4, 4, 16, 16)


def test_nan_in_calibration_data_names_layer_and_timestep():
    m = _model()
    data = calib_set(2)
    bad = denoiser_inputs(2, (123, 456))
    bad["sample"][1, 0, 0, 0] = float("nan")
    prog = stepq.prepare(stepq.capture(m, data[0]), "w8a8")
    with pytest.raises(stepq.CalibrationError, match=r"non-finite values .* layer 'conv_in.input' at timestep 456"):
        stepq.calibrate(prog, [data[0], bad], progress=False)


def test_empty_and_missing_calibration_data():
    m = _model()
    x = calib_set(1)[0]
    prog = stepq.prepare(stepq.capture(m, x), "w8a8")
    with pytest.raises(stepq.CalibrationError, match="calibration data is empty"):
        stepq.calibrate(prog, [], progress=False)
    with pytest.raises(stepq.CalibrationError, match="needs calibration data"):
        stepq.quantize(m, x, "w8a8")
    with pytest.raises(stepq.CalibrationError, match="must be a dict of keyword arguments"):
        stepq.calibrate(prog, [3], progress=False)


def test_steps_out_of_order_raise_typed_errors():
    m = _model()
    x = calib_set(1)[0]
    prog = stepq.capture(m, x)
    with pytest.raises(stepq.compiler.errors.PreconditionError, match="needs a program at stage prepared"):
        stepq.calibrate(prog, [x])
    prepared = stepq.prepare(prog, "w8a8")
    with pytest.raises(stepq.compiler.errors.PreconditionError, match="run stepq.calibrate first"):
        stepq.convert(prepared)
    # prepare copies by default: the captured program can be prepared again with another recipe
    assert prog.stage == "captured"
    stepq.prepare(prog, "w4a4")


def test_timestep_outside_the_table_raises_or_clamps_by_policy():
    m = _model()
    x = calib_set(1)[0]
    prog = stepq.prepare(stepq.capture(m, x), "w8a8")
    # refused at the door (stepq.compiler.input_checks), before an observer sees it
    with pytest.raises(stepq.TimestepRangeError, match=r"argument 'timestep' has timestep 1500 outside \[0, 1000\]"):
        stepq.calibrate(prog, [denoiser_inputs(2, (10, 1500))], progress=False)
    recipe = stepq.get_preset("w8a8").replace(timestep_policy="clamp")
    prog = stepq.prepare(stepq.capture(m, x), recipe)
    with pytest.warns(stepq.compiler.errors.TimestepClampWarning, match="timestep 1500 outside"):
        stepq.calibrate(prog, [denoiser_inputs(2, (10, 1500))], progress=False)
    st = prog.state.activation_stats["conv_in.input"]
    assert st.visited.tolist() == [10, 999]
