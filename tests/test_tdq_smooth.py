"""TDQ smooth in t: grid frequencies, the curvature penalty, held-out timesteps, several samplers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import stepq
from stepq.calibration import collect, combine
from stepq.calibration.probe import run_without_quantizers
from stepq.compiler.errors import CalibrationError, RecipeError
from stepq.methods.tdq.fit import _relative_error, _split, curvature, fit_scale_source, merge_batches
from stepq.methods.tdq.sources import (
    ScaleGenerators,
    fourier_features,
    fourier_frequencies,
    grid_frequencies,
)
from stepq.passes.insert_scale_source import SCALE_SOURCE
from stepq.recipe.specs import Recipe, TDQConfig
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


class _TimeScaled(nn.Module):
    """Activations whose range changes with t (so the fitted step sizes do too)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin1 = nn.Linear(16, 32)
        self.lin2 = nn.Linear(32, 16)

    def forward(self, sample, timestep):
        gain = (1.0 + timestep.float() / 50.0)[:, None]
        return self.lin2(torch.relu(self.lin1(sample)) * gain)


def _data(ts, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"sample": torch.randn(batch, 16, generator=g), "timestep": torch.full((batch,), t, dtype=torch.int64)}
            for t in ts]


def _prog(data, **tdq):
    recipe = stepq.get_preset("w8a4").replace(name="t", tdq=TDQConfig(**{"fit_batch": 4, **tdq}))
    return stepq.calibrate(stepq.prepare(stepq.capture(_TimeScaled().eval(), data[0]), recipe), data, progress=False)


# -- frequencies ---------------------------------------------------------------------------------


