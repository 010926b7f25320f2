"""quantize_weights: integer (packed) storage that dequantizes to exactly the fake-quant weights."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import calib_set, count, denoiser_inputs

import stepq
from stepq.compiler import ops
from stepq.compiler.api import convert
from stepq.compiler.graph_utils import fetch_attr, has_attr
from stepq.compiler.pass_manager import run_passes
from stepq.passes import QuantizeWeights
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


@pytest.mark.parametrize("recipe, bits", [("w8a8", 8), ("w4a4", 4)])
def test_converted_model_equals_calibrated_program_bitwise(recipe, bits):
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit", depth=2))
    data = calib_set(2)
    prog = stepq.calibrate(stepq.prepare(stepq.capture(m, data[0]), recipe), data, progress=False)
    x = denoiser_inputs(3, (5, 300, 800), seed=9)
    before = prog(**x)
    n_wq = sum(1 for n in prog.gm.graph.nodes if n.target is ops.FAKE_QUANT and n.args[0].op == "get_attr")
    qm = convert(prog)
    assert torch.equal(qm(**x), before)
    gm = qm.gm
    assert count(gm, ops.DEQUANTIZE) == n_wq
    assert not any(n.target is ops.FAKE_QUANT and n.args[0].op == "get_attr" for n in gm.graph.nodes)
    # the float weights of quantized layers are gone; the 4-bit ones are packed two per byte
    assert not has_attr(gm, "blocks.1.fc1.weight")
    if bits == 8:
        w = fetch_attr(gm, "blocks.1.fc1.weight_int8")
        assert w.dtype == torch.int8 and tuple(w.shape) == (64, 32)
    else:
        w = fetch_attr(gm, "blocks.1.fc1.weight_packed4")
        assert w.dtype == torch.uint8 and w.numel() == math.ceil(64 * 32 / 2)
        assert count(gm, ops.UNPACK) > 0
    # io layers stay 8-bit by rule
    assert has_attr(gm, "patch.weight_int8") and has_attr(gm, "out.weight_int8")
    # idempotent
    again = run_passes(qm.program, [QuantizeWeights()])[0].result
    assert again.count == 0


def test_weight_bytes_shrink():
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit", depth=2, width=64))
    data = calib_set(2)
    fp_bytes = sum(p.numel() * 4 for p in m.parameters())
    w8 = stepq.quantize(m, data[0], "w8a8", calibration=data, progress=False).weight_bytes()
    w4 = stepq.quantize(m, data[0], "w4a8", calibration=data, progress=False).weight_bytes()
    assert w4 < w8 < fp_bytes / 3
