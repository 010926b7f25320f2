"""The backend contract: tag from an explicit table, reasons for what is left, strict mode."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import calib_set

import stepq
from stepq.backends import Partitioner, Placement, UnsupportedNodesError, reference
from stepq.backends.base import placement_of
from stepq.backends.onnx import TABLE, OnnxPartitioner
from stepq.compiler import meta, ops
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


@pytest.fixture(scope="module")
def qm():
    m = build_random_denoiser(RandomDenoiserConfig(kind="unet", depth=1))
    data = calib_set(2)
    return stepq.quantize(m, data[0], "w8a8", calibration=data, progress=False)


def test_onnx_tags_every_quantizer_and_layer(qm):
    gm = copy.deepcopy(qm.gm)
    part = OnnxPartitioner().partition(gm, strict=True)
    counts = part.counts()
    n_layers = len(qm.quantized_layers())
    assert counts["linear_integer"] + counts["conv2d_integer"] == n_layers
    n_fq = sum(1 for n in gm.graph.nodes if n.target is ops.FAKE_QUANT)
    assert counts["activation_quantize"] == n_fq  # every activation quantizer feeds integer kernels only
    assert counts["weight_integer"] == sum(1 for n in gm.graph.nodes if n.target is ops.DEQUANTIZE)
    assert all(placement_of(n, "onnx") for n in gm.graph.nodes if n.target in (ops.FAKE_QUANT, ops.DEQUANTIZE))
    assert not any(meta.BACKEND_TAG in n.meta for n in qm.gm.graph.nodes)  # the model's own graph is untouched


def test_table_rows_are_named_and_described():
    names = [p.name for p in TABLE]
    assert len(names) == len(set(names))
    assert {"linear_integer", "conv2d_integer", "linear_weight_only", "timestep_gather"} <= set(names)
    assert all(p.kernel for p in TABLE)


def test_rejections_carry_every_rows_reason_and_strict_lists_all():
    w = torch.fx.Graph()
    x = w.placeholder("x")
    y = w.call_function(torch.ops.aten.relu.default, (x,))
    z = w.call_function(torch.ops.aten.relu.default, (y,))
    w.output(z)
    gm = torch.fx.GraphModule(torch.nn.Module(), w)
    rows = (Placement("small", frozenset({torch.ops.aten.relu.default}), lambda n: "too big", "k", integer=True),
            Placement("never", frozenset({torch.ops.aten.relu.default}), lambda n: "no", "k", integer=False))
    part = Partitioner("toy", rows).partition(gm)
    assert len(part.rejections) == 2 and part.rejections[0].reasons == ("small: too big", "never: no")
    with pytest.raises(UnsupportedNodesError) as e:
        Partitioner("toy", rows).partition(gm, strict=True)
    assert "cannot take 2 node(s)" in str(e.value) and "relu" in str(e.value)
    assert "2 left as they are" in part.summary()


def test_reference_backend_takes_everything(qm):
    part = reference.partition(qm, strict=True)
    assert not part.rejections and part.count("pytorch") > 0
    assert reference.BACKEND.lower(qm).partition.count("pytorch") == part.count("pytorch")