def _old_fourier_features(t, dim, t_max):  # the encoding before the frequencies became a buffer
    half = dim // 2
    freqs = torch.exp(-math.log(t_max) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().reshape(-1, 1) * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def test_geometric_frequencies_are_the_old_encoding_bit_for_bit():
    t = torch.arange(1000)
    for dim, t_max in ((64, 10000.0), (16, 1000.0), (2, 10.0)):
        assert torch.equal(fourier_features(t, dim, t_max), _old_fourier_features(t, dim, t_max))
    gen = ScaleGenerators(["a", "b"], torch.tensor([0.1, 1.0]), num_train_timesteps=1000)
    assert torch.equal(gen.freqs, fourier_frequencies(64, 10000.0))
    with torch.no_grad():
        gen.w4.normal_()
    # the generator's forward on the buffer is the forward on the old per-call encoding
    enc = _old_fourier_features(t, 64, 10000.0)
    h = torch.relu(torch.einsum("bd,ldh->lbh", enc, gen.w1) + gen.b1[:, None])
    h = torch.relu(torch.einsum("lbh,lhk->lbk", h, gen.w2) + gen.b2[:, None])
    h = torch.relu(torch.einsum("lbh,lhk->lbk", h, gen.w3) + gen.b3[:, None])
    assert torch.equal(gen(t), torch.nn.functional.softplus(torch.einsum("lbh,lh->lb", h, gen.w4) + gen.b4[:, None]))


@settings(max_examples=40, deadline=None)
@given(visited=st.lists(st.integers(0, 999), min_size=2, max_size=60), half=st.integers(1, 32))
def test_grid_frequencies_respect_the_calibration_grid(visited, half):
    T = 1000
    freqs = grid_frequencies(torch.tensor(visited), 2 * half, T).double()
    v = sorted(set(visited))
    gap = max((b - a for a, b in itertools.pairwise(v)), default=T)
    lo = math.pi / T
    assert freqs.shape == (half,)
    # the highest frequency: half the Nyquist frequency of the coarsest spacing (period 4 g >= 2 g) ...
    assert math.isclose(float(freqs.max()), max(math.pi / (2 * gap), lo), rel_tol=1e-6)
    assert float(freqs.max()) < math.pi / gap or gap > T / 2
    # ... the lowest a half-period over [0, T), geometric between, highest first
    assert half == 1 or math.isclose(float(freqs.min()), lo, rel_tol=1e-6)
    assert bool((freqs[1:] <= freqs[:-1]).all())
    if half > 2 and gap <= T / 2:
        ratios = freqs[1:] / freqs[:-1]
        torch.testing.assert_close(ratios, ratios[:1].expand_as(ratios), rtol=1e-5, atol=0)


def test_the_fit_sets_grid_frequencies_from_the_calibration_timesteps(tmp_path):
    data = _data([10, 110, 260, 400, 700, 990])  # the largest gap: 700 - 400 = 300
    prog = _prog(data, frequencies="grid", fit_steps=2)
    gen = prog.gm.get_submodule(SCALE_SOURCE)
    assert isinstance(gen, ScaleGenerators)
    torch.testing.assert_close(gen.freqs, grid_frequencies(torch.tensor([10, 110, 260, 400, 700, 990]), 64, 1000))
    assert math.isclose(2 * math.pi / float(gen.freqs.max()), 4 * 300, rel_tol=1e-5)
    # the deployed tables are the generator's values (only the tables ship)
    qm = stepq.convert(prog)
    x = data[2]
    torch.testing.assert_close(qm(**x), prog(**x), rtol=1e-4, atol=1e-4)
    qm.save(str(tmp_path / "m"))
    assert torch.equal(stepq.load(tmp_path / "m")(**x), qm(**x))
    geo = _prog(data, fit_steps=2).gm.get_submodule(SCALE_SOURCE)
    assert torch.equal(geo.freqs, fourier_frequencies(64, 10000.0))


# -- smoothness ----------------------------------------------------------------------------------


def _roughness(prog) -> tuple[float, float]:
    """(mean squared second difference, total variation) of log s(t) over [0, T), mean over quantizers."""
    log_s = torch.log(prog.gm.get_submodule(SCALE_SOURCE).tables())
    d2 = log_s[:, 2:] - 2 * log_s[:, 1:-1] + log_s[:, :-2]
    return float(d2.pow(2).mean()), float((log_s[:, 1:] - log_s[:, :-1]).abs().sum(1).mean())


def test_smoothness_penalty_lowers_the_curvature_between_visited_timesteps():
    data = _data(range(5, 1000, 90))  # 12 timesteps 90 apart; the geometric encoding resolves periods of ~6
    kw = dict(fit_steps=40, fit_lr=2e-2, hidden=16, fit_objective="output")
    rough = _roughness(_prog(data, **kw))
    smooth = _roughness(_prog(data, smoothness=30.0, **kw))
    assert smooth[0] < 0.3 * rough[0], (smooth, rough)
    assert smooth[1] < rough[1], (smooth, rough)


def test_curvature_is_zero_for_a_constant_and_positive_otherwise():
    gen = ScaleGenerators(["a"], torch.tensor([1.0]), fourier_dim=8, hidden=4, num_train_timesteps=100)
    t0 = torch.arange(0, 98)
    with torch.no_grad():
        assert float(curvature(gen, t0)) == pytest.approx(0.0, abs=1e-12)  # a constant: the unfitted generator
    with torch.no_grad():
        gen.w4.normal_()
        assert float(curvature(gen, t0)) > 0


# -- held-out timesteps --------------------------------------------------------------------------


def test_holdout_restores_the_best_held_out_parameters_and_never_trains_on_them():
    ts = list(range(5, 1000, 83))  # 12 timesteps
    data = _data(ts)
    prog = _prog(data, fit_steps=0)
    source = prog.gm.get_submodule(SCALE_SOURCE)
    trained_at: set[int] = set()
    hook = source.register_forward_pre_hook(
        lambda m, args: trained_at.update(args[0].reshape(-1).tolist()) if m.training else None)
    fit = fit_scale_source(prog, data, steps=25, lr=0.05, batch=4, rows=8, seed=3, objective="output",
                           holdout=0.25, holdout_every=10, progress=False)
    hook.remove()
    held = fit.holdout_timesteps
    assert len(held) == 3 and set(held) <= set(ts[1:-1])
    assert trained_at and not trained_at & set(held)
    assert trained_at == set(ts) - set(held)
    assert [s for s, _ in fit.holdout_curve] == [0, 10, 20, 25]
    losses = [v for _, v in fit.holdout_curve]
    assert all(math.isfinite(v) for v in losses)
    assert fit.best_step == fit.holdout_curve[losses.index(min(losses))][0]
    assert fit.best_step < 25  # here training overfits the 9 fitted timesteps: the restore is exercised
    # the held-out loss of the parameters left in the program is the minimum of the curve
    merged = merge_batches([d for d in data if int(d["timestep"][0]) in held], "sample")
    with torch.no_grad():
        after = float(_relative_error(prog(**merged), run_without_quantizers(prog.gm, *prog.flat_inputs((), merged))))
    assert after == pytest.approx(min(losses), rel=1e-6)
    assert len(fit.curve) == 25


def test_holdout_in_the_pipeline_and_a_mixed_call_is_split_by_timestep():
    data = _data(range(5, 1000, 83))
    mixed = {"sample": torch.randn(4, 16), "timestep": torch.tensor([5, 88, 171, 254])}
    prog = _prog([*data, mixed], fit_steps=12, holdout=0.2, holdout_every=5)
    curve = prog.state.fit_holdout_curve
    assert curve is not None and [s for s, _ in curve] == [0, 5, 10, 12]
    assert len(prog.state.fit_curve) == 12
    assert _prog(data, fit_steps=3).state.fit_holdout_curve is None
    train, held = _split(prog, [mixed, data[1]], [88, 171], "sample")
    assert [d["timestep"].tolist() for d in train] == [[5, 254]]
    assert [d["timestep"].tolist() for d in held] == [[88, 171], [88] * 8]
    torch.testing.assert_close(held[0]["sample"], mixed["sample"][1:3])


def test_holdout_needs_three_timesteps():
    data = _data([100, 900])
    with pytest.raises(CalibrationError, match="at least 3 distinct"):
        _prog(data, fit_steps=2, holdout=0.3)


# -- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "match"), [
    ({"frequencies": "linear"}, "frequencies"),
    ({"smoothness": -1.0}, "smoothness"),
    ({"smoothness": float("nan")}, "smoothness"),
    ({"method": "table", "smoothness": 1.0}, "smoothness"),
    ({"holdout": 1.0}, "holdout"),
    ({"holdout": -0.1}, "holdout"),
    ({"holdout_every": 0}, "holdout_every"),
])
def test_config_errors(changes, match):
    with pytest.raises(RecipeError, match=match):
        TDQConfig(**changes)


