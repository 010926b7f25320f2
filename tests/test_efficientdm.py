"""EfficientDM: QALoRA adapters as graph rewrites, TALSQ tables, data-free distillation, the exact fold."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler
from helpers import calib_set, denoiser_inputs
from hypothesis import given, settings
from hypothesis import strategies as st

import stepq
import stepq.backends.onnx as sx
from stepq.calibration import Sampling, collect
from stepq.compiler import meta, ops
from stepq.compiler.errors import RecipeError
from stepq.compiler.pass_manager import run_passes
from stepq.compiler.timesteps import interpolate_unvisited
from stepq.methods.efficientdm import LoRADelta, TemporalSteps, lora_learning_rates
from stepq.passes import FoldLoRA, InsertLoRA
from stepq.passes.insert_lora import adapter_nodes, lora_candidates
from stepq.recipe.presets import qalora_recipe
from stepq.testing import check_pass, program_at
from stepq.testing.onnx_cases import rel_l2
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


def _recipe(w=4, a=8, talsq=True, **cfg):
    return qalora_recipe(w, a, talsq=talsq, **{"steps": 4, "batch_size": 2, **cfg})


def _sampling(cfg: RandomDenoiserConfig, steps: int = 4) -> Sampling:
    return Sampling(DDIMScheduler(num_train_timesteps=1000), steps, (cfg.channels, cfg.size, cfg.size), eta=0.0)


def _calibrated(kind="dit", talsq=True, w=4, a=8, depth=1):
    cfg = RandomDenoiserConfig(kind=kind, depth=depth)
    m = build_random_denoiser(cfg)
    data = calib_set(3)
    prog = stepq.calibrate(stepq.prepare(stepq.capture(m, data[0]), _recipe(w, a, talsq)), data, progress=False)
    return m, cfg, prog


def _randomize_adapters(prog, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in adapter_nodes(prog.gm):
            mod = prog.gm.get_submodule(n.target)
            mod.B.copy_(torch.randn(mod.B.shape, generator=g) * scale)


def test_lora_delta_shapes_and_initial_identity():
    lin = LoRADelta((24, 16), rank=32, generator=torch.Generator().manual_seed(0))
    assert lin.rank == 16 and lin.A.shape == (16, 16) and lin.B.shape == (24, 16)  # rank capped at min(out, fan_in)
    assert torch.equal(lin(), torch.zeros(24, 16))  # B = 0: the adapter starts as no update
    conv = LoRADelta((8, 4, 3, 3), rank=4)
    assert conv.A.shape == (4, 4, 3, 3) and conv.B.shape == (8, 4)
    with torch.no_grad():
        conv.B.normal_()
    direct = torch.einsum("or,rikl->oikl", conv.B, conv.A)  # B ⊗ A: conv A then 1x1 conv B as one kernel
    assert torch.allclose(conv(), direct, atol=1e-6)
    # A is Kaiming-uniform(a=√5): bound = 1/√fan_in
    assert float(conv.A.detach().abs().max()) <= 1 / (4 * 9) ** 0.5 + 1e-6
    with pytest.raises(ValueError, match="Linear .* or Conv2d"):
        LoRADelta((3, 4, 5), rank=2)


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_insert_lora_keeps_outputs_bit_identical_and_skips_the_8bit_layers(kind):
    m, cfg, _ = _calibrated(kind)
    data = calib_set(3)
    before = program_at(stepq.capture(m, data[0]), _recipe(), data, before="insert_lora")
    report = check_pass(InsertLoRA(LoRADelta), before, data[:2])  # contract: tolerance 0, idempotent
    assert report.result.count > 0 and report.error == 0.0
    after = program_at(stepq.capture(m, data[0]), _recipe(), data, after="insert_lora")
    adapted = {n.meta[meta.LAYER] for n in adapter_nodes(after.gm)}
    weight_layers = [n for n in after.gm.graph.nodes if n.meta.get(meta.OP_KIND) in ("linear", "conv2d")
                     and meta.get_layer_spec(n) is not None and meta.get_layer_spec(n).weight is not None]
    excluded = [n for n in weight_layers if {"input", "output", "timestep_embedding"} & set(n.meta[meta.ROLES])]
    assert excluded and not {n.meta[meta.LAYER] for n in excluded} & adapted
    assert len(adapted) == len(weight_layers) - len(excluded) == report.result.count
    # every adapted layer's weight quantizer is 4-bit: the 8-bit ones got none (as in EfficientDM's code)
    assert {fq.args[4] for _, fq in lora_candidates(after)} == {7}


@pytest.mark.parametrize(("kind", "talsq", "w"), [("dit", True, 4), ("unet", True, 4), ("dit", False, 2)])
def test_fold_is_exact_from_fake_quant_to_integer_weights(kind, talsq, w):
    """The converted model (adapters folded, integer / packed weights, frozen tables) equals the
    trained fake-quant program with its adapters bit for bit in the reference backend."""
    _, _, prog = _calibrated(kind, talsq=talsq, w=w)
    run_passes(prog, [InsertLoRA(LoRADelta)])
    _randomize_adapters(prog)
    x = denoiser_inputs(3, (5, 400, 990), seed=1)
    with torch.no_grad():
        unfolded = prog(**x)
    qm = stepq.convert(prog)
    assert not adapter_nodes(qm.program.gm) and not hasattr(qm.program.gm, "qalora")
    assert not any("qalora" in k or "lora" in k for k in qm.program.gm.state_dict())
    assert not any(n.target is ops.FAKE_QUANT and n.meta.get(meta.QUANTIZER_ROLE) == "weight"
                   for n in qm.program.gm.graph.nodes)
    with torch.no_grad():
        folded = qm(**x)
    assert torch.equal(folded, unfolded)


def test_fold_uses_the_trained_weight_steps_not_a_new_ptq():
    _, _, prog = _calibrated("dit")
    run_passes(prog, [InsertLoRA(LoRADelta)])
    _randomize_adapters(prog, scale=0.2)
    fq = lora_candidates(prog)[0][1]
    s_target = fq.args[1].target
    with torch.no_grad():
        prog.gm.get_buffer(s_target).mul_(1.25)  # a "trained" step, away from what any observer would give
    trained = prog.gm.get_buffer(s_target).clone()
    check_pass(FoldLoRA(), prog, [denoiser_inputs(2, (10, 700))])  # contract: bit-identical, idempotent
    qm = stepq.convert(prog)
    assert torch.equal(qm.program.gm.get_buffer(s_target), trained)


def test_talsq_tables_interpolate_unvisited_timesteps_and_round_zero_points():
    src = TemporalSteps(["a", "b"], torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0]), num_train_timesteps=10)
    src.train()
    src(torch.tensor([2, 6]))  # visits 2 and 6
    with torch.no_grad():
        src.delta[:, 2], src.delta[:, 6] = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
        src.zero_point_source.z[:, 2], src.zero_point_source.z[:, 6] = torch.tensor([0.0, 4.0]), torch.tensor([8.0, 6.0])
    s, z = src.tables(), src.zero_point_tables()
    assert torch.allclose(s[0], torch.tensor([1, 1, 1, 1.5, 2, 2.5, 3, 3, 3, 3.0]))
    assert torch.equal(z[0], torch.tensor([0, 0, 0, 2, 4, 6, 8, 8, 8, 8.0]))  # interpolated, on the integer grid
    assert torch.equal(z[1], torch.round(z[1]))
    src.clamp_(torch.tensor([0.0, 0.0]), torch.tensor([7.0, 15.0]))
    assert float(src.zero_point_source.z[0].detach().max()) == 7.0


@given(visited=st.sets(st.integers(0, 49), min_size=1, max_size=50), seed=st.integers(0, 100))
@settings(max_examples=40, deadline=None)
def test_interpolation_keeps_visited_values_and_stays_within_their_range(visited, seed):
    v = torch.rand(3, 50, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(50, dtype=torch.bool)
    mask[list(visited)] = True
    out = interpolate_unvisited(v, mask)
    assert torch.equal(out[:, mask], v[:, mask])
    lo, hi = v[:, mask].min(1, keepdim=True).values, v[:, mask].max(1, keepdim=True).values
    assert bool(((out >= lo - 1e-6) & (out <= hi + 1e-6)).all())


def test_distillation_trains_adapters_tables_and_steps_and_leaves_the_teacher_alone():
    m, cfg, prog = _calibrated("dit")
    teacher_state = copy.deepcopy(m.state_dict())
    run_passes(prog, [InsertLoRA(LoRADelta)])
    first = lora_candidates(prog)[0][1]
    step_before = prog.gm.get_buffer(first.args[1].target).clone()
    stepq.train(prog, fp_model=m, sampling=_sampling(cfg, steps=3), progress=False)
    curve = prog.state.distill_curve
    assert len(curve) == 4 and all(c > 0 for c in curve)  # the step budget, across trajectories of 3 steps
    assert any(float(prog.gm.get_submodule(n.target).B.abs().sum()) > 0 for n in adapter_nodes(prog.gm))
    src = prog.gm.get_submodule("activation_scale_source")
    assert isinstance(src, TemporalSteps) and int(src.visited.sum()) == 3  # the DDIM-3 timesteps
    assert not torch.equal(prog.gm.get_parameter(first.args[1].target), step_before)
    for k, v in m.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k
    assert not any(p.requires_grad for p in prog.gm.parameters())


def test_distillation_is_seeded():
    curves = []
    for _ in range(2):
        m, cfg, prog = _calibrated("unet", talsq=False)
        run_passes(prog, [InsertLoRA(LoRADelta)])
        stepq.train(prog, fp_model=m, sampling=_sampling(cfg, steps=2), progress=False)
        curves.append(prog.state.distill_curve)
    assert curves[0] == curves[1]


def test_scale_aware_learning_rates_follow_the_weight_steps():
    _, _, prog = _calibrated("dit", depth=2)
    run_passes(prog, [InsertLoRA(LoRADelta)])
    aware = lora_learning_rates(prog, prog.recipe.qalora)
    flat = lora_learning_rates(prog, prog.recipe.qalora.replace(scale_aware=False))
    assert len(set(flat.values())) == 1 and len(set(aware.values())) > 1
    assert sum(aware.values()) / len(aware) == pytest.approx(next(iter(flat.values())))
    fq = {k: v for k, v in zip(aware, [lora_candidates(prog)[i][1] for i in range(len(aware))], strict=True)}
    for name, lr in aware.items():
        mean_step = float(prog.gm.get_buffer(fq[name].args[1].target).mean())
        assert lr == pytest.approx(prog.recipe.qalora.lora_lr * mean_step)


def test_quantize_runs_the_whole_method_with_collected_calibration():
    cfg = RandomDenoiserConfig(kind="dit", depth=1, num_classes=3)
    m = build_random_denoiser(cfg)

    def conditions(n, g):
        return {"class_labels": torch.randint(0, 3, (n,), generator=g)}

    cal = collect(m, DDIMScheduler(num_train_timesteps=1000), num_samples=2, num_inference_steps=3,
                  sample_shape=(4, 8, 8), conditions=conditions, progress=False)
    assert cal.sampling is not None and cal.sampling.num_inference_steps == 3
    qm = stepq.quantize(m, cal[0], _recipe(4, 4), calibration=cal, progress=False)
    assert len(qm.program.state.distill_curve) == 4
    assert qm.program.state.timestep_tables  # TALSQ tables, gathered by t
    x = cfg.example_inputs(batch=2)
    assert rel_l2(qm(**x), m(**x)) < 0.5


def test_quantize_without_trajectories_is_a_clear_error():
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit", depth=1))
    with pytest.raises(RecipeError, match="own trajectories.*stepq.Sampling"):
        stepq.quantize(m, calib_set(1)[0], "w4a4-qalora", calibration=calib_set(2), progress=False)
    data = calib_set(2)
    prog = stepq.calibrate(stepq.prepare(stepq.capture(m, data[0]), _recipe()), data, progress=False)
    with pytest.raises(RecipeError, match="fp_model="):
        stepq.train(prog)


def test_qalora_config_is_validated_and_round_trips():
    r = stepq.get_preset("w2a8-qalora")
    assert stepq.Recipe.from_dict(r.to_dict()) == r
    assert r.default.weight.bits == 2 and not r.default.weight.symmetric  # asymmetric per channel
    assert stepq.get_preset("w4a4-qalora-no-talsq").qalora.talsq is False
    with pytest.raises(RecipeError, match="rank"):
        stepq.QALoRAConfig(rank=0)
    with pytest.raises(RecipeError, match="exclude_roles"):
        stepq.QALoRAConfig(exclude_roles=("inputs",))
    with pytest.raises(RecipeError, match="pick one"):
        r.replace(qat=stepq.recipe.QATConfig())


def test_onnx_export_of_a_qalora_model_has_integer_kernels_and_no_lora(tmp_path):
    m, cfg, prog = _calibrated("dit", talsq=True)
    stepq.train(prog, fp_model=m, sampling=_sampling(cfg, steps=2), progress=False)
    qm = stepq.convert(prog)
    path = tmp_path / "qalora.onnx"
    qm.export_onnx(path)
    counts = sx.count_kernels(path)
    assert counts.integer["MatMulIntegerToFloat"] == len(qm.quantized_layers())
    assert not counts.quantized_in_float
    import onnx

    model = onnx.load(str(path))
    assert not any("lora" in i.name.lower() for i in model.graph.initializer)
    x = denoiser_inputs(2, (400, 400), seed=3)  # ONNX: a batch shares its first timestep's tables (docs/ONNX.md)
    assert rel_l2(sx.load(path, threads=1)(**x), qm(**x)) < 1e-2


# --- a user's LoRA (PEFT / diffusers) folded before quantization ------------------------------------------------


def _with_lora(family: str):
    from peft import LoraConfig, inject_adapter_in_model

    from stepq.testing.families import FAMILIES

    fam = FAMILIES[family]
    base = fam.model(seed=0)
    model = copy.deepcopy(base)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out", "ff.net.2"]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)  # random B: a real update
    if hasattr(model, "add_adapter"):  # diffusers' own LoRA entry point (load_lora_weights goes through it)
        model.add_adapter(cfg)
    else:
        model = inject_adapter_in_model(cfg, model)
    model.eval()
    return fam, base, model


@pytest.mark.parametrize("family", ["unet_cond", "dit"])
def test_user_lora_is_folded_into_the_base_weights(family):
    from stepq.passes import FoldUserLoRA

    fam, base, model = _with_lora(family)
    n_lora = sum(1 for name, _ in model.named_modules() if name.endswith("lora_A.default"))
    assert n_lora > 0
    x = fam.example_inputs(batch=2, seed=1)
    prog = stepq.capture(model, x)
    before = program_at(prog, "w8a8", [x], before="fold_user_lora")
    report = check_pass(FoldUserLoRA(), before, [x, fam.example_inputs(batch=2, t=50.0, seed=2)])
    assert report.result.count == n_lora
    folded = report.program
    assert not any("lora" in k for k in folded.gm.state_dict())
    with torch.no_grad():
        ref = model(**x)[0]  # the FP model with the LoRA applied, through PEFT
        out = folded(**x)[0]
    assert rel_l2(out, ref) < 1e-5
    # the quantized model + LoRA has exactly the base model's quantized layers: the LoRA costs nothing
    qm = stepq.quantize(model, x, "w8a8", calibration=[x], progress=False)
    qb = stepq.quantize(base, x, "w8a8", calibration=[x], progress=False)
    assert len(qm.quantized_layers()) == len(qb.quantized_layers())
    assert qm.weight_bytes() == qb.weight_bytes()
    # the base model itself was never touched
    assert any("lora" in k for k in model.state_dict())


def test_a_model_without_lora_is_left_alone():
    from stepq.passes import FoldUserLoRA

    m = build_random_denoiser(RandomDenoiserConfig(kind="unet", depth=1))
    data = calib_set(1)
    before = program_at(stepq.capture(m, data[0]), "w8a8", data, before="fold_user_lora")
    assert check_pass(FoldUserLoRA(), before, data).result.count == 0


def test_a_qalora_artefact_saves_and_loads_bit_exact(tmp_path):
    m, cfg, prog = _calibrated("unet", talsq=True)
    run_passes(prog, [InsertLoRA(LoRADelta)])
    _randomize_adapters(prog, seed=3)
    qm = stepq.convert(prog)
    qm.save(tmp_path / "m")
    loaded = stepq.load(tmp_path / "m")
    x = denoiser_inputs(2, (30, 700), seed=4)
    assert torch.equal(loaded(**x), qm(**x))
    assert loaded.recipe.qalora == qm.recipe.qalora


def _shuffled_run(guidance: float):
    cfg = RandomDenoiserConfig(kind="dit", depth=1, num_classes=3)
    m = build_random_denoiser(cfg)

    def conditions(n, g):
        return {"class_labels": torch.randint(0, 3, (n,), generator=g)}

    def uncond(c):
        return {"class_labels": torch.zeros_like(c["class_labels"])}  # class 0 plays the unconditional one

    cal = collect(m, DDIMScheduler(num_train_timesteps=1000), num_samples=2, num_inference_steps=3,
                  sample_shape=(4, 8, 8), conditions=conditions, progress=False)
    teacher = copy.deepcopy(m.state_dict())
    prog = stepq.calibrate(stepq.prepare(stepq.capture(m, cal[0]), _recipe(
        4, 4, order="shuffled", buffer_trajectories=2, steps=5)), cal, progress=False)
    sampling = Sampling(DDIMScheduler(num_train_timesteps=1000), 3, (4, 8, 8), conditions=conditions,
                        uncond=uncond if guidance != 1.0 else None, guidance_scale=guidance, eta=0.0)
    stepq.train(prog, fp_model=m, sampling=sampling, progress=False)
    for k, v in m.state_dict().items():
        assert torch.equal(v, teacher[k]), k
    return prog


@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_shuffled_distillation_trains_on_minibatches_across_timesteps(guidance):
    prog = _shuffled_run(guidance)
    curve = prog.state.distill_curve
    # 2 trajectories of 2 samples × 3 steps = 12 pairs → 6 minibatches of 2 per fill; the budget stops at 5
    assert len(curve) == 5 and all(c > 0 for c in curve)
    src = prog.gm.get_submodule("activation_scale_source")
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(3)
    visited = set(torch.nonzero(src.visited).flatten().tolist())
    assert visited and visited <= set(sched.timesteps.tolist())  # only the sampler's timesteps, per sample
    assert any(float(prog.gm.get_submodule(n.target).B.abs().sum()) > 0 for n in adapter_nodes(prog.gm))
    assert _shuffled_run(guidance).state.distill_curve == curve  # seeded


def test_qalora_order_is_validated():
    with pytest.raises(RecipeError, match="order must be 'trajectory' or 'shuffled'"):
        _recipe(order="random")
