"""The calibration step's fast paths compute what the straightforward code computed, bit for bit:
the folded weight quantizers, the tail quantiles (torch.quantile's arithmetic from a partial topk)
and the observers' finite check read from the row extremes."""

from __future__ import annotations

import pytest
import torch
from helpers import calib_set, n_fake_quant
from hypothesis import given, settings
from hypothesis import strategies as st

import stepq
from stepq.calibration.observe import fold_weight_quantizers
from stepq.calibration.observers import ActivationObserver
from stepq.calibration.qparams import _tail_quantiles
from stepq.compiler import ops
from stepq.recipe.specs import QuantSpec
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_folded_weight_quantizers_give_the_same_outputs_and_leave_the_program_alone(kind):
    model = build_random_denoiser(RandomDenoiserConfig(kind=kind))
    data = calib_set(2)
    prog = stepq.prepare(stepq.capture(model, data[0]), "w4a8")
    before = {k: v.clone() for k, v in prog.gm.state_dict().items()}
    n_weights = n_fake_quant(prog.gm, "weight")
    folded, count = fold_weight_quantizers(prog.gm)
    assert count == n_weights > 0
    assert sum(n.target is ops.FAKE_QUANT for n in folded.graph.nodes) == n_fake_quant(prog.gm) - n_weights
    assert n_fake_quant(prog.gm, "weight") == n_weights  # the program's graph is not rewritten
    with torch.no_grad():
        want = prog.gm(**prog.bind((), data[1]))
        got = folded(**prog.bind((), data[1]))
    assert torch.equal(got[0] if isinstance(got, tuple) else got, want[0] if isinstance(want, tuple) else want)
    after = prog.gm.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_the_fold_stops_at_its_budget():
    model = build_random_denoiser(RandomDenoiserConfig(kind="unet"))
    data = calib_set(2)
    prog = stepq.prepare(stepq.capture(model, data[0]), "w8a8")
    _, all_of_them = fold_weight_quantizers(prog.gm)
    _, none = fold_weight_quantizers(prog.gm, budget=0)
    assert none == 0 < all_of_them


def test_calibration_records_into_the_programs_own_observers():
    model = build_random_denoiser(RandomDenoiserConfig(kind="unet"))
    data = calib_set(3)
    prog = stepq.prepare(stepq.capture(model, data[0]), "w8a8")
    stepq.calibrate(prog, data, progress=False)
    stats = prog.state.activation_stats
    assert stats and all(s.total > 0 for s in stats.values())


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 3), n=st.integers(1, 20_000), p=st.sampled_from([100.0, 99.999, 99.99, 99.9, 99.0, 90.0, 50.0]),
       ties=st.booleans(), seed=st.integers(0, 2**16))
def test_tail_quantiles_are_torch_quantile_bit_for_bit(rows, n, p, ties, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * 3
    if ties:
        x = x.round()
    q = torch.tensor([1.0 - p / 100.0, p / 100.0])
    assert torch.equal(_tail_quantiles(x, q), torch.quantile(x, q, dim=1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_observer_finite_check_catches_every_non_finite_value(bad):
    obs = ActivationObserver("layer", QuantSpec(bits=8))
    x = torch.randn(3, 5)
    x[2, 4] = bad
    with pytest.raises(stepq.CalibrationError, match="layer 'layer' at timestep 7"):
        obs(x, torch.tensor([5, 6, 7]))
    assert obs.stats.total == 0  # nothing recorded from the failing call
