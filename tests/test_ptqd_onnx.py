"""Mixed precision in ONNX: ``qm.export_onnx`` of a PTQD mixed model writes one file, an If on the
step's width over one subgraph per width, that runs like the reference backend at each width."""

from __future__ import annotations

import onnx
import pytest
import torch
from helpers import calib_set, denoiser_inputs

import stepq
from stepq import ptqd
from stepq.backends import onnx as ort_backend
from stepq.testing.onnx_cases import rel_l2
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    m = build_random_denoiser(RandomDenoiserConfig(kind="unet", depth=1))
    data = calib_set(3)
    qm = stepq.quantize(m, data[0], "mixed-ptqd", calibration=data, progress=False)
    ptqd.set_bits(qm, torch.where(torch.arange(1000) < 500, 4, 8))
    path = tmp_path_factory.mktemp("mixed") / "mixed.onnx"
    return qm, path, qm.export_onnx(path)


@pytest.mark.slow
def test_export_onnx_of_a_mixed_model_writes_the_if_file(mixed):
    qm, path, result = mixed
    assert ort_backend.is_mixed(qm) and not ort_backend.is_mixed(ptqd.specialize(qm, 4))
    assert isinstance(result, ort_backend.MixedExportResult) and result.path == path
    assert result.widths == (4, 8) and set(result.branches) == {4, 8}
    model = onnx.load(str(path))
    [if_node] = [n for n in model.graph.node if n.op_type == "If"]
    branches = {a.name: a.g for a in if_node.attribute}
    assert set(branches) == {"then_branch", "else_branch"}
    assert not any(g.initializer for g in branches.values())  # every tensor lives once, in the outer graph
    names = [i.name for i in model.graph.initializer]
    assert len(names) == len(set(names)) and not any(n.startswith("a4/") for n in names)  # weights shared
    # the width is gathered at the ONNX input the export fed from the timestep argument
    [cast] = [n for n in model.graph.node if n.output[0] == "ptqd/t64"]
    assert cast.input[0] == result.input_name(qm.signature.timestep)
    for b, r in result.branches.items():  # each width has the backend's integer kernels
        assert r.partition.counts()["conv2d_integer"] > 0, b
        assert not r.partition.rejections, b


@pytest.mark.slow
def test_mixed_onnx_runs_each_step_at_its_width_like_the_reference(mixed, tmp_path):
    qm, path, _ = mixed
    ort_backend.export(ptqd.specialize(qm, 4), tmp_path / "a4.onnx")  # the A4 branch on its own
    single = ort_backend.load(tmp_path / "a4.onnx")
    model = ort_backend.load(path)
    x4, x8 = denoiser_inputs(2, (120, 120), seed=1), denoiser_inputs(2, (880, 880), seed=1)
    assert torch.equal(model(**x4), single(**x4))
    assert not torch.equal(model(**x8), single(**x8))  # t = 880 takes the A8 branch
    for x, b in ((x4, 4), (x8, 8)):
        ref = qm(**x)
        assert torch.equal(ref, ptqd.specialize(qm, b)(**x))  # the reference runs this step at b bits
        assert rel_l2(model(**x), ref) <= 2e-2, b
