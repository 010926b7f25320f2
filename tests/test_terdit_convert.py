"""TerDiT end to end on a tiny diffusers DiT: pipeline stages, ternary QAT, convert to packed codes
(bit-identical), save → load, and the ONNX export through MatMulNBits with 2 bits."""

from __future__ import annotations

import dataclasses

import onnx
import pytest
import torch

import stepq
import stepq.backends.onnx as sx
from stepq.compiler import meta, ops
from stepq.compiler.graph_utils import fetch_attr
from stepq.compiler.pass_manager import Skip
from stepq.methods.qat import denoising_batches
from stepq.passes.insert_rmsnorm import RMS_NORM
from stepq.testing.families import FAMILIES
from stepq.testing.onnx_cases import rel_l2

FAM = FAMILIES["dit"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _recipe(name: str = "ternary-dit", steps: int = 3, **spec) -> stepq.Recipe:
    r = stepq.get_preset(name)
    r = r.replace(qat=dataclasses.replace(r.qat, steps=steps, batch_size=4))
    if spec:
        rules = tuple(dataclasses.replace(x, spec=stepq.LayerSpec(weight=stepq.TernarySpec(**spec)))
                      if x.name == "block-linears-ternary" else x for x in r.rules)
        r = r.replace(rules=rules)
    return r


def _batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(16, *FAM.sample_shape, generator=g).clamp(-1, 1)
    labels = torch.randint(0, 10, (16,), generator=g)
    return denoising_batches(x0, FAM.scheduler(), FAM.make_inputs, batch_size=4, cond={"class_labels": labels},
                             seed=seed)


def _trained(recipe: stepq.Recipe):
    model = FAM.model()
    prog = stepq.capture(model, FAM.example_inputs())
    prog = stepq.prepare(prog, recipe)
    stepq.calibrate(prog, [FAM.example_inputs()], progress=False)
    stepq.train(prog, _batches(), progress=False)
    return prog


def _ternary_layers(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is ops.TERNARY)


def test_the_pipeline_lists_the_terdit_stages():
    names = {s.name: s.item for s in stepq.build_pipeline("ternary-dit")}
    assert not isinstance(names["insert_rmsnorm"], Skip) and not isinstance(names["train_ternary"], Skip)
    assert isinstance(names["train_qat"], Skip)
    no_rms = {s.name: s.item for s in stepq.build_pipeline("ternary-dit-no-rmsnorm")}
    assert isinstance(no_rms["insert_rmsnorm"], Skip)
    assert isinstance({s.name: s.item for s in stepq.build_pipeline("w8a8")}["train_ternary"], Skip)


@pytest.mark.parametrize("packing,unpack", [("base3", ops.UNPACK_BASE3), ("2bit", ops.UNPACK)])
def test_training_then_convert_is_bit_identical(packing, unpack):
    prog = _trained(_recipe(packing=packing))
    n_ternary = _ternary_layers(prog.gm)
    assert n_ternary == 2 * 7  # per block: the adaLN linear, q, k, v, out, two FF linears
    assert sum(1 for n in prog.gm.graph.nodes if n.target is RMS_NORM) == 2
    assert len(prog.state.qat_curve) == 3
    # α and the RMSNorm weights were learned
    alphas = [fetch_attr(prog.gm, n.args[1].target) for n in prog.gm.graph.nodes if n.target is ops.TERNARY]
    assert all(isinstance(a, torch.nn.Parameter) for a in alphas)
    rms_w = [fetch_attr(prog.gm, n.args[2].target) for n in prog.gm.graph.nodes if n.target is RMS_NORM]
    assert any(not torch.equal(w, torch.ones_like(w)) for w in rms_w)
    x = FAM.example_inputs(batch=3, t=250.0, seed=1)
    with torch.no_grad():
        before = prog(**x)[0]
    qm = stepq.convert(prog)
    assert _ternary_layers(qm.gm) == 0
    stored = [n for n in qm.gm.graph.nodes if n.target is unpack]
    assert len([n for n in stored if n.args[1] == 2] if unpack is ops.UNPACK else stored) == n_ternary
    with torch.no_grad():
        after = qm(**x)[0]
    assert torch.equal(before, after)


def test_save_load_is_bit_exact(tmp_path):
    qm = stepq.convert(_trained(_recipe(steps=1)))
    qm.save(str(tmp_path / "m"))
    back = stepq.load(str(tmp_path / "m"))
    x = FAM.example_inputs(batch=2, t=800.0, seed=2)
    with torch.no_grad():
        assert torch.equal(qm(**x)[0], back(**x)[0])
    specs = [n.meta.get(meta.QSPEC) for n in back.gm.graph.nodes if n.target is ops.DEQUANTIZE]
    assert any(isinstance(s, stepq.TernarySpec) for s in specs)
    assert back.recipe == qm.recipe


def test_onnx_export_runs_ternary_layers_in_matmul_nbits_with_2_bits(tmp_path):
    qm = stepq.convert(_trained(_recipe(steps=1)))
    n_ternary = sum(1 for n in qm.gm.graph.nodes if n.target is ops.UNPACK_BASE3)
    n_linear = sum(1 for n in qm.gm.graph.nodes if n.target is torch.ops.aten.linear.default
                   and n.args[1].target is ops.DEQUANTIZE)
    res = qm.export_onnx(tmp_path / "t.onnx")
    assert res.lowered["linear_weight_only"] == n_linear
    nodes = [nd for nd in onnx.load(str(tmp_path / "t.onnx")).graph.node if nd.op_type == "MatMulNBits"]
    bits = [{a.name: a.i for a in nd.attribute}["bits"] for nd in nodes]
    assert len(nodes) == n_linear and bits.count(2) == n_ternary == 14
    counts = sx.count_kernels(tmp_path / "t.onnx")
    assert counts.weight_only["MatMulNBits"] == n_linear
    om = sx.load(tmp_path / "t.onnx", threads=1)
    for t in (10.0, 700.0):
        x = FAM.example_inputs(batch=3, t=t, seed=3)
        assert rel_l2(om(**x)[0], qm(**x)[0]) <= 1e-4  # float32 compute on the same dequantized weights
