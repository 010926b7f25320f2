"""PTQDScheduler: the variance rule for DDPM and DDIM, exactness against diffusers, sampling loops."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from stepq.calibration.samplers import fresh_scheduler, sample
from stepq.methods.ptqd import PTQDScheduler, UnsupportedSchedulerError

DIGITS = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
          "prediction_type": "epsilon", "variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0}


def _stats(k=0.0, sigma=0.0, T=1000):
    kk = torch.full((T,), float(k)) if not isinstance(k, torch.Tensor) else k
    ss = torch.full((T,), float(sigma)) if not isinstance(sigma, torch.Tensor) else sigma
    return SimpleNamespace(k=kk, sigma=ss)


def _alphas_cumprod():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32).double()
    return torch.cumprod(1 - betas, 0)


def _loop(sched, steps, eta=None, seed=0, shape=(2, 1, 8, 8)):
    """A fixed 'model' (a function of x and t) through a scheduler; returns every intermediate sample."""
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(99))
    out = []
    for t in sched.timesteps:
        eps = torch.tanh(x) * (0.5 + float(t) / 2000)
        kw = {"generator": gen} if eta is None else {"generator": gen, "eta": eta}
        x = sched.step(eps, t, x, **kw).prev_sample
        out.append(x)
    return out


@pytest.mark.parametrize("config", [DIGITS, {"num_train_timesteps": 1000}], ids=["digits", "default"])
@pytest.mark.parametrize("steps", [1000, 100])
def test_ddpm_wrapper_with_zero_statistics_equals_diffusers_exactly(config, steps):
    ref = _loop(DDPMScheduler.from_config(config), steps if steps == 100 else 30, seed=1)
    wrapped = _loop(PTQDScheduler(DDPMScheduler.from_config(config), _stats()), steps if steps == 100 else 30, seed=1)
    for a, b in zip(ref, wrapped):
        assert torch.equal(a, b)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_wrapper_with_zero_statistics_equals_diffusers_exactly(eta):
    ref = _loop(DDIMScheduler.from_config(DIGITS), 20, eta=eta, seed=2)
    wrapped = _loop(PTQDScheduler(DDIMScheduler.from_config(DIGITS), _stats(k=0.3)), 20, eta=eta, seed=2)
    for a, b in zip(ref, wrapped):
        assert torch.equal(a, b)


def test_ddpm_variance_follows_the_formula_and_never_goes_negative():
    ac = _alphas_cumprod()
    k, sq = torch.linspace(0, 0.5, 1000), torch.linspace(0.01, 0.3, 1000)
    sched = PTQDScheduler(DDPMScheduler.from_config(DIGITS), _stats(k, sq))
    sched.set_timesteps(100)
    clamped = 0
    for t in sched.timesteps.tolist():
        prev = t - 10
        a_t, a_prev = ac[t], (ac[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64))
        alpha, beta = a_t / a_prev, 1 - a_t / a_prev
        sigma2 = max(float((1 - a_prev) / (1 - a_t) * beta), 1e-20)
        new2 = max(sigma2 - float(beta**2 / (alpha * (1 - a_t) * (1 + k[t]) ** 2)) * float(sq[t]) ** 2, 0.0)
        got_sigma2, got_new2 = sched.ddpm_variance(t)
        assert float(got_sigma2) == pytest.approx(sigma2, rel=2e-3, abs=1e-12)  # float32 near t = 0
        assert float(got_new2) == pytest.approx(new2, rel=2e-3, abs=1e-9)
        assert float(got_new2) >= 0.0
        clamped += new2 == 0.0
    assert clamped > 0  # the large σ_q late in the table clamps at 0
    huge = PTQDScheduler(DDPMScheduler.from_config(DIGITS), _stats(0.0, 100.0))
    huge.set_timesteps(100)
    assert all(float(huge.ddpm_variance(t)[1]) == 0.0 for t in huge.timesteps.tolist())


def test_ddim_variance_follows_the_formula_and_eta_zero_does_nothing():
    ac = _alphas_cumprod()
    k, sq = 0.2, 0.15
    sched = PTQDScheduler(DDIMScheduler.from_config(DIGITS), _stats(k, sq))
    sched.set_timesteps(20)
    for t in sched.timesteps.tolist():
        prev = t - 50
        a_t, a_prev = ac[t], (ac[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64))
        var = float((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        for eta in (0.5, 1.0):
            sigma2 = eta**2 * var
            lam = (math.sqrt(max(1 - a_prev - sigma2, 0)) - math.sqrt(a_prev) * math.sqrt(1 - a_t) / math.sqrt(a_t)) / (1 + k)
            new2 = max(sigma2 - lam**2 * sq**2, 0.0)
            got_var, got_sigma2, got_new2 = sched.ddim_variance(t, eta)
            assert float(got_var) == pytest.approx(var, rel=2e-3, abs=1e-12)
            assert float(got_new2) == pytest.approx(new2, rel=2e-3, abs=1e-9) and float(got_new2) >= 0
            assert float(got_new2) <= float(got_sigma2)
        _, s0, n0 = sched.ddim_variance(t, 0.0)
        assert float(s0) == 0.0 and float(n0) == 0.0
    # η = 0: the wrapped sampler is the plain deterministic DDIM
    ref = _loop(DDIMScheduler.from_config(DIGITS), 20, eta=0.0)
    got = _loop(PTQDScheduler(DDIMScheduler.from_config(DIGITS), _stats(k, sq)), 20, eta=0.0)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_the_step_adds_noise_with_the_lowered_std():
    sq = 0.2
    plain, wrapped = DDPMScheduler.from_config(DIGITS), PTQDScheduler(DDPMScheduler.from_config(DIGITS), _stats(0.1, sq))
    off = PTQDScheduler(DDPMScheduler.from_config(DIGITS), _stats(0.1, 1e6))  # σ' = 0: the posterior mean
    for s in (plain, wrapped, off):
        s.set_timesteps(50)
    t = int(plain.timesteps[10])
    x = torch.randn(2, 1, 8, 8)
    eps = torch.tanh(x)

    def step(s):
        return s.step(eps, t, x, generator=torch.Generator().manual_seed(5)).prev_sample

    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    mean = step(off)
    sigma, new = wrapped.ddpm_variance(t)
    torch.testing.assert_close(step(plain), mean + sigma.sqrt() * z)
    torch.testing.assert_close(step(wrapped), mean + new.sqrt() * z)
    assert float(new) < float(sigma)


def test_ddim_step_uses_the_new_sigma_in_the_direction_term_too():
    k, sq, eta = 0.1, 0.3, 1.0
    w = PTQDScheduler(DDIMScheduler.from_config(DIGITS), _stats(k, sq))
    w.set_timesteps(20)
    t = int(w.timesteps[5])
    var, sigma2, new2 = w.ddim_variance(t, eta)
    x, eps = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    inner = DDIMScheduler.from_config(DIGITS)
    inner.set_timesteps(20)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    expected = inner.step(eps, t, x, eta=float((new2 / var).sqrt()), variance_noise=noise).prev_sample
    got = w.step(eps, t, x, eta=eta, generator=torch.Generator().manual_seed(0)).prev_sample
    torch.testing.assert_close(got, expected)


def test_unsupported_schedulers_and_configs_raise():
    with pytest.raises(UnsupportedSchedulerError, match="EulerDiscreteScheduler"):
        PTQDScheduler(EulerDiscreteScheduler(), _stats())
    with pytest.raises(UnsupportedSchedulerError, match="prediction_type"):
        PTQDScheduler(DDPMScheduler(prediction_type="v_prediction"), _stats())
    with pytest.raises(UnsupportedSchedulerError, match="fixed_small"):
        PTQDScheduler(DDPMScheduler(variance_type="learned_range"), _stats())
    with pytest.raises(UnsupportedSchedulerError, match="timesteps"):
        PTQDScheduler(DDPMScheduler(), _stats(T=500))


def test_flow_matching_passes_through_and_samplers_take_the_wrapper():
    flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    w = PTQDScheduler(flow, _stats(0.2, 0.5))
    assert w.kind == "flow"
    x = torch.randn(2, 1, 4, 4)

    def denoise(x, t):
        return -x * 0.3

    assert torch.equal(sample(denoise, w, x, 5), sample(denoise, flow, x, 5))
    fresh = fresh_scheduler(PTQDScheduler(DDPMScheduler.from_config(DIGITS), _stats(0.1, 0.1)))
    assert isinstance(fresh, PTQDScheduler) and fresh.num_inference_steps is None
    # sample() draws from the wrapper: with zero statistics it is diffusers' DDPM, sample for sample
    ddpm = DDPMScheduler.from_config(DIGITS)
    a = sample(denoise, ddpm, x, 20, seed=3)
    b = sample(denoise, PTQDScheduler(ddpm, _stats()), x, 20, seed=3)
    c = sample(denoise, PTQDScheduler(ddpm, _stats(0.0, 0.3)), x, 20, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, c)
