"""TDQ: scale sources in the graph, their fit, freezing into tables, and LSQ QAT."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import calib_set, count, denoiser_inputs, fake_rerun
from torch import nn

import stepq
from stepq.compiler import meta, ops
from stepq.compiler.api import resolve_recipe
from stepq.compiler.pass_manager import run_passes
from stepq.methods.qat import denoising_batches, make_trainable, scale_step_gradients, train_qat
from stepq.methods.tdq.fit import _LayerwiseLoss, merge_batches
from stepq.methods.tdq.sources import (
    ScaleGenerators,
    ScaleTable,
    fourier_features,
    inverse_softplus,
    make_scale_source,
)
from stepq.passes import FreezeScaleSource, InsertScaleSource
from stepq.passes.insert_scale_source import SCALE_SOURCE
from stepq.recipe.specs import TDQConfig
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


class _TimeScaled(nn.Module):
    """Activations whose range grows 20x with the timestep: a static scale wastes levels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin1 = nn.Linear(16, 32)
        self.lin2 = nn.Linear(32, 32)
        self.lin3 = nn.Linear(32, 16)

    def forward(self, sample, timestep):
        gain = (1.0 + timestep.float() / 50.0)[:, None]
        h = torch.relu(self.lin1(sample)) * gain
        h = torch.relu(self.lin2(h))
        return self.lin3(h)


def _ts_data(n=12, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"sample": torch.randn(batch, 16, generator=g),
             "timestep": torch.full((batch,), int(999 * i / (n - 1)), dtype=torch.int64)} for i in range(n)]


def _recipe(method, steps=150, bits=4):
    base = stepq.get_preset(f"w8a{bits}")
    lr = 5e-3 if method == "mlp" else 2e-2  # a free table entry sees only its own timestep's samples
    return base.replace(name=f"t-{method}", tdq=TDQConfig(method=method, fit_steps=steps, fit_lr=lr, fit_batch=4,
                                                          fit_objective="layer"))


def test_generators_start_at_the_static_scale_and_freeze_to_their_outputs():
    static = torch.tensor([0.02, 0.5, 3.0])
    gen = ScaleGenerators(["a", "b", "c"], static, fourier_dim=16, hidden=8, num_train_timesteps=50)
    s = gen(torch.tensor([0, 7, 49]))
    assert s.shape == (3, 3)
    torch.testing.assert_close(s, static[:, None].expand(3, 3), rtol=1e-5, atol=0)
    with torch.no_grad():
        gen.w4.normal_()  # a trained generator
    table = gen.tables()
    assert table.shape == (3, 50)
    torch.testing.assert_close(table[:, [3, 17]], gen(torch.tensor([3, 17])))
    assert bool((table > 0).all())
    torch.testing.assert_close(torch.nn.functional.softplus(inverse_softplus(static)), static)
    enc = fourier_features(torch.tensor([0.0, 5.0]), 8, 10000.0)
    assert enc.shape == (2, 8) and torch.equal(enc[0, :4], torch.ones(4))


def test_free_table_interpolates_unvisited_timesteps():
    tab = ScaleTable(["a"], torch.tensor([1.0]), num_train_timesteps=11)
    tab.train()
    tab(torch.tensor([2, 8]))
    with torch.no_grad():
        tab.theta[0, 2] = inverse_softplus(torch.tensor(2.0))
        tab.theta[0, 8] = inverse_softplus(torch.tensor(8.0))
    t = tab.tables()[0]
    torch.testing.assert_close(t[[0, 2, 5, 8, 10]], torch.tensor([2.0, 2.0, 5.0, 8.0, 8.0]))


