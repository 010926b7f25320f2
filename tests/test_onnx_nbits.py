"""Weight-only linears → com.microsoft.MatMulNBits (2/4/8 bits, per channel or per group), and
4-bit weights as DequantizeLinear from INT4 initializers where no integer kernel exists."""

from __future__ import annotations

import onnx
import pytest
import torch
from helpers import calib_set, denoiser_inputs
from hypothesis import given
from hypothesis import strategies as st

import stepq
import stepq.backends.onnx as sx
from stepq.backends.onnx import ops as onnx_ops
from stepq.compiler import ops
from stepq.testing.onnx_cases import rel_l2
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


def _weight_only(bits: int, group: int = 0, ops_: frozenset = frozenset({"linear"})) -> stepq.Recipe:
    gran = stepq.PerGroup(axis=1, group_size=group) if group else stepq.PerChannel(0)
    spec = stepq.QuantSpec(bits=bits, signed=True, symmetric=True, granularity=gran, observer=stepq.MinMaxObserver())
    return stepq.Recipe(name=f"w{bits}g{group}-weight-only",
                        rules=(stepq.LayerRule(spec=stepq.LayerSpec(weight=spec), ops=ops_),),
                        default=stepq.LayerSpec())


@given(bits=st.sampled_from([2, 4, 8]), k=st.sampled_from([16, 40, 64, 200]), n=st.integers(1, 9),
       block=st.sampled_from([16, 32, 128]))
def test_nbits_pack_is_the_matmul_nbits_layout(bits, k, n, block):
    g = torch.Generator().manual_seed(bits * k + n)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
    packed, blocks = onnx_ops.nbits_pack(q, bits, block)
    assert packed.shape == (n, -(-k // block), block * bits // 8) and packed.dtype == torch.uint8
    scales = torch.rand(n * blocks, generator=g) + 0.1
    a = torch.randn(3, k, generator=g)
    w = q.float() * scales.reshape(n, blocks).repeat_interleave(block, dim=1)[:, :k]
    torch.testing.assert_close(onnx_ops.MATMUL_NBITS(a, packed, scales, None, k, n, bits, block), a @ w.t())


@pytest.mark.parametrize("bits,group", [(2, 0), (4, 0), (8, 0), (4, 16)])
def test_matmul_nbits_against_reference(tmp_path, bits, group):
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit", depth=1))
    data = calib_set(2)
    qm = stepq.quantize(m, data[0], _weight_only(bits, group), calibration=data, progress=False)
    res = qm.export_onnx(tmp_path / "w.onnx")
    n_linear = len(qm.quantized_layers())
    assert res.lowered["linear_weight_only"] == n_linear > 0
    nodes = [nd for nd in onnx.load(str(tmp_path / "w.onnx")).graph.node if nd.op_type == "MatMulNBits"]
    assert len(nodes) == n_linear
    assert {a.name: a.i for a in nodes[0].attribute}["bits"] == bits
    counts = sx.count_kernels(tmp_path / "w.onnx")
    assert counts.weight_only["MatMulNBits"] == n_linear and not counts.quantized_in_float
    om = sx.load(tmp_path / "w.onnx", threads=1)
    for t in (10, 700):
        x = denoiser_inputs(3, (t, t, t))
        assert rel_l2(om(**x), qm(**x)) <= 1e-4  # float32 compute on the same dequantized weights


def test_int4_conv_weights_are_dequantize_linear_from_int4(tmp_path):
    m = build_random_denoiser(RandomDenoiserConfig(kind="unet", depth=1))
    data = calib_set(2)
    qm = stepq.quantize(m, data[0], _weight_only(4, 0, frozenset({"conv2d"})), calibration=data, progress=False)
    assert any(n.target is ops.UNPACK for n in qm.gm.graph.nodes)
    qm.export_onnx(tmp_path / "c.onnx")
    model = onnx.load(str(tmp_path / "c.onnx"))
    int4 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4}
    dq = [nd for nd in model.graph.node if nd.op_type == "DequantizeLinear" and nd.input[0] in int4]
    assert len(dq) == len(qm.quantized_layers()) > 0
    assert all(nd.input[2] in int4 for nd in dq)  # INT4 zero points too
    x = denoiser_inputs(2, (300, 300))
    assert rel_l2(sx.load(tmp_path / "c.onnx", threads=1)(**x), qm(**x)) <= 1e-5


def test_w4a8_uses_int4_initializers_and_integer_kernels(tmp_path):
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit", depth=1))
    data = calib_set(2)
    qm = stepq.quantize(m, data[0], "w4a8", calibration=data, progress=False)
    res = qm.export_onnx(tmp_path / "w4a8.onnx")
    assert res.lowered.get("int4_initializers", 0) > 0
    counts = sx.count_kernels(tmp_path / "w4a8.onnx")
    assert counts.n_integer == len(qm.quantized_layers()) and not counts.quantized_in_float
    x = denoiser_inputs(2, (600, 600))
    assert rel_l2(sx.load(tmp_path / "w4a8.onnx", threads=1)(**x), qm(**x)) <= 1e-2
