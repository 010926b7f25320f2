"""The CPU emulation of every CUDA kernel (stepq.cuda.emulate) against the reference backend's ops.

Integer parts are compared exactly (quantized activations, the int32 accumulators, the decoded and
dequantised weights); float outputs against the reference within the bound of fp32 summation
(docs/CUDA.md: |y − y_ref| ≤ (K + 4)·2⁻²⁴·Σ_k|x_k·w_k| + 2⁻²⁴|b|, plus half an fp16 ulp for fp16
outputs). Shapes: every batch 1…17 and larger, K and N off the kernels' tiles (K_ALIGN 16, CHUNK·32 =
256, MR 8), non-zero zero points, unsigned grids (the shift of 128), odd group sizes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from stepq.compiler import ops, ternary_ops
from stepq.cuda import emulate as E

EPS32 = 2.0 ** -24
# (K, N) pairs cycled through with the batch: K off every tile (1, 3, 17, 255, 257, 300), N odd and small
KN = [(1, 1), (3, 5), (16, 8), (17, 9), (31, 33), (64, 7), (100, 3), (255, 12), (257, 5), (300, 17)]
BATCHES = [*range(1, 18), 24, 33, 64]
CASES = [(m, *KN[i % len(KN)]) for i, m in enumerate(BATCHES)] + [(m, 257, 13) for m in (1, 2, 8, 16, 17)]


def _bound(xd: torch.Tensor, wd: torch.Tensor, bias: torch.Tensor | None, k: int) -> torch.Tensor:
    b = (k + 4) * EPS32 * (xd.double().abs() @ wd.double().abs().T)
    if bias is not None:
        b = b + EPS32 * bias.double().abs()
    return b + 1e-30


def _act_grid(unsigned: bool) -> tuple[int, int, int]:
    return (0, 255, 128) if unsigned else (-128, 127, 0)


def _tables(T: int, unsigned: bool, g: torch.Generator):
    scale = torch.rand(T, generator=g) * 0.05 + 0.01
    zp = torch.randint(90, 160, (T,), generator=g).float() if unsigned else torch.randint(-20, 21, (T,), generator=g).float()
    return scale, zp


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_act_matches_stepq_quantize(unsigned, dtype):
    g = torch.Generator().manual_seed(1)
    qmin, qmax, shift = _act_grid(unsigned)
    scale, zp = _tables(7, unsigned, g)
    x = (torch.randn(13, 37, generator=g) * 2).to(dtype)
    x[0, :5] = torch.tensor([0.0, -0.0, 1e4, -1e4, scale[3].item() * 2.5])  # clamping and a tie
    idx = torch.tensor([3, 5])
    q = E.quantize_act(x, scale, zp, idx, qmin, qmax, shift, E.pad_to(37, E.K_ALIGN))
    assert q.shape == (13, 48) and q.dtype == torch.int8
    ref = ops.quantize(x.float(), scale[3], zp[3], qmin, qmax, dtype=torch.int16)
    assert torch.equal(q[:, :37].to(torch.int16) + shift, ref)
    assert not q[:, 37:].any()


def _w8a8_operands(m, k, n, unsigned, g, bias=True):
    qmin, qmax, shift = _act_grid(unsigned)
    scale, zp = _tables(5, unsigned, g)
    idx = torch.tensor([2])
    x = torch.randn(m, k, generator=g) + (2.0 if unsigned else 0.0)
    wq = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    wq[0, 0] = -128
    ws = torch.rand(n, generator=g) * 0.01 + 1e-3
    b = torch.randn(n, generator=g) if bias else None
    kp, np_ = E.pad_to(k, E.K_ALIGN), E.pad_to(n, E.N_ALIGN)
    wpad = torch.zeros(np_, kp, dtype=torch.int8)
    wpad[:n, :k] = wq
    rowsum = wq.to(torch.int32).sum(1)
    return (x, wpad, rowsum, ws, b, scale, zp, idx, qmin, qmax, shift), wq


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize(("m", "k", "n"), CASES)
def test_w8a8_linear_integer_accumulator_is_exact_and_output_within_fp32_bound(m, k, n, unsigned):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    args, wq = _w8a8_operands(m, k, n, unsigned, g, bias=m % 2 == 0)
    x, wpad, rowsum, ws, b, scale, zp, idx, qmin, qmax, shift = args
    s_t, z_t = scale[2], zp[2]
    a = E.quantize_act(x, scale, zp, idx, qmin, qmax, shift, wpad.shape[1])
    acc = E.w8a8_gemm(a, wpad, n)
    accz = acc + (shift - int(z_t)) * rowsum.to(torch.int64)
    q_ref = ops.quantize(x, s_t, z_t, qmin, qmax, dtype=torch.int64)
    assert torch.equal(accz, (q_ref - int(z_t)) @ wq.to(torch.int64).T)  # the kernel's int32, exactly
    assert accz.abs().max() < 2 ** 31
    y = E.linear_w8a8(*args)
    xd = ops.fake_quant(x, s_t, z_t, qmin, qmax)
    wd = ops.dequantize(wq, ws, torch.zeros(n), 0)
    y_ref = F.linear(xd, wd, b)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert ((y.double() - y_ref.double()).abs() <= _bound(xd, wd, b, k) + 3 * EPS32 * y_ref.double().abs()).all()


def test_w8a8_fp16_output_and_leading_dims():
    g = torch.Generator().manual_seed(3)
    args, wq = _w8a8_operands(6, 40, 10, True, g)
    x = args[0].reshape(2, 3, 40).half()
    y = E.linear_w8a8(x, *args[1:])
    assert y.shape == (2, 3, 10) and y.dtype == torch.float16
    y32 = E.linear_w8a8(x.float(), *args[1:])
    assert torch.equal(y, y32.half())  # the epilogue rounds once, at the end


@pytest.mark.parametrize(("b", "c", "h", "w", "o", "kh", "kw", "stride", "pad", "dil"), [
    (1, 1, 5, 5, 1, 3, 3, (1, 1), (1, 1), (1, 1)),
    (2, 3, 8, 7, 5, 3, 3, (2, 2), (1, 1), (1, 1)),
    (3, 4, 6, 9, 9, 1, 1, (1, 1), (0, 0), (1, 1)),
    (2, 5, 9, 9, 4, 3, 2, (1, 2), (2, 0), (2, 1)),
    (17, 2, 4, 4, 3, 3, 3, (1, 1), (1, 1), (1, 1)),
])
@pytest.mark.parametrize("unsigned", [False, True])
def test_conv2d_w8a8_im2col_integer_sum_is_exact(b, c, h, w, o, kh, kw, stride, pad, dil, unsigned):
    g = torch.Generator().manual_seed(b + c + h)
    qmin, qmax, shift = _act_grid(unsigned)
    scale, zp = _tables(4, unsigned, g)
    idx = torch.tensor([1, 0])
    x = torch.randn(b, c, h, w, generator=g)
    wq = torch.randint(-128, 128, (o, c, kh, kw), generator=g, dtype=torch.int8)
    ws = torch.rand(o, generator=g) * 0.01 + 1e-3
    bias = torch.randn(o, generator=g)
    k = c * kh * kw
    kp, np_ = E.pad_to(k, E.K_ALIGN), E.pad_to(o, E.N_ALIGN)
    wpad = torch.zeros(np_, kp, dtype=torch.int8)
    wpad[:o, :k] = wq.reshape(o, k)
    rowsum = wq.reshape(o, k).to(torch.int32).sum(1)
    y = E.conv2d_w8a8(x, wpad, rowsum, ws, bias, scale, zp, idx, qmin, qmax, shift, kh, kw, stride, pad, dil)
    # the integer sum: im2col with the quantized zero in the border == the float64 convolution of (q − z)
    xq = E.quantize_act(x.reshape(1, -1), scale, zp, idx, qmin, qmax, shift, x.numel()).reshape(x.shape)
    cols = E.im2col(xq, kh, kw, stride, pad, dil, kp, zp, idx, shift)
    zc = shift - int(zp[1])
    accz = E.w8a8_gemm(cols, wpad, o) + zc * rowsum.to(torch.int64)
    q_ref = ops.quantize(x, scale[1], zp[1], qmin, qmax, dtype=torch.int64) - int(zp[1])
    exact = F.conv2d(q_ref.double(), wq.double(), None, stride, pad, dil)
    assert torch.equal(accz.reshape(b, *exact.shape[2:], o).permute(0, 3, 1, 2).double(), exact)
    xd = ops.fake_quant(x, scale[1], zp[1], qmin, qmax)
    wd = ops.dequantize(wq, ws, torch.zeros(o), 0)
    y_ref = F.conv2d(xd, wd, bias, stride, pad, dil)
    bound = (k + 4) * EPS32 * F.conv2d(xd.abs().double(), wd.abs().double(), bias.abs().double(), stride, pad, dil)
    assert y.shape == y_ref.shape
    assert ((y.double() - y_ref.double()).abs() <= bound + 3 * EPS32 * y_ref.abs().double() + 1e-30).all()


# -- weight-only ------------------------------------------------------------------------------------------
def _packed(fmt: str, n: int, k: int, g: torch.Generator):
    """Codes in fmt's grid and the bytes quantize_weights stores for them (ops.pack / pack_base3)."""
    bits, signed = E.FORMATS[fmt]
    if fmt == "base3":
        q = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
        return q, ternary_ops.pack_base3(q), ternary_ops.unpack_base3
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    q = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int16).to(torch.int8 if signed else torch.uint8)
    p = q if bits == 8 else ops.pack(q, bits, signed)
    return q, p, None