@pytest.mark.parametrize("method", ["mlp", "table"])
def test_insert_and_freeze_scale_source(method):
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit", depth=1))
    data = calib_set(2)
    recipe = _recipe(method, steps=0)
    prog = stepq.calibrate(stepq.prepare(stepq.capture(m, data[0]), recipe), data, progress=False)
    n_act = sum(1 for n in prog.gm.graph.nodes if n.meta.get(meta.QUANTIZER_ROLE) == "activation")
    assert prog.history[-2:] == ["materialize_quantizers", "insert_scale_source"]
    assert sum(1 for n in prog.gm.graph.nodes if n.op == "call_module" and n.target == SCALE_SOURCE) == 1
    assert count(prog.gm, ops.TIMESTEP_INDEX) == 1
    fake_rerun(prog, denoiser_inputs(2, (1, 2)))
    again = run_passes(prog, [InsertScaleSource(make_scale_source)])[0].result
    assert again.count == 0
    x = denoiser_inputs(3, (20, 500, 980), seed=2)
    before = prog(**x)
    qm = stepq.convert(prog)
    assert qm.program.history[-3:] == ["freeze_scale_source", "attach_timestep_tables", "quantize_weights"]
    assert not any(n.op == "call_module" for n in qm.gm.graph.nodes)
    assert count(qm.gm, torch.ops.aten.index.Tensor) == 2 * n_act
    tables = qm.program.state.timestep_tables
    assert len(tables) == n_act and all(t.scale.numel() == 1000 for t in tables.values())
    # unfitted: every table row is the static scale, so the deployed model computes what the program did
    torch.testing.assert_close(qm(**x), before, rtol=1e-4, atol=1e-4)
    again = run_passes(qm.program, [FreezeScaleSource()])[0].result
    assert again.count == 0


def test_tdq_fit_beats_static_scales_when_activations_scale_with_t():
    m = _TimeScaled().eval()
    data = _ts_data()
    val = _ts_data(n=6, seed=1)
    static = stepq.quantize(m, data[0], "w8a4", calibration=data, progress=False)

    def layer_loss(qm_or_prog):
        prog = qm_or_prog.program if hasattr(qm_or_prog, "program") else qm_or_prog
        interp = _LayerwiseLoss(prog.gm)
        interp.run(*prog.flat_inputs((), merge_batches(val, "sample")))
        return float(torch.stack(interp.losses).mean())

    # evaluated on the deployed models, at timesteps the fit never saw (the free table interpolates)
    losses = {"static": layer_loss(static)}
    for method in ("mlp", "table"):
        prog = stepq.calibrate(stepq.prepare(stepq.capture(m, data[0]), _recipe(method)), data, progress=False)
        curve = prog.state.fit_curve
        assert len(curve) == 150 and curve[-1] < curve[0]
        qm = stepq.convert(prog)
        losses[method] = layer_loss(qm)
        # the frozen table is the fitted source at round(t) (for the free table: where it was fitted)
        x = data[4]
        torch.testing.assert_close(qm(**x), prog(**x), rtol=1e-3, atol=1e-3)
    assert losses["mlp"] < 0.7 * losses["static"], losses
    assert losses["table"] < 0.85 * losses["static"], losses


def test_lsq_gradient_scaling_and_qat_loop():
    m = build_random_denoiser(RandomDenoiserConfig(kind="unet", depth=1))
    data = calib_set(2)
    for name in ("w4a4-qat", "w4a4-tdq-qat"):
        recipe = stepq.get_preset(name)
        prog = stepq.calibrate(stepq.prepare(stepq.capture(m, data[0]), recipe), data, progress=False)
        assert (SCALE_SOURCE in dict(prog.gm.named_children())) == (recipe.tdq is not None)
        # the TDQ fit is skipped for QAT recipes: training does it
        assert not prog.state.has('fit_curve')
        from diffusers import DDPMScheduler

        sched = DDPMScheduler()
        x0 = torch.randn(32, 4, 8, 8)

        def make(x, t, c):
            return {"sample": x, "timestep": t}

        batches = denoising_batches(x0, sched, make, batch_size=8, seed=0)
        w_before = prog.gm.get_parameter("down.0.conv1.weight").detach().clone()
        curve = train_qat(prog, batches, steps=6, lr=1e-3, scale_lr=1e-3, batch_size=8, progress=False)
        assert len(curve) == 6 and all(math.isfinite(v) for v in curve)
        assert not torch.equal(prog.gm.get_parameter("down.0.conv1.weight"), w_before)
        qm = stepq.convert(prog)
        out = qm(**denoiser_inputs(2, (3, 600)))
        assert torch.isfinite(out).all()