@settings(max_examples=25, deadline=None)
@given(freq=st.sampled_from(["grid", "geometric"]), smooth=st.floats(0, 1e3), hold=st.floats(0, 0.95),
       every=st.integers(1, 100))
def test_new_fields_round_trip(freq, smooth, hold, every):
    cfg = TDQConfig(frequencies=freq, smoothness=smooth, holdout=hold, holdout_every=every)
    assert TDQConfig.from_dict(cfg.to_dict()) == cfg
    r = stepq.get_preset("w4a4-tdq").replace(tdq=cfg)
    assert Recipe.from_dict(r.to_dict()) == r
    # a recipe written before these fields existed reads with the old behaviour
    old = {k: v for k, v in TDQConfig().to_dict().items() if k not in ("frequencies", "smoothness", "holdout",
                                                                       "holdout_every")}
    assert TDQConfig.from_dict(old) == TDQConfig()


# -- several samplers ----------------------------------------------------------------------------


def _make(x, t, cond):
    return {"sample": x, "timestep": torch.as_tensor(t).reshape(-1).expand(x.shape[0]).round().long()}


def test_combine_joins_samplers_and_the_grid_follows_the_finer_one():
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit", depth=1))
    kw = dict(num_samples=2, make_inputs=_make, sample_shape=(4, 8, 8), progress=False)
    ddim = collect(m, DDIMScheduler(), num_inference_steps=4, seed=1, **kw)
    ddpm = collect(m, DDPMScheduler(), num_inference_steps=10, seed=2, **kw)
    both = combine(ddim, ddpm)
    assert len(both) == len(ddim) + len(ddpm) and both.timesteps == ddim.timesteps + ddpm.timesteps
    assert both.sampling is ddim.sampling and all(a is b for a, b in zip(both, [*ddim, *ddpm]))
    with pytest.raises(CalibrationError):
        combine()
    recipe = stepq.get_preset("w8a8").replace(name="t", tdq=TDQConfig(frequencies="grid", fit_steps=1))
    prog = stepq.calibrate(stepq.prepare(stepq.capture(m, both[0]), recipe), both, progress=False)
    visited = torch.tensor(sorted({int(t) for t in both.timesteps}))
    gap = int((visited[1:] - visited[:-1]).max())
    assert gap < 250  # DDIM-4 alone is 250 apart
    freqs = prog.gm.get_submodule(SCALE_SOURCE).freqs
    assert math.isclose(float(freqs.max()), math.pi / (2 * gap), rel_tol=1e-5)