def _qparams(n, k, layout, unsigned, g):
    """(scale, zero point, axis, group, sn, gs) in ops.dequantize's layout."""
    if layout == "tensor":
        shape, axis, group, sn, gs = (1,), None, 0, 0, 0
    elif layout == "channel":
        shape, axis, group, sn, gs = (n,), 0, 0, 1, 0
    else:
        gs = layout
        shape, axis, group, sn = (n, math.ceil(k / gs)), 1, gs, math.ceil(k / gs)
    s = torch.rand(shape, generator=g) * 0.1 + 0.01
    z = torch.randint(0, 9, shape, generator=g).float() if unsigned else torch.zeros(shape)
    if unsigned:
        z = z + 0.4  # a zero point that is not an integer is rounded, in the op and in the kernel
    return s, z, axis, group, sn, gs


LAYOUTS = ["tensor", "channel", 3, 7, 16, 32]


@pytest.mark.parametrize("fmt", list(E.FORMATS))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("n", "k"), [(1, 1), (3, 5), (7, 37), (5, 129), (4, 300)])
def test_dequantize_weight_reads_the_stored_layout_bit_for_bit(fmt, layout, n, k):
    g = torch.Generator().manual_seed(n * 31 + k)
    q, p, unpack3 = _packed(fmt, n, k, g)
    s, z, axis, group, sn, gs = _qparams(n, k, layout, not E.FORMATS[fmt][1], g)
    bits, signed = E.FORMATS[fmt]
    if unpack3 is not None:
        unpacked = unpack3(p, [n, k])
    else:
        unpacked = p if bits == 8 else ops.unpack(p, bits, signed, [n, k])
    assert torch.equal(unpacked, q)
    ref = ops.dequantize(unpacked, s, z, axis, group)
    assert torch.equal(torch.from_numpy(E.decode(p, fmt, n, k)), q.to(torch.int32))
    w = E.dequantize_weight(p, s, z, fmt, n, k, sn, gs)
    assert torch.equal(w, ref)
    assert torch.equal(E.dequantize_weight(p, s, z, fmt, n, k, sn, gs, torch.float16), ref.half())


