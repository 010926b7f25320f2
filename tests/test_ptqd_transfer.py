"""PTQD statistics that transfer: standard errors, kernel shrinkage, bias shrinkage, the gate, samplers=."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from helpers import calib_set
from hypothesis import given, settings
from hypothesis import strategies as st

import stepq
from stepq import ptqd
from stepq.calibration import collect
from stepq.calibration.collect import collect_samplings, sampling_of
from stepq.compiler.errors import PreconditionError, RecipeError
from stepq.methods.ptqd import ErrorAccumulator, Estimator, PTQDStats
from stepq.recipe.specs import PTQDConfig
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


def _clustered(acc: ErrorAccumulator, t: int, m: int, gen: torch.Generator, *, k: float, b: tuple[float, ...],
               sigma: float, tau_k: float = 0.1, tau_b: float = 0.1, hw: int = 64) -> None:
    """m samples at t of ε̂ = (1 + k + δ_i)ε + b_c + u_ic + σ·n: per-sample δ_i ~ N(0, τ_k²) and
    u_ic ~ N(0, τ_b²) make the elements of one sample correlated (what real samples are)."""
    C = len(b)
    e = torch.randn(m, C, hw, generator=gen, dtype=torch.float64)
    delta = tau_k * torch.randn(m, 1, 1, generator=gen, dtype=torch.float64)
    u = tau_b * torch.randn(m, C, 1, generator=gen, dtype=torch.float64)
    bb = torch.tensor(b, dtype=torch.float64).reshape(1, C, 1)
    eh = (1 + k + delta) * e + bb + u + sigma * torch.randn(m, C, hw, generator=gen, dtype=torch.float64)
    acc.add(torch.full((m,), t), e, eh)


def _reference_tables(acc: ErrorAccumulator) -> dict[str, torch.Tensor]:
    """The tables as formed before estimators existed (the code of that finalize, verbatim)."""
    n_c = acc.n_c
    n = n_c.sum(1)
    visited = n > 0
    nn = n.clamp_min(1)
    se, sd = acc.se_c.sum(1), acc.sd_c.sum(1)
    me, md = se / nn, sd / nn
    var_e = (acc.see / nn - me * me).clamp_min(0)
    cov = acc.sed / nn - me * md
    slope = torch.where(var_e > 0, cov / var_e.clamp_min(1e-300), torch.zeros_like(cov))
    k = slope.clamp_min(0)
    bias = acc.sd_c / n_c.clamp_min(1)
    sum_r = -k * se
    sum_r2 = (acc.sdd + k * k * acc.see - (n_c * bias * bias).sum(1) - 2 * k * acc.sed
              + 2 * k * (bias * acc.se_c).sum(1))
    sigma = (sum_r2 / nn - (sum_r / nn) ** 2).clamp_min(0).sqrt()
    return {"k": ptqd.fill_table(k, visited).float(), "slope": ptqd.fill_table(slope, visited).float(),
            "bias": ptqd.fill_table(bias, visited).float(), "sigma": ptqd.fill_table(sigma, visited).float()}


def test_standard_errors_are_calibrated_on_clustered_data():
    """Across seeds the truth lies within ±3 se in ≥ 95 % of the fits (nominal 99.7 %, t-ish with 16
    samples); the element-count standard error would be far too small (it ignores the clustering)."""
    K, B, S, tk, tb = 0.2, (0.3, -0.1), 0.2, 0.1, 0.1
    true_sigma = math.sqrt(S**2 + tk**2 + tb**2)  # the residual around the population k, b
    hits = {"k": 0, "b": 0, "sigma": 0}
    ratio = []
    runs = 200
    for seed in range(runs):
        g = torch.Generator().manual_seed(seed)
        acc = ErrorAccumulator(4, 2, normality_samples=None)
        _clustered(acc, 1, 16, g, k=K, b=B, sigma=S, tau_k=tk, tau_b=tb)
        s = acc.finalize()
        assert s.samples is not None and float(s.samples[1]) == 16
        hits["k"] += abs(float(s.slope[1]) - K) < 3 * float(s.k_se[1])
        hits["b"] += all(abs(float(s.bias[1, c]) - B[c]) < 3 * float(s.bias_se[1, c]) for c in range(2))
        hits["sigma"] += abs(float(s.sigma[1]) - true_sigma) < 3 * float(s.sigma_se[1])
        n = 16 * 2 * 64
        ratio.append(float(s.k_se[1]) / (float(s.sigma[1]) / math.sqrt(n)))  # vs the iid-element se
    for name, h in hits.items():
        assert h / runs >= 0.95, (name, h / runs)
    assert sum(ratio) / runs > 3.0  # the elements of one sample are worth far less than independent ones


def test_standard_errors_shrink_with_the_number_of_samples():
    g = torch.Generator().manual_seed(0)
    acc = ErrorAccumulator(4, 1, normality_samples=None)
    _clustered(acc, 1, 16, g, k=0.2, b=(0.1,), sigma=0.2)
    _clustered(acc, 2, 256, g, k=0.2, b=(0.1,), sigma=0.2)
    s = acc.finalize()
    assert float(s.k_se[2]) == pytest.approx(float(s.k_se[1]) / 4, rel=0.5)
    assert float(s.bias_se[2, 0]) == pytest.approx(float(s.bias_se[1, 0]) / 4, rel=0.5)
    one = ErrorAccumulator(4, 1, normality_samples=None)
    _clustered(one, 1, 1, g, k=0.2, b=(0.1,), sigma=0.2)
    s1 = one.finalize()
    assert math.isinf(float(s1.k_se[1])) and math.isinf(float(s1.bias_se[1, 0]))  # one sample: no between-sample spread


def test_kernel_estimate_beats_the_raw_one_with_few_samples_per_timestep():
    T, grid = 200, list(range(5, 200, 10))

    def truth(t):
        return 0.1 + 0.2 * t / T, 0.05 * math.cos(math.pi * t / T)

    err = {"none": 0.0, "kernel": 0.0}
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        acc = ErrorAccumulator(T, 1, normality_samples=None)
        for t in grid:
            k, b = truth(t)
            _clustered(acc, t, 3, g, k=k, b=(b,), sigma=0.3, tau_k=0.15, tau_b=0.15, hw=32)
        for name in err:
            s = acc.finalize(estimator=Estimator(shrinkage=name))
            for t in grid:
                k, b = truth(t)
                err[name] += (float(s.slope[t]) - k) ** 2 + (float(s.bias[t, 0]) - b) ** 2
    assert err["kernel"] < 0.6 * err["none"], err
    s = acc.finalize(estimator=Estimator(shrinkage="kernel"))
    assert s.k_se is not None and bool(torch.isfinite(s.k_se).all())  # every row, with its standard error
    raw = acc.finalize()
    assert float(s.k_se[grid].mean()) < float(raw.k_se[grid].mean())  # pooling neighbours lowers the error


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 3))
def test_kernel_with_a_tiny_bandwidth_is_the_raw_estimate(seed, C):
    g = torch.Generator().manual_seed(seed)
    acc = ErrorAccumulator(50, C, normality_samples=None)
    for t in (3, 20, 41):
        _clustered(acc, t, 4, g, k=0.1 * t / 50, b=tuple(0.1 * c for c in range(C)), sigma=0.2, hw=16)
    raw, ker = acc.finalize(), acc.finalize(estimator=Estimator(shrinkage="kernel", bandwidth=0.05))
    for name in ("slope", "k", "bias", "sigma", "k_se", "bias_se", "sigma_se"):
        a, b = getattr(raw, name)[[3, 20, 41]], getattr(ker, name)[[3, 20, 41]]
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


def test_the_gate_zeroes_a_null_term_and_keeps_a_large_one():
    g = torch.Generator().manual_seed(1)
    acc = ErrorAccumulator(10, 2, normality_samples=None)
    _clustered(acc, 2, 32, g, k=0.0, b=(0.0, 0.0), sigma=0.3, tau_k=0.0, tau_b=0.0)  # no correction needed
    _clustered(acc, 7, 32, g, k=0.3, b=(0.5, -0.4), sigma=0.3)
    plain, gated = acc.finalize(), acc.finalize(estimator=Estimator(gate_z=3.0))
    assert gated.k_gated is not None and gated.bias_gated is not None
    assert bool(gated.k_gated[2]) and float(gated.k[2]) == 0.0
    assert bool(gated.bias_gated[2].all()) and bool((gated.bias[2] == 0).all())
    assert not bool(gated.k_gated[7]) and not bool(gated.bias_gated[7].any())
    assert float(gated.k[7]) == float(plain.k[7]) and torch.equal(gated.bias[7], plain.bias[7])
    # a gated term stays in the residual: σ_q at t=2 grows by what the raw k, b had removed
    assert float(gated.sigma[2]) >= float(plain.sigma[2])
    assert float(gated.sigma[7]) == pytest.approx(float(plain.sigma[7]), rel=1e-6)
    assert not bool(gated.k_gated[4])  # unmeasured rows are interpolated, never marked
    assert not bool(plain.k_gated.any()) and not bool(plain.bias_gated.any())


def test_bias_shrinkage_pulls_noisy_channels_to_the_target():
    g = torch.Generator().manual_seed(2)
    acc = ErrorAccumulator(10, 3, normality_samples=None)
    _clustered(acc, 5, 8, g, k=0.1, b=(0.0, 0.002, 2.0), sigma=0.3, tau_b=0.2)
    plain = acc.finalize()
    js = acc.finalize(estimator=Estimator(bias_shrinkage="zero"))
    b, se, bj = plain.bias[5].double(), plain.bias_se[5].double(), js.bias[5].double()
    expected = b * (1 - se**2 / b**2).clamp_min(0)
    torch.testing.assert_close(bj, expected, rtol=1e-5, atol=1e-7)
    assert abs(float(bj[2]) - float(b[2])) < 0.05 * abs(float(b[2]))  # a large bias is barely touched
    assert bool((bj.abs() <= b.abs() + 1e-7).all())
    pooled = acc.finalize(estimator=Estimator(bias_shrinkage="pooled"))
    pb = float(plain.bias_pooled[5])
    dev = b - pb
    torch.testing.assert_close(pooled.bias[5].double(), pb + dev * (1 - se**2 / dev**2).clamp_min(0),
                               rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 3), st.lists(st.integers(0, 29), min_size=1, max_size=5))
def test_the_plain_estimator_gives_exactly_the_old_tables(seed, C, ts):
    g = torch.Generator().manual_seed(seed)
    acc = ErrorAccumulator(30, C, normality_samples=None)
    for t in ts:
        e = torch.randn(3, C, 4, 4, generator=g) + 0.2
        acc.add(torch.full((3,), t), e, e * 1.1 + 0.3 * torch.randn(3, C, 4, 4, generator=g) + 0.05)
    ref = _reference_tables(acc)
    for s in (acc.finalize(), acc.finalize(estimator=Estimator("none", None, "none", 0.0))):
        for name, v in ref.items():
            assert torch.equal(getattr(s, name), v), name
        assert torch.equal(s.raw_k, s.k) and torch.equal(s.raw_bias, s.bias)
    other = acc.finalize(estimator=Estimator(shrinkage="kernel", gate_z=1.0))
    assert torch.equal(other.raw_k, ref["k"]) and torch.equal(other.raw_bias, ref["bias"])


def test_stats_round_trip_with_and_without_the_new_tables():
    g = torch.Generator().manual_seed(0)
    acc = ErrorAccumulator(20, 2, normality_samples=100)
    _clustered(acc, 3, 4, g, k=0.1, b=(0.1, 0.0), sigma=0.2)
    s = acc.finalize(estimator=Estimator(shrinkage="kernel", gate_z=2.0))
    back = PTQDStats.from_tensors(s.tensors())
    for name, v in s.tensors().items():
        assert torch.equal(back.tensors()[name], v), name
    old = {n: v for n, v in s.tensors().items() if n in ("k", "slope", "bias", "sigma", "snr", "visited", "count")}
    assert PTQDStats.from_tensors(old).k_se is None  # statistics saved before the standard errors existed
    with pytest.raises(ValueError, match="k_se"):
        PTQDStats(**old, k_se=torch.zeros(3))


def test_config_validation_and_round_trip():
    for bad in ({"shrinkage": "loess"}, {"bandwidth": 0.0, "shrinkage": "kernel"}, {"bandwidth": 10.0},
                {"bias_shrinkage": "js"}, {"gate_z": -1.0}, {"gate_z": math.inf}, {"sampler_samples": 0}):
        with pytest.raises(RecipeError):
            PTQDConfig(**bad)
    cfg = PTQDConfig(shrinkage="kernel", bandwidth=25.0, bias_shrinkage="pooled", gate_z=2.0, sampler_samples=8)
    assert PTQDConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in PTQDConfig().to_dict().items()
           if k not in ("shrinkage", "bandwidth", "bias_shrinkage", "gate_z", "sampler_samples")}
    assert PTQDConfig.from_dict(old) == PTQDConfig()  # a recipe saved before these fields: today's estimator
    assert Estimator.of(PTQDConfig()).plain and not Estimator.of(cfg).plain
    for name in ("w4a8-ptqd", "w4a4-ptqd", "mixed-ptqd"):
        assert Estimator.of(stepq.get_preset(name).ptqd).plain  # presets keep the recorded behaviour


def _tiny(kind="unet"):
    return build_random_denoiser(RandomDenoiserConfig(kind=kind, depth=1))


def test_samplers_build_the_data_from_the_samplers_timesteps():
    model = _tiny()
    calib = collect(model, DDIMScheduler(), num_samples=2, num_inference_steps=3, seed=0, sample_shape=(4, 8, 8),
                    progress=False)
    ddpm = DDPMScheduler()
    ddpm.set_timesteps(7)
    ddim = stepq.Sampling(DDIMScheduler(), 5, calib.sampling.sample_shape, eta=1.0)
    cfg = PTQDConfig(sampler_samples=2, normality_samples=50, shrinkage="kernel", gate_z=2.0)
    recipe = stepq.get_preset("w4a8-ptqd").replace(ptqd=cfg)
    qm = stepq.quantize(model, calib[0], recipe, calibration=calib, samplers=[ddpm, ddim], progress=False)
    st_ = qm.program.state.ptqd
    want = sorted({int(t) for t in ddpm.timesteps} | set(_steps(DDIMScheduler(), 5)))
    assert st_.visited.nonzero().reshape(-1).tolist() == want
    assert st_.k_se is not None and st_.k_gated is not None
    # consistent ptqd_data with samplers is accepted; inconsistent data is a typed error
    data = collect_samplings(model, [sampling_of(ddpm, calib.sampling)], num_samples=1, progress=False)
    assert sorted(set(data.timesteps)) == sorted(float(t) for t in ddpm.timesteps)
    stepq.quantize(model, calib[0], recipe, calibration=calib, samplers=[ddpm], ptqd_data=data, progress=False)
    with pytest.raises(RecipeError, match="both ptqd_data and samplers"):
        stepq.quantize(model, calib[0], recipe, calibration=calib, samplers=[ddim], ptqd_data=data, progress=False)
    with pytest.raises(RecipeError, match="both ptqd_data and samplers"):
        stepq.quantize(model, calib[0], recipe, calibration=calib, samplers=[ddpm], ptqd_data=list(data),
                       progress=False)
    with pytest.raises(RecipeError, match="no ptqd section"):
        stepq.quantize(model, calib[0], "w4a8", calibration=calib, samplers=[ddpm], progress=False)
    unset = DDPMScheduler()
    with pytest.raises(RecipeError, match="set_timesteps"):
        stepq.quantize(model, calib[0], recipe, calibration=calib, samplers=[unset], progress=False)
    with pytest.raises(RecipeError, match="sample shape"):
        stepq.quantize(model, calib[0], recipe, calibration=list(calib), samplers=[ddpm], progress=False)
    with pytest.raises(RecipeError, match="guidance"):
        stepq.quantize(model, calib[0], recipe, calibration=calib, progress=False,
                       samplers=[stepq.Sampling(DDIMScheduler(), 5, calib.sampling.sample_shape, guidance_scale=2.0)])


def _steps(sched, n):
    sched.set_timesteps(n)
    return [int(t) for t in sched.timesteps]


def test_with_config_refuses_another_estimator_and_apply_uses_it():
    model = _tiny()
    data = calib_set(2)
    qm = stepq.quantize(model, data[0], "w4a8-ptqd", calibration=data, progress=False)
    with pytest.raises(PreconditionError, match="estimator"):
        ptqd.with_config(qm, qm.recipe.ptqd.replace(gate_z=2.0))
    gated = ptqd.apply(stepq.quantize(model, data[0], "w4a8", calibration=data, progress=False), model, data,
                       config=PTQDConfig(gate_z=1e6))
    st_ = gated.program.state.ptqd
    assert bool(st_.k_gated[st_.visited].all()) and float(st_.k.abs().max()) == 0.0
    assert float(st_.bias.abs().max()) == 0.0


def test_plot_shows_the_tables_bands_and_gated_terms(tmp_path):
    g = torch.Generator().manual_seed(1)
    acc = ErrorAccumulator(50, 1, normality_samples=None)
    _clustered(acc, 10, 16, g, k=0.0, b=(0.0,), sigma=0.3, tau_k=0.0, tau_b=0.0)
    _clustered(acc, 40, 16, g, k=0.3, b=(0.5,), sigma=0.3)
    s = acc.finalize(estimator=Estimator(gate_z=3.0))
    fig = ptqd.plot_statistics(s, tmp_path / "k_b.png", z=2.0)
    assert (tmp_path / "k_b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax_k, ax_b = fig.axes
    lines = {ln.get_label(): ln for ln in ax_k.get_lines()}
    assert lines["applied table"].get_ydata().tolist() == pytest.approx(s.k.tolist())
    assert lines["gated (set to 0)"].get_xdata().tolist() == [10]
    assert lines["measured timesteps"].get_xdata().tolist() == [10, 40]
    band = ax_k.collections[0].get_paths()[0].vertices[:, 1]  # the ±2 se band around the slope
    hi = float(s.slope[40] + 2 * s.k_se[40])
    assert float(band.max()) >= hi - 1e-5 and float(band.max()) <= float((s.slope + 2 * s.k_se).max()) + 1e-5
    assert {ln.get_label() for ln in ax_b.get_lines()} >= {"applied table", "raw per-timestep estimate"}
