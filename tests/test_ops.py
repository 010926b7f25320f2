"""stepq's torch.library ops: semantics against an independent NumPy reference, autograd, packing."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from stepq.compiler import ops


def np_fake_quant(x, s, z, qmin, qmax):
    q = np.clip(np.round(x / s) + np.round(z), qmin, qmax)  # numpy rounds half to even, like ONNX
    return (q - np.round(z)) * s


grids = st.sampled_from([(-128, 127), (0, 255), (-8, 7), (0, 15), (-2, 1), (0, 3), (-32, 31)])


@given(grid=grids, seed=st.integers(0, 10_000), scale=st.floats(1e-3, 2.0), zp_frac=st.floats(0, 1))
def test_fake_quant_matches_numpy_reference_per_tensor(grid, seed, scale, zp_frac):
    qmin, qmax = grid
    zp = float(round(qmin + zp_frac * (qmax - qmin))) if qmin == 0 else 0.0
    x = torch.randn(64, generator=torch.Generator().manual_seed(seed)) * 3
    y = ops.fake_quant(x, torch.tensor(scale), torch.tensor(zp), qmin, qmax)
    ref = np_fake_quant(x.numpy().astype(np.float64), scale, zp, qmin, qmax)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_fake_quant_per_channel_and_per_group_layouts():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 10, generator=g)
    s = torch.rand(6, generator=g) * 0.1 + 0.01
    y = ops.fake_quant(w, s, torch.zeros(6), -8, 7, 0, 0)
    ref = np.stack([np_fake_quant(w[i].numpy(), float(s[i]), 0.0, -8, 7) for i in range(6)])
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-6)
    # blocked along axis 1 with group 4: 10 columns -> 3 groups, the last one partial
    sg = torch.rand(6, 3, generator=g) * 0.1 + 0.01
    y = ops.fake_quant(w, sg, torch.zeros(6, 3), -8, 7, 1, 4)
    ref = np.empty((6, 10))
    for i in range(6):
        for j in range(10):
            ref[i, j] = np_fake_quant(np.array([w[i, j].item()]), float(sg[i, j // 4]), 0.0, -8, 7)[0]
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-6)


def test_quantize_dequantize_equal_fake_quant_bitwise():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, 3, generator=g)
    s, z = torch.tensor(0.02), torch.tensor(130.0)
    q = ops.quantize(x, s, z, 0, 255, None, 0, torch.uint8)
    assert q.dtype == torch.uint8
    assert torch.equal(ops.dequantize(q, s, z), ops.fake_quant(x, s, z, 0, 255))


def test_round_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    y = ops.fake_quant(x, torch.tensor(1.0), torch.tensor(0.0), -8, 7)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]


def test_ste_and_lsq_gradients():
    x = torch.tensor([0.26, -0.74, 5.0, -5.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    z = torch.tensor(0.0, requires_grad=True)
    y = ops.fake_quant(x, s, z, -4, 3)
    y.sum().backward()
    # STE: gradient 1 inside the clipping range, 0 outside
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]
    # LSQ: round(v) - v inside; the clipped level (q - z) outside
    v = np.array([0.52, -1.48])
    expected_s = float(np.sum(np.round(v) - v) + 3 + (-4))
    assert s.grad.item() == pytest.approx(expected_s, abs=1e-5)
    # zero point: -s for each clipped element
    assert z.grad.item() == pytest.approx(-0.5 * 2)


def test_per_channel_scale_gradient_is_reduced_per_channel():
    w = torch.randn(3, 8, requires_grad=True)
    s = torch.full((3,), 0.05, requires_grad=True)
    ops.fake_quant(w, s, torch.zeros(3), -8, 7, 0, 0).sum().backward()
    assert s.grad.shape == (3,)
    v = (w.detach() / 0.05)
    q = torch.round(v)
    inside = (q >= -8) & (q <= 7)
    level = torch.where(inside, q - v, torch.clamp(q, -8, 7))
    torch.testing.assert_close(s.grad, level.sum(dim=1))


@given(bits=st.integers(1, 8), signed=st.booleans(), n=st.integers(1, 67), seed=st.integers(0, 1000))
def test_pack_unpack_round_trip(bits, signed, n, seed):
    if bits == 1 and signed:
        signed = False
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    q = torch.randint(lo, hi + 1, (n,), generator=torch.Generator().manual_seed(seed))
    packed = ops.pack(q, bits, signed)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-n * bits // 8)
    assert torch.equal(ops.unpack(packed, bits, signed, [n]).to(torch.int64), q)


@pytest.mark.parametrize("signed, dtype", [(True, onnx.TensorProto.INT4), (False, onnx.TensorProto.UINT4)])
def test_pack_4bit_matches_onnx_layout(signed, dtype):
    q = torch.tensor([-8, 7, 3, -1, 0, 5, -3]) if signed else torch.tensor([0, 15, 3, 9, 1, 5, 12])
    t = onnx.helper.make_tensor("w", dtype, [q.numel()], q.tolist())
    raw = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t)).raw_data
    assert ops.pack(q, 4, signed).numpy().tobytes() == raw


def test_pack_rejects_values_off_grid():
    with pytest.raises(ValueError, match="outside the signed 4-bit grid"):
        ops.pack(torch.tensor([8]), 4, True)


def test_ops_export_and_fake_tensor():
    class M(torch.nn.Module):
        def forward(self, x, s, z):
            return ops.fake_quant(x, s, z, 0, 255) + ops.dequantize(ops.quantize(x, s, z, 0, 255, None, 0, torch.uint8), s, z)

    ep = torch.export.export(M(), (torch.randn(2, 3), torch.tensor(0.1), torch.tensor(3.0)))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert ops.FAKE_QUANT in targets and ops.QUANTIZE in targets and ops.DEQUANTIZE in targets
