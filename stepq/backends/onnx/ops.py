"""The ONNX backend's own ops: one ``torch.library`` op per ONNX construct the lowering emits.

The placement rewrites (``lower.py``) replace stepq's quantizer ops by these on a copy of the
graph; each has a PyTorch implementation with the ONNX operator's semantics (so the lowered graph
still runs, and is tested, in PyTorch) and an onnxscript translation (``translation.py``):

    quantize_linear(x, s, z, qmin, qmax)      QuantizeLinear (+ Clip when [qmin, qmax] is narrower
                                              than the zero point's dtype, e.g. 4-bit activations)
                                              q = clamp(round(x / s) + z, qmin, qmax)
    dequantize_linear(q, s, z, axis, block)   DequantizeLinear          y = (q − z) · s
    gather_row(table, i)                      Gather(axis 0)            table[i]
    first_element(i)                          Gather(Reshape(i, −1), 0) i.reshape(−1)[0]
    matmul_integer_to_float(a, b, sa, sb, za, zb, bias)
                                              com.microsoft.MatMulIntegerToFloat
                                              y = ((a − za)·sa) @ ((b − zb)·sb) + bias,  b: [K, N]
    conv_integer_to_float(x, w, sx, sw, zx, zw, bias, kernel, stride, padding, dilation, in_hw, out_hw)
                                              im2col (NHWC u8 Gather) → MatMulIntegerToFloat → Transpose
                                              y = conv2d((x − zx)·sx, W, bias),  w = W as [(kh, kw, C), O]
    matmul_nbits(a, b, scales, bias, K, N, bits, block)
                                              com.microsoft.MatMulNBits (weight-only)
                                              y = a @ ((codes − 2^(bits−1))·scale)ᵀ + bias
    int4_weight(packed, shape, signed)        an INT4/UINT4 initializer (post-processing turns the
                                              placeholder into one; see ``postprocess.py``)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from stepq.compiler import ops as core_ops

__all__ = [
    "CONV_INTEGER_TO_FLOAT",
    "DEQUANTIZE_LINEAR",
    "FIRST_ELEMENT",
    "GATHER_ROW",
    "INT4_WEIGHT",
    "MATMUL_INTEGER_TO_FLOAT",
    "MATMUL_NBITS",
    "QUANTIZE_LINEAR",
    "conv_weight_matrix",
    "im2col_indices",
    "nbits_pack",
]

_LIB = torch.library.Library("stepq_onnx", "DEF")
_LIB.define("quantize_linear(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max) -> Tensor")
_LIB.define("dequantize_linear(Tensor q, Tensor scale, Tensor zero_point, int? axis=None, int block_size=0) -> Tensor")
_LIB.define("gather_row(Tensor table, Tensor index) -> Tensor")
_LIB.define("first_element(Tensor x) -> Tensor")
_LIB.define("matmul_integer_to_float(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale, Tensor a_zero_point, "
            "Tensor? b_zero_point, Tensor? bias) -> Tensor")
_LIB.define("conv_integer_to_float(Tensor x, Tensor w, Tensor x_scale, Tensor w_scale, Tensor x_zero_point, "
            "Tensor? w_zero_point, Tensor? bias, int[] kernel, int[] stride, int[] padding, int[] dilation, "
            "int[] in_hw, int[] out_hw) -> Tensor")
_LIB.define("matmul_nbits(Tensor a, Tensor b, Tensor scales, Tensor? bias, int k, int n, int bits, "
            "int block_size) -> Tensor")
_LIB.define("int4_weight(Tensor packed, int[] shape, bool signed) -> Tensor")


def _impl(name: str):
    return torch.library.impl(_LIB, name, "CompositeExplicitAutograd")


# -- Q / DQ -----------------------------------------------------------------------------------------
@_impl("quantize_linear")
def _quantize_linear(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int) -> Tensor:
    q = torch.round(x / scale.to(x.dtype)) + zero_point.to(x.dtype)
    return torch.clamp(q, quant_min, quant_max).to(zero_point.dtype)


@torch.library.register_fake("stepq_onnx::quantize_linear")
def _quantize_linear_fake(x, scale, zero_point, quant_min, quant_max):
    return torch.empty_like(x, dtype=zero_point.dtype)


@_impl("dequantize_linear")
def _dequantize_linear(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None = None,
                       block_size: int = 0) -> Tensor:
    s = core_ops.expand_qparam(scale, q.shape, axis, block_size).float()
    z = core_ops.expand_qparam(zero_point, q.shape, axis, block_size).float()
    return (q.float() - z) * s


@torch.library.register_fake("stepq_onnx::dequantize_linear")
def _dequantize_linear_fake(q, scale, zero_point, axis=None, block_size=0):
    return torch.empty_like(q, dtype=torch.float32)


# -- timestep tables --------------------------------------------------------------------------------
@_impl("gather_row")
def _gather_row(table: Tensor, index: Tensor) -> Tensor:
    return table[index]


@torch.library.register_fake("stepq_onnx::gather_row")
def _gather_row_fake(table, index):
    return table.new_empty((*index.shape, *table.shape[1:]))


@_impl("first_element")
def _first_element(x: Tensor) -> Tensor:
    return x.reshape(-1)[0].clone()


@torch.library.register_fake("stepq_onnx::first_element")
def _first_element_fake(x):
    return x.new_empty(())


# -- integer matmul / conv --------------------------------------------------------------------------
def _deq(q: Tensor, scale: Tensor, zero_point: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    z = zero_point.float().reshape(shape) if zero_point is not None else 0.0
    return (q.float() - z) * scale.float().reshape(shape)


@_impl("matmul_integer_to_float")
def _matmul_integer_to_float(a: Tensor, b: Tensor, a_scale: Tensor, b_scale: Tensor, a_zero_point: Tensor,
                             b_zero_point: Tensor | None, bias: Tensor | None) -> Tensor:
    x = _deq(a, a_scale, a_zero_point, ())
    w = _deq(b, b_scale, b_zero_point, (1, -1) if b_scale.numel() > 1 else ())
    y = x @ w
    return y + bias if bias is not None else y


@torch.library.register_fake("stepq_onnx::matmul_integer_to_float")
def _matmul_integer_to_float_fake(a, b, a_scale, b_scale, a_zero_point, b_zero_point, bias):
    return a.new_empty((*a.shape[:-1], b.shape[-1]), dtype=torch.float32)


def conv_weight_matrix(w: Tensor) -> Tensor:
    """[O, C, kh, kw] → [(kh, kw, C), O], the row order of the NHWC im2col."""
    o = w.shape[0]
    return w.permute(2, 3, 1, 0).reshape(-1, o).contiguous()


def im2col_indices(in_hw: list[int], out_hw: list[int], kernel: list[int], stride: list[int], padding: list[int],
                   dilation: list[int]) -> Tensor:
    """[Ho·Wo, kh·kw] int32 positions in the padded, flattened (Hp·Wp) NHWC input, tap order (ky, kx)."""
    wp = in_hw[1] + 2 * padding[1]
    oy = torch.arange(out_hw[0]).reshape(-1, 1, 1, 1) * stride[0]
    ox = torch.arange(out_hw[1]).reshape(1, -1, 1, 1) * stride[1]
    ky = torch.arange(kernel[0]).reshape(1, 1, -1, 1) * dilation[0]
    kx = torch.arange(kernel[1]).reshape(1, 1, 1, -1) * dilation[1]
    return ((oy + ky) * wp + ox + kx).reshape(out_hw[0] * out_hw[1], kernel[0] * kernel[1]).to(torch.int32)


def _conv_weight(w_mat: Tensor, kernel: list[int]) -> Tensor:
    kh, kw = kernel
    k, o = w_mat.shape
    return w_mat.reshape(kh, kw, k // (kh * kw), o).permute(3, 2, 0, 1)


@_impl("conv_integer_to_float")
def _conv_integer_to_float(x: Tensor, w: Tensor, x_scale: Tensor, w_scale: Tensor, x_zero_point: Tensor,
                           w_zero_point: Tensor | None, bias: Tensor | None, kernel: list[int], stride: list[int],
                           padding: list[int], dilation: list[int], in_hw: list[int], out_hw: list[int]) -> Tensor:
    xd = _deq(x, x_scale, x_zero_point, ())
    wd = _deq(_conv_weight(w, kernel), w_scale, w_zero_point, (-1, 1, 1, 1) if w_scale.numel() > 1 else ())
    return torch.nn.functional.conv2d(xd, wd, bias, stride, padding, dilation)


@torch.library.register_fake("stepq_onnx::conv_integer_to_float")
def _conv_integer_to_float_fake(x, w, x_scale, w_scale, x_zero_point, w_zero_point, bias, kernel, stride, padding,
                                dilation, in_hw, out_hw):
    return x.new_empty((x.shape[0], w.shape[1], *out_hw), dtype=torch.float32)


# -- weight-only low-bit matmul -----------------------------------------------------------------------
def nbits_pack(q: Tensor, bits: int, block_size: int) -> tuple[Tensor, int]:
    """Signed integer weights [N, K] → MatMulNBits' B [N, k_blocks, blob] (unsigned codes q + 2^(b−1),
    LSB first within each block; K padded with the zero code). Returns (B, k_blocks)."""
    n, k = q.shape
    blocks = math.ceil(k / block_size)
    codes = q.to(torch.int16) + (1 << (bits - 1))
    if blocks * block_size != k:
        pad = codes.new_full((n, blocks * block_size - k), 1 << (bits - 1))
        codes = torch.cat([codes, pad], dim=1)
    packed = core_ops.pack(codes.to(torch.uint8), bits, signed=False)
    return packed.reshape(n, blocks, block_size * bits // 8), blocks


def _nbits_unpack(b: Tensor, k: int, n: int, bits: int, block_size: int) -> Tensor:
    blocks = b.shape[1]
    codes = core_ops.unpack(b.reshape(-1), bits, False, [n * blocks * block_size]).to(torch.int16)
    return (codes - (1 << (bits - 1))).reshape(n, blocks, block_size)


@_impl("matmul_nbits")
def _matmul_nbits(a: Tensor, b: Tensor, scales: Tensor, bias: Tensor | None, k: int, n: int, bits: int,
                  block_size: int) -> Tensor:
    q = _nbits_unpack(b, k, n, bits, block_size)
    w = (q.float() * scales.float().reshape(n, -1, 1)).reshape(n, -1)[:, :k]
    y = a @ w.t()
    return y + bias if bias is not None else y


@torch.library.register_fake("stepq_onnx::matmul_nbits")
def _matmul_nbits_fake(a, b, scales, bias, k, n, bits, block_size):
    return a.new_empty((*a.shape[:-1], n))


# -- sub-byte initializers ----------------------------------------------------------------------------
@_impl("int4_weight")
def _int4_weight(packed: Tensor, shape: list[int], signed: bool) -> Tensor:
    return core_ops.unpack(packed, 4, signed, shape)


@torch.library.register_fake("stepq_onnx::int4_weight")
def _int4_weight_fake(packed, shape, signed):
    return packed.new_empty(shape, dtype=torch.int8 if signed else torch.uint8)


QUANTIZE_LINEAR = torch.ops.stepq_onnx.quantize_linear.default
DEQUANTIZE_LINEAR = torch.ops.stepq_onnx.dequantize_linear.default
GATHER_ROW = torch.ops.stepq_onnx.gather_row.default
FIRST_ELEMENT = torch.ops.stepq_onnx.first_element.default
MATMUL_INTEGER_TO_FLOAT = torch.ops.stepq_onnx.matmul_integer_to_float.default
CONV_INTEGER_TO_FLOAT = torch.ops.stepq_onnx.conv_integer_to_float.default
MATMUL_NBITS = torch.ops.stepq_onnx.matmul_nbits.default
INT4_WEIGHT = torch.ops.stepq_onnx.int4_weight.default
