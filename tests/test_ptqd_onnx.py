"""Mixed precision in ONNX: one file, an If on the step's width over one subgraph per width."""

from __future__ import annotations

import onnx
import pytest
import torch
from helpers import calib_set, denoiser_inputs

import stepq
from stepq.backends import onnx as ort_backend
from stepq.backends.onnx.mixed import export_mixed
from stepq.methods import ptqd
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


@pytest.mark.slow
def test_export_mixed_switches_like_the_single_width_exports(tmp_path):
    m = build_random_denoiser(RandomDenoiserConfig(kind="unet", depth=1))
    data = calib_set(3)
    qm = stepq.quantize(m, data[0], "mixed-ptqd", calibration=data, progress=False)
    ptqd.set_bits(qm, torch.where(torch.arange(1000) < 500, 4, 8))
    path = export_mixed(qm, tmp_path / "mixed.onnx")
    model = onnx.load(str(path))
    [if_node] = [n for n in model.graph.node if n.op_type == "If"]
    branches = {a.name: a.g for a in if_node.attribute}
    assert set(branches) == {"then_branch", "else_branch"}
    assert not any(g.initializer for g in branches.values())  # every tensor lives once, in the outer graph
    names = [i.name for i in model.graph.initializer]
    assert len(names) == len(set(names)) and not any(n.startswith("a4/") for n in names)  # weights shared
    ort_backend.export(ptqd.specialize(qm, 4), tmp_path / "a4.onnx")  # the A4 branch on its own
    single = ort_backend.load(tmp_path / "a4.onnx")
    mixed = ort_backend.load(path)
    x4, x8 = denoiser_inputs(2, (120, 120), seed=1), denoiser_inputs(2, (880, 880), seed=1)
    assert torch.equal(mixed(**x4), single(**x4))
    assert not torch.equal(mixed(**x8), single(**x8))  # t = 880 takes the A8 branch
    for x in (x4, x8):
        torch.testing.assert_close(mixed(**x), qm(**x), rtol=0.05, atol=0.05)
