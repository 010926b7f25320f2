"""materialize_quantizers: observers become fake-quant ops with the scale their data asks for."""

from __future__ import annotations

import pytest
import torch
from helpers import calib_set, denoiser_inputs, n_fake_quant, n_observers

import stepq
from stepq.compiler import meta
from stepq.compiler.graph_utils import fetch_attr
from stepq.compiler.pass_manager import run_passes
from stepq.passes import MaterializeQuantizers
from stepq.recipe.specs import LayerSpec, MinMaxObserver, QuantSpec, Recipe
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


def test_minmax_scales_match_the_ranges_seen_by_the_fp_model():
    m = build_random_denoiser(RandomDenoiserConfig(kind="unet"))
    a8 = QuantSpec(bits=8, signed=False, symmetric=False, observer=MinMaxObserver())
    recipe = Recipe(name="a8", default=LayerSpec(activation=a8))
    data = calib_set(3)
    # the ranges, measured independently with forward pre-hooks on the FP model
    seen: dict[str, list[float]] = {}

    def hook(name):
        def fn(mod, args):
            lo, hi = seen.setdefault(name, [float("inf"), float("-inf")])
            seen[name] = [min(lo, float(args[0].min())), max(hi, float(args[0].max()))]
        return fn

    handles = [mod.register_forward_pre_hook(hook(n)) for n, mod in m.named_modules()
               if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))]
    for d in data:
        m(**d)
    for h in handles:
        h.remove()

    prog = stepq.prepare(stepq.capture(m, data[0]), recipe)
    n_obs = n_observers(prog.gm)
    stepq.calibrate(prog, data, progress=False)
    assert n_observers(prog.gm) == 0 and n_fake_quant(prog.gm, "activation") == n_obs
    assert prog.history[-1] == "materialize_quantizers"
    checked = 0
    for n in prog.gm.graph.nodes:
        if n.meta.get(meta.QUANTIZER_ROLE) == "activation":
            layer = n.meta[meta.ACT_QUANTIZER].removesuffix(".input")
            if layer not in seen:
                continue
            lo, hi = min(seen[layer][0], 0.0), max(seen[layer][1], 0.0)
            scale = fetch_attr(prog.gm, n.args[1].target)
            zp = fetch_attr(prog.gm, n.args[2].target)
            assert float(scale) == pytest.approx((hi - lo) / 255, rel=1e-5)
            assert float(zp) == round(-lo / ((hi - lo) / 255))
            checked += 1
    assert checked >= 10
    # statistics are kept, per timestep too
    stats = prog.state.activation_stats
    assert len(stats) == n_obs
    st = stats["conv_in.input"]
    assert st.visited.numel() == 12
    # a second run finds nothing to do
    again = run_passes(prog, [MaterializeQuantizers()])[0].result
    assert again.count == 0


def test_per_timestep_statistics_are_exact():
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit"))
    a8 = QuantSpec(bits=8, signed=False, symmetric=False)
    prog = stepq.prepare(stepq.capture(m, denoiser_inputs(2, (1, 2))), Recipe(name="a", default=LayerSpec(activation=a8)))
    x = denoiser_inputs(4, (10, 10, 500, 999), seed=3)
    stepq.calibrate(prog, [x], progress=False)
    st = prog.state.activation_stats["patch.input"]
    assert st.visited.tolist() == [10, 500, 999]
    s = x["sample"]
    assert float(st.min[10]) == float(s[:2].min()) and float(st.max[10]) == float(s[:2].max())
    assert float(st.max[999]) == float(s[3].max())
    assert float(st.count[10]) == s[:2].numel()
    mean, std = st.mean_std()
    assert float(mean[500]) == pytest.approx(float(s[2].mean()), abs=1e-6)
    assert float(std[500]) == pytest.approx(float(s[2].std(unbiased=False)), rel=1e-4)
