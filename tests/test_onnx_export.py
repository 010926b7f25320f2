"""ONNX export: checker validity, the QuantizedModel untouched, no fake-quant arithmetic, round trip
against the reference backend, the lowering itself exact in PyTorch, strict partitioning."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from helpers import calib_set, denoiser_inputs

import stepq
import stepq.backends.onnx as sx
from stepq.backends import UnsupportedNodesError
from stepq.backends.onnx.lower import lower
from stepq.backends.onnx.partition import OnnxPartitioner
from stepq.compiler.errors import FallbackWarning
from stepq.recipe.presets import activation_spec
from stepq.testing.onnx_cases import rel_l2
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


def _qm(kind: str = "dit", recipe="w8a8", depth: int = 1):
    m = build_random_denoiser(RandomDenoiserConfig(kind=kind, depth=depth))
    data = calib_set(3)
    return stepq.quantize(m, data[0], recipe, calibration=data, progress=False)


@pytest.fixture(scope="module", params=["dit", "unet"])
def exported(request, tmp_path_factory):
    qm = _qm(request.param)
    before = {k: v.clone() for k, v in qm.gm.state_dict().items()}
    code = qm.gm.code
    path = tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx"
    result = qm.export_onnx(path)
    return qm, path, result, before, code


def test_checker_and_opset(exported):
    _, path, result, _, _ = exported
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path))
    assert {o.domain or "": o.version for o in model.opset_import}[""] == 21
    assert result.file_bytes == path.stat().st_size and not result.external_data


def test_quantized_model_is_not_modified(exported):
    qm, _, _, before, code = exported
    after = qm.gm.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert qm.gm.code == code


def test_no_fake_quant_arithmetic_reaches_onnx(exported):
    qm, path, result, _, _ = exported
    ops = [(n.domain, n.op_type) for n in onnx.load(str(path)).graph.node]
    n_layers = result.lowered.get("linear_integer", 0) + result.lowered.get("conv2d_integer", 0)
    assert n_layers == len(qm.quantized_layers()) > 0
    assert ops.count(("com.microsoft", "MatMulIntegerToFloat")) == n_layers
    assert ("", "QuantizeLinear") in ops
    assert not {"Round", "Floor"} & {t for _, t in ops}  # no Mul/Round/Clip fake quantization
    assert not any(d.startswith("ai.stepq") for d, _ in ops)  # every placeholder was post-processed


@pytest.mark.parametrize("batch", [1, 3])
def test_round_trip_matches_reference(exported, batch):
    qm, path, _, _, _ = exported
    om = sx.load(path, threads=1)
    for t in (5, 500, 990):
        x = denoiser_inputs(batch, [t] * batch, seed=t)
        out, ref = om(**x), qm(**x)
        assert type(out) is type(ref) and out.shape == ref.shape  # the model's output structure
        assert rel_l2(out, ref) <= 1e-2


def test_positional_call_and_scalar_timestep(exported):
    qm, path, _, _, _ = exported
    om = sx.load(path, threads=1)
    x = denoiser_inputs(2, [300, 300])
    torch.testing.assert_close(om(x["sample"], 300), om(**x))
    with pytest.raises(stepq.InputSignatureError):
        om(x["sample"], x["timestep"], extra=1)


def test_lowered_graph_equals_reference_in_pytorch():
    """The placement rewrites alone (no ONNX) are exact: integer kernels reproduce fake-quant math."""
    qm = _qm("unet")
    gm = copy.deepcopy(qm.gm)
    result = lower(gm, OnnxPartitioner().partition(gm))
    assert result.counts["conv2d_integer"] > 0 and result.counts["linear_integer"] > 0
    x = denoiser_inputs(2, (100, 100))
    torch.testing.assert_close(gm(**qm.program.bind((), x)), qm(**x), rtol=1e-5, atol=1e-5)


def _grouped_weight_recipe() -> stepq.Recipe:
    grouped = stepq.QuantSpec(bits=4, signed=True, symmetric=True, granularity=stepq.PerGroup(axis=1, group_size=16),
                              observer=stepq.MinMaxObserver())
    return stepq.Recipe(name="w4g16a8", rules=(stepq.LayerRule(spec=None, ops=frozenset({"attention"})),),
                        default=stepq.LayerSpec(weight=grouped, activation=activation_spec(8)))


@pytest.mark.slow
def test_strict_partition_lists_every_float_layer(tmp_path):
    qm = _qm("dit", _grouped_weight_recipe())
    gm = copy.deepcopy(qm.gm)
    part = OnnxPartitioner().partition(gm)
    assert len(part.rejections) == len([n for n in qm.quantized_layers()]) > 0
    assert all("groups of 16" in str(r) for r in part.rejections)
    with pytest.raises(UnsupportedNodesError, match=f"cannot take {len(part.rejections)} node"):
        qm.export_onnx(tmp_path / "strict.onnx", strict=True)
    # non-strict: the layers run as float kernels on Q/DQ inputs, and the numerics still hold
    res = qm.export_onnx(tmp_path / "loose.onnx")
    assert len(res.partition.rejections) == len(part.rejections)
    counts = sx.count_kernels(tmp_path / "loose.onnx")
    assert counts.n_integer == 0 and len(counts.quantized_in_float) + counts.n_weight_only >= len(part.rejections)
    x = denoiser_inputs(2, (400, 400))
    assert rel_l2(sx.load(tmp_path / "loose.onnx", threads=1)(**x), qm(**x)) <= 1e-2


def test_external_data(tmp_path):
    qm = _qm("dit")
    res = qm.export_onnx(tmp_path / "ext.onnx", external_data=True)
    assert res.external_data and (tmp_path / "ext.onnx.data").exists()
    x = denoiser_inputs(1, (50,))
    assert rel_l2(sx.load(tmp_path / "ext.onnx", threads=1)(**x), qm(**x)) <= 1e-2


def test_bad_opset(tmp_path):
    with pytest.raises(ValueError, match="opset 20 is too old"):
        _qm("dit").export_onnx(tmp_path / "x.onnx", opset=20)


def test_loader_rejects_foreign_models(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    g = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 21)], ir_version=10),
              str(tmp_path / "plain.onnx"))
    with pytest.raises(stepq.ArtifactError, match="no stepq metadata"):
        sx.load(tmp_path / "plain.onnx")


def test_drop_in_model_for_make_denoiser(exported):
    from stepq.calibration.samplers import make_denoiser

    qm, path, _, _, _ = exported
    om = sx.load(path, threads=1)
    x = denoiser_inputs(2, (0, 0))["sample"]
    t = torch.tensor(321)
    ref = make_denoiser(qm)(x, t)
    out = make_denoiser(om)(x, t)
    assert out.shape == ref.shape and rel_l2(out, ref) <= 1e-2


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_direct_and_torch_onnx_translators_agree(tmp_path, kind):
    qm = _qm(kind)
    direct = qm.export_onnx(tmp_path / "direct.onnx", translator="direct")
    legacy = qm.export_onnx(tmp_path / "legacy.onnx", translator="torch.onnx")
    assert (direct.translator, legacy.translator) == ("direct", "torch.onnx")
    assert "torch_export_s" not in direct.stages and "torch_export_s" in legacy.stages
    kd, kl = sx.count_kernels(tmp_path / "direct.onnx"), sx.count_kernels(tmp_path / "legacy.onnx")
    assert kd.integer == kl.integer and kd.integer["MatMulIntegerToFloat"] == len(qm.quantized_layers())
    assert kd.quantized_in_float == []
    md, ml = sx.load(tmp_path / "direct.onnx", threads=1), sx.load(tmp_path / "legacy.onnx", threads=1)
    for t in (999, 400, 3):
        x = denoiser_inputs(3, [t] * 3, seed=t)
        a, b = md(**x), ml(**x)
        assert rel_l2(a, b) <= 1e-6, f"t={t}"


def test_auto_falls_back_to_torch_onnx(tmp_path, monkeypatch):
    from stepq.backends.onnx import direct

    def refuse(gm, *, opset):
        raise direct.DirectTranslationError("node 'x' (aten.made_up) has no translation")

    monkeypatch.setattr(direct, "translate", refuse)
    qm = _qm("dit")
    with pytest.warns(FallbackWarning, match=r"falling back to torch\.onnx\.export.*aten\.made_up"):
        res = qm.export_onnx(tmp_path / "m.onnx")
    assert res.translator == "torch.onnx"
    x = denoiser_inputs(2, [500, 500], seed=1)
    assert rel_l2(sx.load(tmp_path / "m.onnx", threads=1)(**x), qm(**x)) <= 1e-2
    with pytest.raises(sx.OnnxExportError, match="aten.made_up"):
        qm.export_onnx(tmp_path / "n.onnx", translator="direct")
    with pytest.raises(ValueError, match="translator"):
        qm.export_onnx(tmp_path / "n.onnx", translator="onnx")


def _copy_graph(later_reader: bool) -> torch.fx.GraphModule:
    g = torch.fx.Graph()
    x = g.placeholder("x")
    mean = g.call_function(torch.ops.aten.mean.dim, (x, [1], True))
    add = g.call_function(torch.ops.aten.add.Tensor, (mean, 1e-6))
    cp = g.call_function(torch.ops.aten.copy_.default, (mean, add))
    out = g.call_function(torch.ops.aten.rsqrt.default, (cp,))
    if later_reader:
        out = g.call_function(torch.ops.aten.mul.Tensor, (out, mean))
    g.output(out)
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    for n, v in zip([x, mean, add, cp], [torch.empty(2, 5)] + [torch.empty(2, 1)] * 3):
        n.meta["val"] = v
    return gm


@pytest.mark.parametrize("later_reader", [False, True])
def test_in_place_copies_become_functional_only_when_safe(later_reader):
    from stepq.backends.onnx.direct import _functionalize_copies

    gm = _copy_graph(later_reader)
    x = torch.rand(2, 5) + 0.5
    want = gm(x.clone())
    assert _functionalize_copies(gm) == (0 if later_reader else 1)
    gm.recompile()
    left = [n for n in gm.graph.nodes if n.target is torch.ops.aten.copy_.default]
    assert len(left) == (1 if later_reader else 0)
    torch.testing.assert_close(gm(x.clone()), want)
