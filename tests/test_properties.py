"""Properties of the pipeline on random small DiT- and UNet-like denoisers (hypothesis)."""

from __future__ import annotations

import torch
from helpers import calib_set, denoiser_inputs, fake_rerun
from hypothesis import given
from hypothesis import strategies as st

import stepq
from stepq.calibration.probe import collect_layer_outputs
from stepq.compiler import meta, ops
from stepq.compiler.pass_manager import Skip, Step, run_passes
from stepq.compiler.pipeline import build_pipeline
from stepq.recipe.specs import LayerSpec, MinMaxObserver, PerChannel, QuantSpec, Recipe
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser

configs = st.builds(
    RandomDenoiserConfig,
    kind=st.sampled_from(["dit", "unet"]),
    width=st.sampled_from([16, 32]),
    depth=st.integers(1, 2),
    heads=st.sampled_from([1, 2]),
    attention=st.booleans(),
    temb_dim=st.sampled_from([16, 32]),
    seed=st.integers(0, 1000),
)
recipe_names = st.sampled_from(["w8a8", "w4a8", "w4a4", "w8a4"])


@given(cfg=configs)
def test_all_float_recipe_is_bit_identical(cfg):
    m = build_random_denoiser(cfg)
    data = calib_set(2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    qm = stepq.quantize(m, data[0], Recipe(name="float", default=None), calibration=data, progress=False)
    x = denoiser_inputs(3, (0, 400, 999), seed=cfg.seed)
    assert torch.equal(qm(**x), m(**x))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


@given(cfg=configs, recipe=recipe_names)
def test_quantized_activations_lie_on_their_grid(cfg, recipe):
    m = build_random_denoiser(cfg)
    data = calib_set(2)
    qm = stepq.quantize(m, data[0], recipe, calibration=data, progress=False)
    prog = qm.program
    fqs = [n for n in prog.gm.graph.nodes if n.target is ops.FAKE_QUANT]
    assert fqs and all(n.meta[meta.QUANTIZER_ROLE] == "activation" for n in fqs)
    x = denoiser_inputs(2, (17, 930), seed=cfg.seed + 1)
    outs = collect_layer_outputs(prog, x, {n.name for n in fqs}, bypass=False)
    for n in fqs:
        y = outs[n.name].double()
        s = float(qm.gm.get_buffer(n.args[1].target))
        z = float(qm.gm.get_buffer(n.args[2].target))
        level = y / s + z
        assert torch.allclose(level, level.round(), atol=1e-3), n.name
        assert float(level.min()) >= n.args[3] - 1e-3 and float(level.max()) <= n.args[4] + 1e-3


@given(cfg=configs, recipe=recipe_names)
def test_every_pass_is_idempotent_and_keeps_the_graph_valid(cfg, recipe):
    m = build_random_denoiser(cfg)
    data = calib_set(2)
    x = denoiser_inputs(2, (3, 700))
    prog = stepq.capture(m, data[0])
    prog.recipe = stepq.get_preset(recipe)
    for stage in build_pipeline(prog.recipe):
        p = stage.item
        if isinstance(p, Step) and p.name == "observe":  # calibration data through the observers
            for d in data:
                prog(**d)
            continue
        if isinstance(p, (Skip, Step)):
            continue
        run_passes(prog, [p])
        fake_rerun(prog, x)
        again = run_passes(prog, [p])[0].result
        assert not again.modified, f"{p.name} changed the graph on a second run"


@given(cfg=configs)
def test_weight_only_minmax_recipe_equals_hand_fake_quant(cfg):
    m = build_random_denoiser(cfg)
    w4 = QuantSpec(bits=4, granularity=PerChannel(0), observer=MinMaxObserver())
    recipe = Recipe(name="w4-weight-only", default=LayerSpec(weight=w4))
    qm = stepq.quantize(m, calib_set(1)[0], recipe, progress=False)  # weight-only: no calibration needed
    # reference: every Linear/Conv weight fake-quantized by hand, per output channel, absmax / 7
    ref = build_random_denoiser(cfg)
    with torch.no_grad():
        for mod in ref.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                w = mod.weight
                s = (w.reshape(w.shape[0], -1).abs().amax(dim=1) / 7).reshape(-1, *[1] * (w.dim() - 1))
                mod.weight.copy_(torch.clamp(torch.round(w / s), -8, 7) * s)
    x = denoiser_inputs(2, (10, 600))
    torch.testing.assert_close(qm(**x), ref(**x), rtol=1e-5, atol=1e-5)
    assert all(n.target is not ops.FAKE_QUANT for n in qm.gm.graph.nodes)
