"""PTQD statistics: recovery of a known noise model, guidance, interpolation, normality."""

from __future__ import annotations

import math

import pytest
import torch

from stepq.compiler.errors import CalibrationError
from stepq.methods.ptqd import ErrorAccumulator, fill_table, measure

T = 1000
K = {100: 0.30, 500: 0.10, 900: -0.05}  # the last one is negative: clipped to 0
BIAS = {100: (0.2, -0.1), 500: (0.05, 0.0), 900: (-0.3, 0.1)}
SIGMA = {100: 0.25, 500: 0.10, 900: 0.05}


class _FP(torch.nn.Module):
    """ε = the sample itself (any deterministic function of the input would do)."""

    def forward(self, sample, timestep):
        return sample.clone()


class _Quantized(torch.nn.Module):
    """ε̂ = (1 + k_t)·ε + b_t,c + σ_t·n with a known noise law for n (Gaussian or unit-variance Laplace)."""

    def __init__(self, noise="gauss", seed=12345):
        super().__init__()
        self.noise, self.gen = noise, torch.Generator().manual_seed(seed)

    def forward(self, sample, timestep):
        t = int(timestep.reshape(-1)[0])
        if self.noise == "gauss":
            n = torch.randn(sample.shape, generator=self.gen)
        else:
            u = torch.rand(sample.shape, generator=self.gen) - 0.5
            n = -torch.sign(u) * torch.log1p(-2 * u.abs()) / math.sqrt(2.0)
        b = torch.tensor(BIAS[t]).reshape(1, 2, 1, 1)
        return (1 + K[t]) * sample + b + SIGMA[t] * n


def _data(n_batches=6, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"sample": torch.randn(batch, 2, 8, 8, generator=g), "timestep": torch.full((batch,), t)}
            for t in K for _ in range(n_batches)]


def test_statistics_recover_a_known_slope_bias_and_residual_std():
    stats = measure(_FP(), _Quantized(), _data(), normality_samples=20000)
    assert stats.k.shape == (T,) and stats.bias.shape == (T, 2) and stats.sigma.shape == (T,)
    assert stats.visited.nonzero().reshape(-1).tolist() == sorted(K)
    for t in K:
        assert stats.slope[t] == pytest.approx(K[t], abs=0.01)
        assert stats.k[t] == pytest.approx(max(K[t], 0.0), abs=0.01)
        torch.testing.assert_close(stats.bias[t], torch.tensor(BIAS[t]), atol=0.01, rtol=0)
        # the residual is taken around (1 + k)ε with the clipped k: a negative slope's −|k|ε stays in it
        clipped = min(K[t], 0.0)
        assert stats.sigma[t] == pytest.approx(math.sqrt(SIGMA[t] ** 2 + clipped**2), rel=0.03)
        # SNR^Q = ‖ε‖/‖ε̂ − ε‖ with E[Δ²] = k² + mean(b²) + σ²
        expected = 1 / math.sqrt(K[t] ** 2 + sum(v * v for v in BIAS[t]) / 2 + SIGMA[t] ** 2)
        assert stats.snr[t] == pytest.approx(expected, rel=0.05)
    assert stats.k[900] == 0.0 and stats.slope[900] < 0  # clipped at 0, the raw slope kept for the report
    # unvisited timesteps: linear between neighbours, held at the ends
    assert float(stats.k[300]) == pytest.approx(0.5 * float(stats.k[100] + stats.k[500]), abs=1e-6)
    assert stats.sigma[0] == stats.sigma[100] and stats.sigma[999] == stats.sigma[900]


def test_residual_normality_is_tested_and_reported():
    gauss = measure(_FP(), _Quantized("gauss"), _data(), normality_samples=5000).normality
    laplace = measure(_FP(), _Quantized("laplace"), _data(), normality_samples=5000).normality
    assert gauss is not None and laplace is not None
    assert gauss.timesteps.tolist() == sorted(K) and bool((gauss.n == 5000).all())
    assert laplace.rejection_rate(0.01) == 1.0  # heavy tails: rejected everywhere
    assert bool((laplace.kurtosis[:2] > 2.0).all())  # Laplace: excess kurtosis 3
    assert gauss.rejection_rate(0.01) < 1.0
    assert float(gauss.kurtosis[:2].abs().max()) < 0.5
    summary = laplace.summary()
    assert summary["rejected_fraction"] == 1.0 and len(summary["skew_p10_median_p90"]) == 3


def test_closed_form_sigma_equals_the_residual_std_computed_directly():
    g = torch.Generator().manual_seed(3)
    acc = ErrorAccumulator(10, 3, normality_samples=10**6)
    e = torch.randn(5, 3, 4, 4, generator=g) + 0.3  # a non-zero mean: the intercept matters
    d = 0.2 * e + torch.randn(5, 3, 4, 4, generator=g) * torch.tensor([0.1, 0.5, 1.0]).reshape(1, 3, 1, 1)
    acc.add(torch.full((5,), 4), e, e + d)
    stats = acc.finalize()
    ed, dd = e.double().flatten(), d.double().flatten()
    slope = ((ed - ed.mean()) * (dd - dd.mean())).mean() / ed.var(unbiased=False)
    bias = d.double().transpose(0, 1).reshape(3, -1).mean(1)
    r = d.double() - slope * e.double() - bias.reshape(1, 3, 1, 1)
    assert float(stats.slope[4]) == pytest.approx(float(slope), rel=1e-5)
    torch.testing.assert_close(stats.bias[4].double(), bias, rtol=1e-5, atol=1e-7)
    assert float(stats.sigma[4]) == pytest.approx(float(r.std(unbiased=False)), rel=1e-5)


def test_guided_statistics_use_the_guidance_combined_prediction():
    s, k = 3.0, 0.2

    class _Guided(torch.nn.Module):
        def forward(self, sample, timestep):  # the error only in the conditional half
            c, u = sample.chunk(2)
            return torch.cat([(1 + k) * c, u])

    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(4):
        x = torch.randn(4, 1, 8, 8, generator=g)
        data.append({"sample": torch.cat([x, x]), "timestep": torch.full((8,), 250)})
    stats = measure(_FP(), _Guided(), data, guidance_scale=s)
    # ε̂_cfg = u + s((1 + k)c − u) = (1 + s·k)·x
    assert float(stats.k[250]) == pytest.approx(s * k, rel=1e-4)
    with pytest.raises(CalibrationError, match="odd batch"):
        measure(_FP(), _Guided(), [{"sample": torch.randn(3, 1, 4, 4), "timestep": torch.tensor(5)}],
                guidance_scale=s)


def test_fill_table_and_errors():
    v = torch.zeros(11, 2)
    visited = torch.zeros(11, dtype=torch.bool)
    v[2], v[8] = torch.tensor([2.0, -2.0]), torch.tensor([8.0, -8.0])
    visited[[2, 8]] = True
    out = fill_table(v, visited)
    torch.testing.assert_close(out[:, 0], torch.tensor([2.0, 2, 2, 3, 4, 5, 6, 7, 8, 8, 8]))
    torch.testing.assert_close(out[:, 1], -out[:, 0])
    with pytest.raises(CalibrationError):
        fill_table(v, torch.zeros(11, dtype=torch.bool))
    with pytest.raises(CalibrationError, match="yielded no"):
        measure(_FP(), _FP(), [])
