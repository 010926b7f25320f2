"""The CuPy backend's ops: one ``torch.library`` op per kernel launch sequence, namespace ``stepq_cupy``.

Each op has two implementations: on CUDA tensors the kernels (``stepq.cuda.runtime``: cupy.RawModule,
DLPack, torch's stream), on CPU tensors their emulation (``stepq.cuda.emulate``: the same layout and
arithmetic). A lowered graph therefore runs, and is tested against the reference backend, on a
machine without a GPU.

    linear_w8a8(x, w, rowsum, w_scale, bias, a_scale, a_zero_point, index, qmin, qmax, shift)
        quantize x with (a_scale[t], a_zero_point[t]), t = index[0], then int8 × int8 → int32 with the
        fused epilogue; w [Np, Kp] int8 (rows padded), rowsum [N] int32, w_scale [N]
    conv2d_w8a8(..., kh, kw, stride, padding, dilation)      the same through int8 im2col
    linear_weight_only(x, packed, scale, zero_point, bias, fmt, n, k, sn, gs)
        packed low-bit weight (fmt: s8 u8 s4 u4 s2 u2 base3, quantize_weights' flat layout) × float x
    timestep_index(t, num_train_timesteps, scale)
        the table row of every sample, clamped to [0, T−1] on the device (no host synchronisation:
        the reference op's range check reads the value on the host)
"""

from __future__ import annotations

import torch
from torch import Tensor

from stepq.cuda import emulate

__all__ = ["CONV2D_W8A8", "LINEAR_W8A8", "LINEAR_WEIGHT_ONLY", "TIMESTEP_INDEX"]

_LIB = torch.library.Library("stepq_cupy", "DEF")
_LIB.define("linear_w8a8(Tensor x, Tensor w, Tensor rowsum, Tensor w_scale, Tensor? bias, Tensor a_scale, "
            "Tensor a_zero_point, Tensor? index, int qmin, int qmax, int shift) -> Tensor")
_LIB.define("conv2d_w8a8(Tensor x, Tensor w, Tensor rowsum, Tensor w_scale, Tensor? bias, Tensor a_scale, "
            "Tensor a_zero_point, Tensor? index, int qmin, int qmax, int shift, int kh, int kw, int[] stride, "
            "int[] padding, int[] dilation) -> Tensor")
_LIB.define("linear_weight_only(Tensor x, Tensor packed, Tensor scale, Tensor zero_point, Tensor? bias, str fmt, "
            "int n, int k, int sn, int gs) -> Tensor")
_LIB.define("timestep_index(Tensor t, int num_train_timesteps, float scale) -> Tensor")


def _runtime():
    from stepq.cuda import runtime

    return runtime


def _pair(v: list[int]) -> tuple[int, int]:
    return int(v[0]), int(v[1])


# -- CPU: the emulation ------------------------------------------------------------------------------------
@torch.library.impl(_LIB, "linear_w8a8", "CPU")
def _linear_w8a8_cpu(x, w, rowsum, w_scale, bias, a_scale, a_zero_point, index, qmin, qmax, shift):
    return emulate.linear_w8a8(x, w, rowsum, w_scale, bias, a_scale, a_zero_point, index, qmin, qmax, shift)


@torch.library.impl(_LIB, "conv2d_w8a8", "CPU")
def _conv2d_w8a8_cpu(x, w, rowsum, w_scale, bias, a_scale, a_zero_point, index, qmin, qmax, shift, kh, kw,
                     stride, padding, dilation):
    return emulate.conv2d_w8a8(x, w, rowsum, w_scale, bias, a_scale, a_zero_point, index, qmin, qmax, shift, kh, kw,
                               _pair(stride), _pair(padding), _pair(dilation))


@torch.library.impl(_LIB, "linear_weight_only", "CPU")
def _linear_weight_only_cpu(x, packed, scale, zero_point, bias, fmt, n, k, sn, gs):
    return emulate.linear_weight_only(x, packed, scale, zero_point, bias, fmt, n, k, sn, gs)


# -- CUDA: the kernels -------------------------------------------------------------------------------------
@torch.library.impl(_LIB, "linear_w8a8", "CUDA")
def _linear_w8a8_cuda(x, w, rowsum, w_scale, bias, a_scale, a_zero_point, index, qmin, qmax, shift):
    return _runtime().linear_w8a8(x, w, rowsum, w_scale, bias, a_scale, a_zero_point, index, qmin, qmax, shift)


@torch.library.impl(_LIB, "conv2d_w8a8", "CUDA")
def _conv2d_w8a8_cuda(x, w, rowsum, w_scale, bias, a_scale, a_zero_point, index, qmin, qmax, shift, kh, kw,
                      stride, padding, dilation):
    return _runtime().conv2d_w8a8(x, w, rowsum, w_scale, bias, a_scale, a_zero_point, index, qmin, qmax, shift,
                                  kh, kw, _pair(stride), _pair(padding), _pair(dilation))


@torch.library.impl(_LIB, "linear_weight_only", "CUDA")
def _linear_weight_only_cuda(x, packed, scale, zero_point, bias, fmt, n, k, sn, gs):
    return _runtime().linear_weight_only(x, packed, scale, zero_point, bias, fmt, n, k, sn, gs)


@torch.library.impl(_LIB, "timestep_index", "CompositeExplicitAutograd")
def _timestep_index(t: Tensor, num_train_timesteps: int, scale: float) -> Tensor:
    v = t.detach()
    if v.dtype.is_floating_point or scale != 1.0:
        v = torch.round(v.double() * scale)
    return v.to(torch.int64).clamp(0, num_train_timesteps - 1)


# -- shapes ------------------------------------------------------------------------------------------------
@torch.library.register_fake("stepq_cupy::linear_w8a8")
def _linear_w8a8_fake(x, w, rowsum, w_scale, bias, a_scale, a_zero_point, index, qmin, qmax, shift):
    return x.new_empty((*x.shape[:-1], w_scale.numel()))


@torch.library.register_fake("stepq_cupy::conv2d_w8a8")
def _conv2d_w8a8_fake(x, w, rowsum, w_scale, bias, a_scale, a_zero_point, index, qmin, qmax, shift, kh, kw,
                      stride, padding, dilation):
    b, _, h, wd = x.shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((b, w_scale.numel(), oh, ow))


@torch.library.register_fake("stepq_cupy::linear_weight_only")
def _linear_weight_only_fake(x, packed, scale, zero_point, bias, fmt, n, k, sn, gs):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("stepq_cupy::timestep_index")
def _timestep_index_fake(t, num_train_timesteps, scale):
    return torch.empty_like(t, dtype=torch.int64)


LINEAR_W8A8 = torch.ops.stepq_cupy.linear_w8a8.default
CONV2D_W8A8 = torch.ops.stepq_cupy.conv2d_w8a8.default
LINEAR_WEIGHT_ONLY = torch.ops.stepq_cupy.linear_weight_only.default
TIMESTEP_INDEX = torch.ops.stepq_cupy.timestep_index.default