def test_lsq_scales_step_size_gradients():
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit", depth=1))
    data = calib_set(2)
    prog = stepq.calibrate(stepq.prepare(stepq.capture(m, data[0]), "w4a4"), data, progress=False)
    floats, scales, source, grad_scales = make_trainable(prog, batch_size=4)
    assert not source and scales and floats and len(grad_scales) == len(scales)
    p = prog.gm.get_parameter("blocks.0.fc1.weight_scale")  # per channel: 32 inputs per output channel
    p.grad = None
    (p * torch.ones_like(p)).sum().backward()
    assert torch.equal(p.grad, torch.ones_like(p))  # no hook on the parameter: the loop scales after the backward
    scale_step_gradients(scales, grad_scales)
    torch.testing.assert_close(p.grad, torch.full_like(p, 1.0 / math.sqrt(32 * 7)))
    # a second make_trainable (training the program again) leaves no hook either: the loop scales once
    again = make_trainable(prog, batch_size=4)
    assert again.grad_scales == grad_scales and all(a is b for a, b in zip(again.scales, scales))
    p.grad = None
    (p * torch.ones_like(p)).sum().backward()
    assert torch.equal(p.grad, torch.ones_like(p))


class _SharedCall(nn.Module):
    """One Linear called on two different tensors (as DiT calls its timestep embedder twice)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(16, 16)
        self.head = nn.Linear(16, 16)

    def forward(self, sample, timestep):
        a = self.shared(sample)
        b = self.shared(torch.relu(a) * (1.0 + timestep.float() / 100.0)[:, None])
        return self.head(a + b)


def test_a_module_called_twice_gets_one_quantizer_per_call_and_converts_with_tdq():
    data = _ts_data(4, batch=4)
    prog = stepq.prepare(stepq.capture(_SharedCall(), data[0]), _recipe("mlp", steps=0))
    names = [n.meta[meta.ACT_QUANTIZER] for n in prog.gm.graph.nodes
             if n.meta.get(meta.QUANTIZER_ROLE) == "activation"]
    assert sorted(names) == ["head.input", "shared.input", "shared.input_call2"]
    stepq.calibrate(prog, data, progress=False)
    x = _ts_data(2, batch=3, seed=5)[1]
    before = prog(**x)
    qm = stepq.convert(prog)
    tables = qm.program.state.timestep_tables
    assert sorted(tables) == sorted(names)
    # the two calls see different ranges, so they got different static steps (and tables)
    assert not torch.equal(tables["shared.input"].scale, tables["shared.input_call2"].scale)
    torch.testing.assert_close(qm(**x), before, rtol=1e-4, atol=1e-4)


def test_output_objective_fit_lowers_the_end_to_end_error():
    m = _TimeScaled().eval()
    data = _ts_data()
    val = merge_batches(_ts_data(n=6, seed=1), "sample")
    with torch.no_grad():
        ref = m(**val)

    def output_error(qm):
        with torch.no_grad():
            return float(((qm(**val) - ref) ** 2).mean() / ref.pow(2).mean())

    static = stepq.quantize(m, data[0], "w8a4", calibration=data, progress=False)
    recipe = _recipe("mlp").replace(tdq=TDQConfig(fit_steps=300, fit_batch=4, fit_objective="output"))
    prog = stepq.calibrate(stepq.prepare(stepq.capture(m, data[0]), recipe), data, progress=False)
    curve = prog.state.fit_curve
    assert len(curve) == 300 and sum(curve[-10:]) < sum(curve[:10])
    # at timesteps the fit never saw, against the FP model (not the program's own float path)
    assert output_error(stepq.convert(prog)) < 0.8 * output_error(static)


def test_unknown_fit_objective_is_a_recipe_error():
    with pytest.raises(stepq.RecipeError, match="fit_objective"):
        TDQConfig(fit_objective="block")


def test_output_objective_fit_takes_nested_inputs():
    """PixArt's ``added_cond_kwargs`` dict: the program's call has more leaves than ``forward`` has
    parameters, so the quantized side of the output objective must be called with the call's structure."""
    from stepq.testing.onnx_cases import get_case

    case = get_case("pixart")
    calib = [case.inputs(2, t, i) for i, t in enumerate((900, 500, 100))]
    recipe = resolve_recipe("w8a8-tdq").replace(
        tdq=TDQConfig(fit_steps=4, fit_batch=2, fit_objective="output"))
    prog = stepq.prepare(stepq.capture(case.model, calib[0]), recipe)
    assert len(prog.flat_inputs((), calib[0])) > len(prog.signature.captured)
    stepq.calibrate(prog, calib, progress=False)
    assert len(prog.state.fit_curve) == 4
    x = case.inputs(2, 300, 7)
    assert torch.isfinite(stepq.convert(prog)(**x)[0]).all()
