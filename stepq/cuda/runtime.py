"""The kernels on a CUDA device: ``cupy.RawModule`` loaders and one launcher per operation.

    y = linear_w8a8(x, w, rowsum, w_scale, bias, a_scale, a_zero_point, index, qmin, qmax, shift)

Every launcher takes and returns torch tensors on the device. They reach the kernels through DLPack
(``cupy.from_dlpack``: the same memory, no copy) and the kernels run on torch's current stream
(``cupy.cuda.ExternalStream``), so they order with the surrounding PyTorch ops and nothing waits on
the host. The launchers' steps are the ones ``stepq.cuda.emulate``'s ``linear_*`` / ``conv2d_w8a8``
take on the CPU. Without CuPy, a driver or a device, ``require_device`` raises ``NoDeviceError``.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stepq.compiler.errors import NoDeviceError
from stepq.cuda import source
from stepq.cuda.emulate import GEMV_MAX_ROWS

__all__ = ["conv2d_w8a8", "device_available", "linear_w8a8", "linear_weight_only", "require_device"]

_THREADS = 256
_WARPS = _THREADS // 32
_MR = 8  # activation rows per block row of the GEMV kernels (MR in the sources)
_MAX_BLOCKS = 65535


def require_device() -> Any:
    """The cupy module, once a CUDA device answers; ``NoDeviceError`` saying what is missing otherwise."""
    try:
        import cupy
    except ImportError as e:
        raise NoDeviceError("the CuPy kernels need cupy (pip install 'stepq[gpu]': cupy-cuda13x)") from e
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver (cudaErrorInsufficientDriver) or no device
        raise NoDeviceError(f"the CuPy kernels need a CUDA device; CuPy reports: {e}") from e
    if count < 1 or not torch.cuda.is_available():
        raise NoDeviceError("the CuPy kernels need a CUDA device and a CUDA build of PyTorch "
                            f"(cupy sees {count} device(s), torch.cuda.is_available() = {torch.cuda.is_available()})")
    return cupy


def device_available() -> bool:
    try:
        require_device()
    except NoDeviceError:
        return False
    return True


@functools.cache
def _module(name: str, device: int) -> Any:
    cupy = require_device()
    with cupy.cuda.Device(device):
        return cupy.RawModule(code=source(name), options=("--std=c++17",), backend="nvrtc")


def _kernel(file: str, entry: str, device: int) -> Any:
    return _module(file, device).get_function(entry)


def _suffix(t: Tensor) -> str:
    return "f16" if t.dtype == torch.float16 else "f32"


def _arg(t: Tensor | None) -> Any:
    import cupy

    if t is None:
        return np.uint64(0)  # a null pointer
    return cupy.from_dlpack(t.detach())


def _launch(file: str, entry: str, like: Tensor, grid: tuple[int, ...], args: tuple[Any, ...]) -> None:
    cupy = require_device()
    dev = like.device.index if like.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(like.device).cuda_stream
    with cupy.cuda.Device(dev), cupy.cuda.ExternalStream(stream):
        kernel = _kernel(file, entry, dev)
        kernel(grid, (_THREADS,), tuple(a if not isinstance(a, Tensor) and a is not None else _arg(a) for a in args))


def _blocks(n: int) -> tuple[int]:
    return (max(1, min(-(-n // _THREADS), _MAX_BLOCKS)),)


def _compute_dtype(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float16, torch.float32) else x.float()


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous().reshape(-1)


def _quantize(x2: Tensor, a_scale: Tensor, a_zero_point: Tensor, index: Tensor | None, qmin: int, qmax: int,
              shift: int, kp: int) -> Tensor:
    rows, k = x2.shape
    q = torch.empty(rows, kp, dtype=torch.int8, device=x2.device)
    _launch("quantize_act.cu", f"quantize_act_{_suffix(x2)}", x2, _blocks(rows * kp),
            (x2, q, np.int64(rows), np.int32(k), np.int32(kp), _f32(a_scale), _f32(a_zero_point), index,
             np.int32(qmin), np.int32(qmax), np.int32(shift)))
    return q


def _w8a8_gemm(a: Tensor, w: Tensor, rowsum: Tensor, w_scale: Tensor, bias: Tensor | None, a_scale: Tensor,
               a_zero_point: Tensor, index: Tensor | None, shift: int, out_dtype: torch.dtype) -> Tensor:
    m, kp = a.shape
    n = w_scale.numel()
    y = torch.empty(m, n, dtype=out_dtype, device=a.device)
    t = "f16" if out_dtype == torch.float16 else "f32"
    common = (rowsum, _f32(w_scale), _f32(bias), _f32(a_scale), _f32(a_zero_point), index, np.int32(shift),
              np.int32(m), np.int32(n))
    if m > GEMV_MAX_ROWS and hasattr(torch, "_int_mm"):
        acc = torch._int_mm(a, w.t())  # cuBLASLt int8 tensor cores: [M, Np] int32
        _launch("w8a8.cu", f"w8a8_epilogue_{t}", a, _blocks(m * n), (acc, np.int32(acc.shape[1]), *common, y))
    else:
        grid = (-(-n // _WARPS), -(-m // _MR))
        _launch("w8a8.cu", f"w8a8_gemv_dp4a_{t}", a, grid,
                (a.view(torch.int32), w.view(torch.int32), *common, np.int32(kp // 4), y))
    return y


def linear_w8a8(x: Tensor, w: Tensor, rowsum: Tensor, w_scale: Tensor, bias: Tensor | None, a_scale: Tensor,
                a_zero_point: Tensor, index: Tensor | None, qmin: int, qmax: int, shift: int) -> Tensor:
    xc = _compute_dtype(x)
    k, n = x.shape[-1], w_scale.numel()
    x2 = xc.reshape(-1, k).contiguous()
    a = _quantize(x2, a_scale, a_zero_point, index, qmin, qmax, shift, w.shape[1])
    y = _w8a8_gemm(a, w, rowsum, w_scale, bias, a_scale, a_zero_point, index, shift, xc.dtype)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def conv2d_w8a8(x: Tensor, w: Tensor, rowsum: Tensor, w_scale: Tensor, bias: Tensor | None, a_scale: Tensor,
                a_zero_point: Tensor, index: Tensor | None, qmin: int, qmax: int, shift: int, kh: int, kw: int,
                stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    xc = _compute_dtype(x).contiguous()
    b, c, h, wd = xc.shape
    n, kp = w_scale.numel(), w.shape[1]
    xq = _quantize(xc.reshape(1, -1), a_scale, a_zero_point, index, qmin, qmax, shift, xc.numel())
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = torch.empty(b * oh * ow, kp, dtype=torch.int8, device=x.device)
    _launch("im2col.cu", "im2col_s8", x, _blocks(cols.numel()),
            (xq, cols, *(np.int32(v) for v in (b, c, h, wd, kh, kw, oh, ow, *stride, *padding, *dilation, kp)),
             _f32(a_zero_point), index, np.int32(shift)))
    y = _w8a8_gemm(cols, w, rowsum, w_scale, bias, a_scale, a_zero_point, index, shift, xc.dtype)
    return y.reshape(b, oh, ow, n).permute(0, 3, 1, 2).contiguous().to(x.dtype)


def linear_weight_only(x: Tensor, packed: Tensor, scale: Tensor, zero_point: Tensor, bias: Tensor | None,
                       fmt: str, n: int, k: int, sn: int, gs: int) -> Tensor:
    xc = _compute_dtype(x)
    x2 = xc.reshape(-1, k).contiguous()
    m = x2.shape[0]
    t = _suffix(x2)
    qp = (_f32(scale), _f32(zero_point))
    if m <= GEMV_MAX_ROWS:
        y = torch.empty(m, n, dtype=xc.dtype, device=x.device)
        _launch("weight_only.cu", f"weight_only_gemv_{fmt}_{t}", x2, (-(-n // _WARPS), -(-m // _MR)),
                (x2, packed, *qp, _f32(bias), np.int32(m), np.int32(n), np.int32(k), np.int32(sn), np.int32(gs), y))
    else:
        w = torch.empty(n, k, dtype=xc.dtype, device=x.device)
        _launch("weight_only.cu", f"dequantize_weight_{fmt}_{t}", x2, _blocks(n * k),
                (packed, *qp, np.int32(n), np.int32(k), np.int32(sn), np.int32(gs), w))
        y = F.linear(x2, w, None if bias is None else bias.to(xc.dtype))
    return y.reshape(*x.shape[:-1], n).to(x.dtype)

