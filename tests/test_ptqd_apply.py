"""PTQD end to end: config and presets, bit choice and BOPs, apply() on a real scheduler's trajectories."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from helpers import calib_set, denoiser_inputs

import stepq
from stepq import ptqd
from stepq.calibration import collect
from stepq.calibration.samplers import make_denoiser, sample
from stepq.compiler.errors import RecipeError
from stepq.recipe.specs import PTQDConfig, Recipe
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


def test_config_validation_presets_and_round_trip():
    for bad in ({"mixed_bits": (8, 4)}, {"mixed_bits": (4,)}, {"mixed_bits": (1, 8)}, {"guidance_scale": 0.0},
                {"normality_samples": 3}, {"snr_margin": 0.0}):
        with pytest.raises(RecipeError):
            PTQDConfig(**bad)
    with pytest.raises(RecipeError, match="unknown field"):
        PTQDConfig.from_dict({"sigma": 1})
    for name in ("w4a8-ptqd", "w4a4-ptqd", "mixed-ptqd", "w4a8-tdq-ptqd", "mixed-tdq-ptqd"):
        r = stepq.get_preset(name)
        assert r.ptqd is not None and Recipe.from_dict(r.to_dict()) == r
        assert (r.tdq is not None) == ("tdq" in name)
        assert (r.ptqd.mixed_bits == (4, 8)) == name.startswith("mixed")
    assert stepq.get_preset("mixed-ptqd").default == stepq.get_preset("w4a8").default
    assert stepq.get_preset("w4a8").ptqd is None


def test_choose_bits_takes_the_smallest_width_above_the_forward_snr():
    snr_f = torch.tensor([100.0, 10.0, 1.0, 0.1, 0.01])
    snr_q = torch.tensor([[0.5, 0.5, 5.0, 5.0, 5.0],      # A2
                          [3.0, 20.0, 20.0, 20.0, 20.0],  # A4
                          [50.0, 50.0, 50.0, 50.0, 50.0]])  # A8
    assert ptqd.choose_bits(snr_q, snr_f, (2, 4, 8)).tolist() == [8, 4, 2, 2, 2]  # none qualifies at t=0: the largest
    ac = DDPMScheduler().alphas_cumprod
    torch.testing.assert_close(ptqd.forward_snr(DDPMScheduler(), 1000), (ac / (1 - ac)).float())
    flow = ptqd.forward_snr(FlowMatchEulerDiscreteScheduler(), 1000)
    assert float(flow[500]) == pytest.approx(1.0) and bool((flow[1:] <= flow[:-1]).all())


def test_bit_operations_count_macs_times_operand_bits():
    m = build_random_denoiser(RandomDenoiserConfig(kind="unet", depth=1))
    data = calib_set(2)
    qm = stepq.quantize(m, data[0], stepq.get_preset("mixed-ptqd").replace(ptqd=PTQDConfig(mixed_bits=(4, 8))),
                        calibration=data, ptqd_data=data, progress=False)
    costs = ptqd.layer_costs(qm, data[0])
    conv_in = next(c for c in costs if c.layer == "conv_in")
    assert conv_in.macs == 32 * 8 * 8 * (4 * 3 * 3) and conv_in.w_bits == 8 and conv_in.a_bits == 8  # the io island
    switched = [c for c in costs if c.a_bits is None]
    assert switched and all(c.w_bits == 4 for c in switched)
    all8, all4 = torch.full((1000,), 8), torch.full((1000,), 4)
    ts = [900, 100]
    b8, b4, half = (ptqd.bit_operations(costs, tab, ts) for tab in (all8, all4, torch.where(torch.arange(1000) > 500, 4, 8)))
    expected8 = sum(c.macs * c.w_bits * (c.a_bits or 8) for c in costs)
    assert b8["bops"] == expected8 and b4["bops"] < b8["bops"] < b8["bops_w8a8"] < b8["bops_fp32"]
    assert half["bops"] == pytest.approx((b8["bops"] + b4["bops"]) / 2)
    assert b8["saved_vs_w8a8"] == pytest.approx(1 - expected8 / b8["bops_w8a8"])


def _unet():
    from stepq.testing.families import FAMILIES

    f = FAMILIES["unet"]
    return f, f.model()


@pytest.mark.slow
def test_apply_on_real_trajectories_corrects_the_error_and_samples_with_the_wrapper(tmp_path):
    f, model = _unet()
    sched = DDPMScheduler(num_train_timesteps=1000)
    kw = dict(make_inputs=f.make_inputs, sample_shape=f.sample_shape, progress=False)
    calib = collect(model, DDIMScheduler(), num_samples=2, num_inference_steps=5, seed=1, **kw)
    data = collect(model, sched, num_samples=2, num_inference_steps=12, seed=2, **kw)
    plain = stepq.quantize(model, calib[0], "w4a4", calibration=calib, progress=False)
    qm = ptqd.apply(ptqd.copy_model(plain), model, data, config=PTQDConfig(), scheduler=sched)
    stats = qm.program.state.ptqd
    assert int(stats.visited.sum()) == 12 and stats.normality is not None
    # on the measured inputs, the corrected prediction is closer to the FP one than the raw one
    err_plain = err_corr = 0.0
    with torch.no_grad():
        for item in data:
            ref = model(**item)[0]
            err_plain += float((plain(**item)[0] - ref).pow(2).sum())
            err_corr += float((qm(**item)[0] - ref).pow(2).sum())
    assert err_corr < err_plain
    # the compiled model and its scheduler wrapper sample like any denoiser; with k = b = σ_q = 0 they
    # reduce to the plain model and diffusers' scheduler
    wrapped = ptqd.scheduler_for(qm, sched)
    assert isinstance(wrapped, ptqd.PTQDScheduler)
    assert ptqd.scheduler_for(plain, sched) is sched
    noise = torch.randn(2, *f.sample_shape, generator=torch.Generator().manual_seed(0))
    x = sample(make_denoiser(qm, make_inputs=f.make_inputs), wrapped, noise, 4, seed=3)
    assert x.shape == noise.shape and bool(torch.isfinite(x).all())
    off = ptqd.with_config(qm, PTQDConfig(correlated=False, bias=False, variance=False))
    item = data[5]
    assert torch.equal(off(**item)[0], plain(**item)[0])
    qm.save(tmp_path / "q")
    back = stepq.load(tmp_path / "q")
    assert isinstance(ptqd.scheduler_for(back, sched), ptqd.PTQDScheduler)


def test_quantize_runs_ptqd_for_ptqd_recipes():
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit", depth=1))
    data = calib_set(3)
    qm = stepq.quantize(m, data[0], "w4a8-ptqd", calibration=data, progress=False)
    assert qm.program.state.has('ptqd') and not qm.program.state.has('ptqd_bits')
    # convert inserts the correction (apply's second look at it rewrites nothing); the ptqd phase
    # measures the noise and refresh_tables fills the correction from it
    assert qm.program.history[-5:] == ["quantize_weights", "correct_noise", "refresh_tables", "measure_noise",
                                       "refresh_tables"]
    x = denoiser_inputs(2, (10, 900))
    assert torch.isfinite(qm(**x)).all()
