"""The custom translation table: stepq's ONNX-backend ops → ONNX (onnxscript, opset 21).

``torch.onnx.export(..., dynamo=True, custom_translation_table=TRANSLATION_TABLE, opset_version=21)``.
The ONNX Runtime contrib ops (``com.microsoft``) have no schema in the ``onnx`` package, so their
schemas are declared here (inputs, outputs, attributes as ORT defines them) for onnxscript's tracer.

Each function states the ONNX it emits; the math is in ``ops.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx
import onnxscript
import torch
from onnx.defs import OpSchema
from onnxscript import opset21

from stepq.backends.onnx import ops as onnx_ops
from stepq.compiler import ops as core_ops

__all__ = ["EXPORT_DOMAIN", "INT4_WEIGHT_OP", "MSFT_DOMAIN", "TRANSLATION_TABLE"]

#: onnxscript's typed opset; its type variables reject the exporter's symbolic tensors, so it is used untyped.
op: Any = opset21

MSFT_DOMAIN = "com.microsoft"
#: the domain of placeholder nodes that ``postprocess`` replaces (none survives export).
EXPORT_DOMAIN = "ai.stepq.export"
INT4_WEIGHT_OP = "Int4Weight"

_P = OpSchema.FormalParameter
_OPT = OpSchema.FormalParameterOption.Optional
_INT8 = ["tensor(int8)", "tensor(uint8)"]


def _schema(name: str, domain: str, inputs: list[Any], outputs: list[Any], types: list[tuple[str, list[str]]],
            attributes: Sequence[Any] = ()) -> OpSchema:
    return OpSchema(name, domain, 1, inputs=inputs, outputs=outputs,
                    type_constraints=[(t, allowed, "") for t, allowed in types], attributes=list(attributes))


_MIF_SCHEMA = _schema(
    "MatMulIntegerToFloat", MSFT_DOMAIN,
    [_P("A", "T1"), _P("B", "T2"), _P("a_scale", "T3"), _P("b_scale", "T3"),
     _P("a_zero_point", "T1", param_option=_OPT), _P("b_zero_point", "T2", param_option=_OPT),
     _P("bias", "T3", param_option=_OPT)],
    [_P("Y", "T3")], [("T1", _INT8), ("T2", _INT8), ("T3", ["tensor(float)"])])

_NBITS_SCHEMA = _schema(
    "MatMulNBits", MSFT_DOMAIN,
    [_P("A", "T1"), _P("B", "T2"), _P("scales", "T1"), _P("zero_points", "T3", param_option=_OPT),
     _P("g_idx", "T4", param_option=_OPT), _P("bias", "T1", param_option=_OPT)],
    [_P("Y", "T1")],
    [("T1", ["tensor(float)"]), ("T2", ["tensor(uint8)"]), ("T3", ["tensor(uint8)", "tensor(float)"]),
     ("T4", ["tensor(int32)"])],
    [OpSchema.Attribute("K", OpSchema.AttrType.INT, ""), OpSchema.Attribute("N", OpSchema.AttrType.INT, ""),
     OpSchema.Attribute("bits", OpSchema.AttrType.INT, ""), OpSchema.Attribute("block_size", OpSchema.AttrType.INT, ""),
     OpSchema.Attribute("accuracy_level", OpSchema.AttrType.INT, "", required=False)])

_INT4_SCHEMA = _schema(
    INT4_WEIGHT_OP, EXPORT_DOMAIN, [_P("packed", "T1")], [_P("Y", "T2")],
    [("T1", ["tensor(uint8)"]), ("T2", _INT8)],
    [OpSchema.Attribute("shape", OpSchema.AttrType.INTS, ""), OpSchema.Attribute("signed", OpSchema.AttrType.INT, "")])

_MSFT = onnxscript.values.Opset(MSFT_DOMAIN, 1)
_EXPORT = onnxscript.values.Opset(EXPORT_DOMAIN, 1)
_MatMulIntegerToFloat = onnxscript.values.Op(_MSFT, "MatMulIntegerToFloat", _MIF_SCHEMA)
_MatMulNBits = onnxscript.values.Op(_MSFT, "MatMulNBits", _NBITS_SCHEMA)
_Int4Weight = onnxscript.values.Op(_EXPORT, INT4_WEIGHT_OP, _INT4_SCHEMA)


def _i64(values: list[int]):
    return op.Constant(value_ints=list(values))


# -- Q / DQ -----------------------------------------------------------------------------------------
def quantize_linear(x, scale, zero_point, quant_min: int, quant_max: int):
    """QuantizeLinear; a Clip on the integer tensor when the grid is narrower than its dtype."""
    q = op.QuantizeLinear(x, scale, zero_point)
    full = (0, 255) if quant_min >= 0 else (-128, 127)
    if (quant_min, quant_max) != full:
        lo = op.CastLike(op.Constant(value_int=quant_min), zero_point)
        hi = op.CastLike(op.Constant(value_int=quant_max), zero_point)
        q = op.Clip(q, lo, hi)
    return q


def dequantize_linear(q, scale, zero_point, axis: int | None = None, block_size: int = 0):
    """DequantizeLinear (per tensor, per axis, or blocked along ``axis``)."""
    if axis is None:
        return op.DequantizeLinear(q, scale, zero_point)
    if block_size:
        return op.DequantizeLinear(q, scale, zero_point, axis=axis, block_size=block_size)
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


# -- timestep tables --------------------------------------------------------------------------------
def gather_row(table, index):
    """Gather(table, index, axis=0): the row of a timestep table."""
    return op.Gather(table, index, axis=0)


def first_element(x):
    """Gather(Reshape(x, [-1]), 0): a batch shares its first timestep (0-d result)."""
    return op.Gather(op.Reshape(x, _i64([-1])), op.Constant(value_int=0), axis=0)


def timestep_index(t, num_train_timesteps: int, scale: float, clamp: bool):
    """Cast(double) · scale → Round (half to even) → Cast(int64) → Clip to [0, T − 1].

    ONNX cannot raise, so an out-of-range timestep always clamps (the reference backend raises
    unless the recipe's timestep_policy is "clamp"); t = T maps to T − 1 in both."""
    v = op.Cast(t, to=onnx.TensorProto.DOUBLE)
    if scale != 1.0:
        v = op.Mul(v, op.Constant(value=onnx.helper.make_tensor("scale", onnx.TensorProto.DOUBLE, [], [float(scale)])))
    idx = op.Cast(op.Round(v), to=onnx.TensorProto.INT64)
    return op.Clip(idx, op.Constant(value_int=0), op.Constant(value_int=num_train_timesteps - 1))


# -- integer kernels --------------------------------------------------------------------------------
def matmul_integer_to_float(a, b, a_scale, b_scale, a_zero_point, b_zero_point=None, bias=None):
    """com.microsoft.MatMulIntegerToFloat(A u8/s8, B s8 [K, N] constant, scales, zero points, bias)."""
    return _MatMulIntegerToFloat(a, b, a_scale, b_scale, a_zero_point, b_zero_point, bias)


def conv_integer_to_float(x, w, x_scale, w_scale, x_zero_point, w_zero_point=None, bias=None,
                          kernel: Sequence[int] = (1, 1), stride: Sequence[int] = (1, 1),
                          padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1),
                          in_hw: Sequence[int] = (1, 1), out_hw: Sequence[int] = (1, 1)):
    """Conv2d as an NHWC im2col of the uint8 activation + MatMulIntegerToFloat: exact integer
    accumulation with a float output. (ORT's ConvInteger is slower than float Conv on this CPU, and
    QLinearConv needs an output requantization that the reference does not do; see docs/ONNX.md.)

    Transpose(0,2,3,1) → columns [B, Ho, Wo, kh·kw·C] → MatMulIntegerToFloat → Transpose(0,3,1,2).
    Columns: 1×1 / stride 1: the NHWC tensor itself; kernel = stride, no padding (patch embedding):
    space-to-depth by Reshape/Transpose; otherwise Pad (with the zero point, so padding is a true 0)
    → Reshape [B, Hp·Wp, C] → Gather(constant int32 positions [Ho·Wo, kh·kw], axis 1) → Reshape.
    The column order (ky, kx, c) is the row order of ``w``.
    """
    kh, kw = kernel
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    ho, wo = out_hw
    xt = op.Transpose(x, perm=[0, 2, 3, 1])
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        cols = xt
    elif (kh, kw) == (sh, sw) and (ph, pw, dh, dw) == (0, 0, 1, 1):
        if (ho * kh, wo * kw) != tuple(in_hw):
            xt = op.Slice(xt, _i64([0, 0]), _i64([ho * kh, wo * kw]), _i64([1, 2]))
        patches = op.Transpose(op.Reshape(xt, _i64([0, ho, kh, wo, kw, -1])), perm=[0, 1, 3, 2, 4, 5])
        cols = op.Reshape(patches, _i64([0, ho, wo, -1]))
    else:
        if ph or pw:
            xt = op.Pad(xt, _i64([0, ph, pw, 0, 0, ph, pw, 0]), x_zero_point)
        hp, wp = in_hw[0] + 2 * ph, in_hw[1] + 2 * pw
        idx = onnx_ops.im2col_indices(list(in_hw), list(out_hw), list(kernel), list(stride), list(padding),
                                      list(dilation))
        flat = op.Reshape(xt, _i64([0, hp * wp, -1]))
        taps = op.Gather(flat, op.Constant(value=onnx.numpy_helper.from_array(idx.numpy(), "im2col")), axis=1)
        cols = op.Reshape(taps, _i64([0, ho, wo, -1]))
    y = _MatMulIntegerToFloat(cols, w, x_scale, w_scale, x_zero_point, w_zero_point, bias)
    return op.Transpose(y, perm=[0, 3, 1, 2])