def _gemv_scalar(x: np.ndarray, w: np.ndarray, b: float | None) -> np.float32:
    """The kernel's order for one output, written as the CUDA loop with float32 scalars."""
    k = x.shape[0]
    lanes = []
    for lane in range(32):
        acc = np.float32(0.0)
        for k0 in range(lane * E.CHUNK, k, 32 * E.CHUNK):
            for j in range(E.CHUNK):
                if k0 + j < k:
                    acc = np.float32(acc + np.float32(x[k0 + j] * w[k0 + j]))
        lanes.append(acc)
    for off in (16, 8, 4, 2, 1):
        lanes = [np.float32(lanes[i] + lanes[i ^ off]) for i in range(32)]
    return lanes[0] if b is None else np.float32(lanes[0] + np.float32(b))


@pytest.mark.parametrize(("m", "k", "n"), [(1, 300, 3), (3, 17, 2), (2, 513, 2)])
def test_gemv_emulation_follows_the_kernel_loop_exactly(m, k, n):
    g = torch.Generator().manual_seed(k)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    y = E.weight_only_gemv(x, w, b, torch.float32).numpy()
    for i in range(m):
        for j in range(n):
            assert y[i, j] == _gemv_scalar(x[i].numpy(), w[j].numpy(), float(b[j]))


@pytest.mark.parametrize("fmt", list(E.FORMATS))
@pytest.mark.parametrize(("m", "k", "n"), CASES[::2] + [(16, 257, 5), (17, 257, 5), (40, 100, 9)])
def test_weight_only_linear_within_fp32_bound_of_the_reference(fmt, m, k, n):
    g = torch.Generator().manual_seed(m * 7 + k)
    q, p, unpack3 = _packed(fmt, n, k, g)
    layout = [7, "channel", "tensor", 16][m % 4]
    s, z, axis, group, sn, gs = _qparams(n, k, layout, not E.FORMATS[fmt][1], g)
    x = torch.randn(m, k, generator=g)
    b = torch.randn(n, generator=g) if m % 3 else None
    y = E.linear_weight_only(x, p, s, z, b, fmt, n, k, sn, gs)
    wd = ops.dequantize(q, s, z, axis, group)
    y_ref = F.linear(x, wd, b)
    assert y.shape == (m, n)
    assert ((y.double() - y_ref.double()).abs() <= _bound(x, wd, b, k)).all()


@given(m=st.integers(1, 20), k=st.integers(1, 600), n=st.integers(1, 12), fmt=st.sampled_from(list(E.FORMATS)),
       half=st.booleans())
def test_weight_only_fp16_property(m, k, n, fmt, half):
    g = torch.Generator().manual_seed(m + 100 * k + n)
    q, p, _ = _packed(fmt, n, k, g)
    s, z, axis, group, sn, gs = _qparams(n, k, 5, not E.FORMATS[fmt][1], g)
    x = torch.randn(m, k, generator=g).to(torch.float16 if half else torch.float32)
    y = E.linear_weight_only(x, p, s, z, None, fmt, n, k, sn, gs)
    wd = ops.dequantize(q, s, z, axis, group)
    if m > E.GEMV_MAX_ROWS:
        wd = wd.to(x.dtype).float()  # the GEMM path reads the weight in the activation's type
    y_ref = F.linear(x.float(), wd)
    tol = _bound(x.float(), wd, None, k) + (2.0 ** -11 * y_ref.double().abs() + 2.0 ** -24 if half else 0)
    assert y.dtype == x.dtype and ((y.double() - y_ref.double()).abs() <= tol).all()
