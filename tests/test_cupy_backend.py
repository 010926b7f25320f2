"""The CuPy backend on the CPU: partition (what each node becomes, with reasons), lowering to the
``stepq_cupy`` ops, the lowered graph against the reference backend (the ops run the kernels' CPU
emulation), export / load, the typed error without a device, and the model left untouched."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import calib_set, denoiser_inputs

import stepq
from stepq.backends import UnsupportedNodesError, get_backend
from stepq.backends.base import placement_of
from stepq.backends.cupy import TABLE, CupyPartitioner
from stepq.backends.cupy import ops as cupy_ops
from stepq.compiler import meta, ops
from stepq.compiler.errors import ArtifactError, NoDeviceError
from stepq.cuda import runtime
from stepq.recipe import LayerRule, LayerSpec, PerGroup, QuantSpec, Recipe, TernarySpec
from stepq.recipe.presets import activation_spec, weight_spec
from stepq.testing.onnx_cases import attach_synthetic_tables, rel_l2
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser

BE = get_backend("cupy")
#: a whole lowered model against the reference. Each op matches its reference within fp32 rounding
#: (test_cuda_emulation.py), but an activation that lands within that rounding of a level boundary
#: quantizes one level apart; one such element in a 3×3 conv's input moves ~C_out·9 outputs by a
#: step (measured on the random UNet: 1 flip, rel. L2 1.8e-3 at the output). A kernel reading a wrong
#: row, layout or zero point gives errors of order 1.
MODEL_TOL = 1e-2


def _out(y):
    return y if isinstance(y, torch.Tensor) else y[0]


def _qm(kind: str, recipe, n_calib: int = 2):
    m = build_random_denoiser(RandomDenoiserConfig(kind=kind, depth=1))
    data = calib_set(n_calib)
    return stepq.quantize(m, data[0], recipe, calibration=data, progress=False), data


def _count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is target)


@pytest.fixture(scope="module")
def unet_w8a8():
    return _qm("unet", "w8a8")


@pytest.fixture(scope="module")
def dit_w4a8():
    return _qm("dit", "w4a8")


def test_w8a8_unet_lowers_every_layer_and_matches_the_reference(unet_w8a8):
    qm, data = unet_w8a8
    nodes_before = len(qm.gm.graph.nodes)
    low = BE.lower(qm, strict=True)
    n_layers = len(qm.quantized_layers())
    assert low.counts["linear_w8a8"] + low.counts["conv2d_w8a8"] == n_layers and low.counts["conv2d_w8a8"] > 0
    gm = low.gm
    assert _count(gm, cupy_ops.LINEAR_W8A8) + _count(gm, cupy_ops.CONV2D_W8A8) == n_layers
    # the kernels quantize on the device: no quantizer, dequantize or float weight of a lowered layer is left
    assert _count(gm, ops.FAKE_QUANT) == 0 and _count(gm, ops.DEQUANTIZE) == 0
    assert not any(meta.BACKEND_TAG in n.meta for n in qm.gm.graph.nodes) and len(qm.gm.graph.nodes) == nodes_before
    model = BE.model(qm, device="cpu")
    with torch.no_grad():
        for batch in data[:2]:
            y, y_ref = _out(model(**batch)), _out(qm(**batch))
            assert rel_l2(y, y_ref) < MODEL_TOL


def test_w4a8_dit_runs_weight_only_kernels_on_fake_quantized_activations(dit_w4a8):
    qm, data = dit_w4a8
    low = BE.lower(qm, strict=True)
    part = low.partition
    assert part.count("linear_weight_only") > 0
    for node in low.gm.graph.nodes:
        if node.target is cupy_ops.LINEAR_WEIGHT_ONLY:
            assert node.args[5] == "s4" and node.args[8] == 1 and node.args[9] == 0  # per channel, no groups
            assert node.args[0].target is ops.FAKE_QUANT  # the 8-bit activation stays simulated in PyTorch
    with torch.no_grad():
        assert rel_l2(_out(BE.model(qm, device="cpu")(**data[1])), _out(qm(**data[1]))) < MODEL_TOL


def test_timestep_tables_are_read_on_the_device_and_a_batch_shares_its_first_step():
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit", depth=1))
    data = calib_set(2)
    prog = stepq.calibrate(stepq.prepare(stepq.capture(m, data[0]), "w8a8"), data, progress=False)
    prog.recipe = prog.recipe.replace(timestep_policy="clamp")
    assert attach_synthetic_tables(prog, spread=0.4) > 0
    qm = stepq.convert(prog)
    low = BE.lower(qm, strict=True)
    assert low.counts["timestep_index"] == _count(qm.gm, ops.TIMESTEP_INDEX) == 1
    assert _count(low.gm, ops.TIMESTEP_INDEX) == 0 and _count(low.gm, cupy_ops.TIMESTEP_INDEX) == 1
    w8 = [n for n in low.gm.graph.nodes if n.target is cupy_ops.LINEAR_W8A8]
    assert w8 and all(n.args[7].target is cupy_ops.TIMESTEP_INDEX for n in w8)  # the index node, read by the kernel
    model = BE.model(qm, device="cpu")
    with torch.no_grad():
        outs = {}
        for t in (0, 250, 999):
            x = denoiser_inputs(2, [t, t], seed=3)
            outs[t] = _out(model(**x))
            assert rel_l2(outs[t], _out(qm(**x))) < MODEL_TOL  # the row of t (the tables spread ±40 %)
        mixed = _out(model(**denoiser_inputs(2, [250, 999], seed=3)))
        assert torch.equal(mixed[0], outs[250][0])  # the batch uses its first timestep's row


def _weight_only_recipe(weight) -> Recipe:
    return Recipe(name="weight-only", rules=(LayerRule(spec=None, ops=frozenset({"attention"}), name="attn-float"),),
                  default=LayerSpec(weight=weight))


@pytest.mark.parametrize(("weight", "fmt"), [
    (TernarySpec(), "base3"),
    (TernarySpec(packing="2bit"), "s2"),
    (QuantSpec(bits=4, signed=True, symmetric=True, granularity=PerGroup(16, 1)), "s4"),
    (QuantSpec(bits=4, signed=False, symmetric=False, granularity=PerGroup(16, 1)), "u4"),
    (weight_spec(8), "s8"),
])
def test_weight_only_formats_lower_and_match(weight, fmt):
    qm, data = _qm("dit", _weight_only_recipe(weight))
    low = BE.lower(qm)
    lowered = [n for n in low.gm.graph.nodes if n.target is cupy_ops.LINEAR_WEIGHT_ONLY]
    assert lowered and {n.args[5] for n in lowered} == {fmt}
    [conv] = [r for r in low.partition.rejections if r.target == "conv2d.default"]  # the patch embedding
    assert conv.reasons == ("conv2d_w8a8: the activation is not quantized (no fake_quant); "
                            "there is no weight-only convolution kernel",)
    if isinstance(weight, QuantSpec) and isinstance(weight.granularity, PerGroup):
        assert all(n.args[9] == 16 for n in lowered)
    with torch.no_grad():
        assert rel_l2(_out(BE.model(qm, device="cpu")(**data[1])), _out(qm(**data[1]))) < MODEL_TOL


def test_rejections_name_the_node_and_every_rows_reason():
    three_bit = QuantSpec(bits=3, signed=True, symmetric=True)
    recipe = Recipe(name="w3a8", rules=(LayerRule(spec=None, ops=frozenset({"attention"}), name="attn-float"),),
                    default=LayerSpec(weight=three_bit, activation=activation_spec(8)))
    qm, _ = _qm("dit", recipe)
    part = BE.partition(qm)
    assert part.rejections and not part.count("linear_w8a8")
    [r] = [r for r in part.rejections if r.target == "linear.default"][:1]
    assert r.layer and any("linear_w8a8: 3-bit signed weights" in x for x in r.reasons)
    assert any("linear_weight_only: 3-bit weights are stored as a bit stream" in x for x in r.reasons)
    with pytest.raises(UnsupportedNodesError, match=r"backend 'cupy' cannot take \d+ node\(s\)") as e:
        BE.partition(qm, strict=True)
    assert r.node in str(e.value)
    with torch.no_grad():  # rejected layers stay PyTorch ops: the lowered graph still computes the reference
        x = calib_set(1)[0]
        assert rel_l2(_out(BE.model(qm, device="cpu")(**x)), _out(qm(**x))) < MODEL_TOL


def test_table_rows_are_named_and_described():
    names = [p.name for p in TABLE]
    assert names == ["linear_w8a8", "conv2d_w8a8", "linear_weight_only", "timestep_index"]
    assert all(p.kernel and p.description for p in TABLE)
    assert isinstance(CupyPartitioner(), CupyPartitioner)


def test_export_writes_the_artefact_and_partition_and_loads_on_the_cpu(unet_w8a8, tmp_path):
    qm, data = unet_w8a8
    res = qm.export("cupy", tmp_path / "k")
    manifest = json.loads((tmp_path / "k" / "cupy.json").read_text())
    assert manifest["counts"] == res.partition.counts() and not manifest["rejections"]
    assert (tmp_path / "k" / "model.safetensors").is_file() and not list((tmp_path / "k").glob("*.p*kl*"))
    model = BE.load(tmp_path / "k", device="cpu")
    assert model.counts == BE.lower(qm).counts  # the graph read back (no shapes in its meta) lowers the same
    with torch.no_grad():
        assert torch.equal(_out(model(**data[1])), _out(BE.model(qm, device="cpu")(**data[1])))
    with pytest.raises(ArtifactError, match="not a cupy export"):
        qm.save(str(tmp_path / "plain"))
        BE.load(tmp_path / "plain", device="cpu")
    with pytest.raises(TypeError, match="only 'strict'"):
        BE.export(qm, tmp_path / "x", opset=21)


@pytest.mark.skipif(runtime.device_available(), reason="a CUDA device is present")
def test_no_device_is_a_typed_error(unet_w8a8, tmp_path):
    qm, _ = unet_w8a8
    with pytest.raises(NoDeviceError, match="CUDA device|cupy"):
        BE.model(qm)  # device="cuda" by default
    qm.export("cupy", tmp_path / "k")
    with pytest.raises(NoDeviceError):
        BE.load(tmp_path / "k")


def test_the_quantized_model_is_not_modified(dit_w4a8):
    qm, _ = dit_w4a8
    before = copy.deepcopy(qm.gm.state_dict())
    BE.lower(qm)
    after = qm.gm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(placement_of(n, "cupy") is None for n in qm.gm.graph.nodes)
