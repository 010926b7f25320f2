"""The kernels on a CUDA device against their CPU emulation, and a lowered model against the
reference backend. Marked ``gpu``: skipped where there is no device (scripts/gpu-check.sh runs them).

Bit for bit: quantize_act, the W8A8 GEMM (dp4a GEMV and cuBLASLt int8 + epilogue: integer sums),
im2col, the weight dequantisation and the weight-only GEMV (M ≤ 16: the emulation follows the
kernel's order). Within a bound: the weight-only GEMM path (cuBLAS's order is its own) and the whole
model (the surrounding PyTorch ops run on the device).
"""

from __future__ import annotations

import pytest
import torch

from stepq.cuda import emulate as E

runtime = pytest.importorskip("stepq.cuda.runtime")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not runtime.device_available(), reason="needs a CUDA device, cupy and a CUDA build of torch"),
]

ROWS = [1, 2, 3, 8, 9, 16, 17, 33, 256]


def _w8a8_args(m, k, n, unsigned, g):
    qmin, qmax, shift = (0, 255, 128) if unsigned else (-128, 127, 0)
    T = 6
    scale = torch.rand(T, generator=g) * 0.05 + 0.01
    zp = torch.randint(100, 150, (T,), generator=g).float() if unsigned else torch.zeros(T)
    x = torch.randn(m, k, generator=g) + (2.0 if unsigned else 0.0)
    wq = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    w = torch.zeros(E.pad_to(n, E.N_ALIGN), E.pad_to(k, E.K_ALIGN), dtype=torch.int8)
    w[:n, :k] = wq
    return [x, w, wq.to(torch.int32).sum(1), torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g),
            scale, zp, torch.tensor([4, 1]), qmin, qmax, shift]


def _cuda(args):
    return [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize(("k", "n"), [(37, 11), (1152, 1152), (300, 4608)])
def test_w8a8_linear_bit_for_bit(m, k, n, unsigned, dtype):
    g = torch.Generator().manual_seed(m + k)
    args = _w8a8_args(m, k, n, unsigned, g)
    args[0] = args[0].to(dtype)
    y_cpu = E.linear_w8a8(*args)
    y_gpu = runtime.linear_w8a8(*_cuda(args))
    assert torch.equal(y_gpu.cpu(), y_cpu)


@pytest.mark.parametrize("shape", [(2, 3, 8, 7, 5, 3, 3, (2, 2), (1, 1), (1, 1)), (4, 32, 16, 16, 64, 3, 3, (1, 1), (1, 1), (1, 1)),
                                   (1, 5, 9, 9, 4, 3, 2, (1, 2), (2, 0), (2, 1))])
def test_conv2d_w8a8_bit_for_bit(shape):
    b, c, h, w, o, kh, kw, stride, pad, dil = shape
    g = torch.Generator().manual_seed(c)
    args = _w8a8_args(1, c * kh * kw, o, True, g)
    x = torch.randn(b, c, h, w, generator=g)
    full = [x, *args[1:], kh, kw, stride, pad, dil]
    assert torch.equal(runtime.conv2d_w8a8(*_cuda(full)).cpu(), E.conv2d_w8a8(*full))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt", list(E.FORMATS))
@pytest.mark.parametrize("m", [1, 5, 16, 17, 256])
@pytest.mark.parametrize(("k", "n", "gs"), [(37, 11, 7), (4608, 1152, 128), (1152, 4608, 0)])
def test_weight_only_linear_against_emulation(fmt, m, k, n, gs, dtype):
    from test_cuda_emulation import _packed

    g = torch.Generator().manual_seed(m * 3 + k)
    _, p, _ = _packed(fmt, n, k, g)
    groups = -(-k // gs) if gs else 1
    s = torch.rand(n * groups, generator=g) * 0.05 + 0.01
    z = torch.zeros(n * groups) if E.FORMATS[fmt][1] else torch.randint(0, 4, (n * groups,), generator=g).float()
    sn = groups if gs else 1
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g)
    args = [x, p, s, z, bias, fmt, n, k, sn, gs]
    y_cpu = E.linear_weight_only(*args)
    y_gpu = runtime.linear_weight_only(*_cuda(args)).cpu()
    if m <= E.GEMV_MAX_ROWS:
        assert torch.equal(y_gpu, y_cpu)
    else:  # dequantize_weight (bit for bit) + cuBLAS (its own order)
        w = E.dequantize_weight(p, s, z, fmt, n, k, sn, gs, dtype).float()
        mag = x.float().abs() @ w.abs().T + bias.abs()
        bound = (k + 4) * 2.0 ** -24 * mag
        if dtype == torch.float16:  # both round the output to fp16 (≤ 1 ulp apart); cuBLAS may reduce split-K
            bound = 2.0 ** -10 * y_cpu.float().abs() + 2.0 ** -11 * mag  # partial sums in fp16 (torch's default)
        assert ((y_gpu.float() - y_cpu.float()).abs() <= bound + 1e-6).all()


def test_w8a8_linear_does_not_synchronise_with_the_host():
    g = torch.Generator().manual_seed(0)
    args = _cuda(_w8a8_args(4, 64, 32, True, g))
    runtime.linear_w8a8(*args)  # compile the module first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            runtime.linear_w8a8(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize(("kind", "recipe"), [("unet", "w8a8"), ("dit", "w8a8"), ("dit", "w4a8")])
def test_lowered_model_on_the_device_matches_the_reference(kind, recipe):
    from helpers import calib_set

    import stepq
    from stepq.backends import get_backend
    from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser

    m = build_random_denoiser(RandomDenoiserConfig(kind=kind, depth=1))
    data = calib_set(2)
    qm = stepq.quantize(m, data[0], recipe, calibration=data, progress=False)
    be = get_backend("cupy")
    with torch.no_grad():
        y_ref = qm(**data[1])
        y_gpu = be.model(qm, device="cuda")(**data[1]).cpu()
        y_emu = be.model(qm, device="cpu")(**data[1])
    # an activation within rounding of a level boundary may quantize one level apart (test_cupy_backend's
    # MODEL_TOL); a wrong index, layout or zero point is of order 1
    rel = ((y_gpu - y_ref).norm() / y_ref.norm()).item()
    assert rel < 1e-2, rel
    assert ((y_gpu - y_emu).norm() / y_ref.norm()).item() < 1e-2