def matmul_nbits(a, b, scales, bias=None, k: int = 0, n: int = 0, bits: int = 4, block_size: int = 32):
    """com.microsoft.MatMulNBits, weight-only; accuracy_level 0 keeps the float32 compute that the
    reference does (level 4 would requantize the activations to int8 blockwise)."""
    return _MatMulNBits(a, b, scales, None, None, bias, K=k, N=n, bits=bits, block_size=block_size, accuracy_level=0)


def int4_weight(packed, shape: Sequence[int], signed: bool):
    """A placeholder node that ``postprocess`` turns into an INT4/UINT4 initializer."""
    return _Int4Weight(packed, shape=list(shape), signed=int(signed))


TRANSLATION_TABLE: dict[Any, Any] = {
    onnx_ops.QUANTIZE_LINEAR: quantize_linear,
    onnx_ops.DEQUANTIZE_LINEAR: dequantize_linear,
    onnx_ops.GATHER_ROW: gather_row,
    onnx_ops.FIRST_ELEMENT: first_element,
    onnx_ops.MATMUL_INTEGER_TO_FLOAT: matmul_integer_to_float,
    onnx_ops.CONV_INTEGER_TO_FLOAT: conv_integer_to_float,
    onnx_ops.MATMUL_NBITS: matmul_nbits,
    onnx_ops.INT4_WEIGHT: int4_weight,
    core_ops.TIMESTEP_INDEX: timestep_index,
}

#: the ops that may remain in a lowered graph (anything else of stepq's must have been rewritten).
LOWERED_OPS = frozenset(TRANSLATION_TABLE) | {torch.ops.aten.select.int}
