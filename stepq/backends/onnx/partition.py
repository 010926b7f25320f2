"""The ONNX backend's placement table and partitioner.

A row is a pattern of the converted graph and what it becomes in ONNX Runtime (rows are tried in
order; the first that takes a node tags it):

| placement | pattern (FX, converted graph) | ONNX | ORT kernel |
|---|---|---|---|
| linear_integer | linear(fake_quant(x), dequantize(W int ≤8 bit, per channel / tensor), b) | QuantizeLinear → com.microsoft.MatMulIntegerToFloat(+bias) | MatMulIntegerToFloat (u8×s8) |
| conv2d_integer | conv2d(fake_quant(x), dequantize(W …), b), groups 1 | QuantizeLinear → NHWC im2col (u8) → MatMulIntegerToFloat → Transpose | MatMulIntegerToFloat |
| linear_weight_only | linear(x float, dequantize(W 2/4/8 bit signed symmetric, per channel or group 2^k ≥ 16), b) | com.microsoft.MatMulNBits (accuracy_level 0) | MatMulNBits |
| activation_quantize | fake_quant whose every consumer is an integer placement | QuantizeLinear (+Clip below 8 bits) | QuantizeLinear |
| activation_qdq | any other fake_quant | QuantizeLinear → DequantizeLinear | float consumer |
| weight_integer | dequantize whose every consumer is an integer placement | the integer initializer (INT4 + Cast at 4 bits) | – |
| weight_dequantize | any other dequantize | DequantizeLinear from an INT8 / INT4 initializer | float consumer |
| weight_unpack | unpack (or a ternary weight's unpack_base3) feeding a dequantize | folded into the initializer | – |
| timestep_index | timestep_index(t, T, scale) | Cast · scale → Round → Cast → Clip[0, T−1] | – |
| timestep_gather | a timestep gather (``stepq.compiler.timesteps.match_timestep_gather``: index(table, [i]) or index(table, [select(i, 0, 0)])) | Gather(table, i[0]) (batch shares the first timestep) | – |

A linear or conv2d that reads a quantized weight and that no integer row takes is left as it is
(its operands still lower to Q/DQ, so it runs as a float kernel) and is reported with the reasons
(a ``Rejection``); ``strict=True`` raises instead.
"""

from __future__ import annotations

import math

import torch
import torch.fx

from stepq.backends.base import Partitioner, Placement
from stepq.backends.operands import ActQuant, WeightQuant, _attr, _val, act_quant, conv_args, weight_quant
from stepq.compiler import ops
from stepq.compiler.timesteps import match_timestep_gather

__all__ = ["TABLE", "ActQuant", "OnnxPartitioner", "WeightQuant", "act_quant", "nbits_block_size", "weight_quant"]

aten = torch.ops.aten
BACKEND = "onnx"
LINEAR = aten.linear.default
CONV2D = aten.conv2d.default
INDEX = aten.index.Tensor


def _per_output_channel(w: WeightQuant) -> str | None:
    if w.group_size:
        return f"the weight is quantized in groups of {w.group_size}; MatMulIntegerToFloat takes one scale per output channel"
    if w.axis not in (None, 0):
        return f"the weight's scale is along axis {w.axis}, not the output channels"
    return None


def _integer_operands(node: torch.fx.Node) -> tuple[ActQuant, WeightQuant] | str:
    a = act_quant(node.args[0])
    if isinstance(a, str):
        return a
    w = weight_quant(node.args[1])
    if isinstance(w, str):
        return w
    why = _per_output_channel(w)
    if why:
        return why
    if (a.quant_min < 0 and a.quant_max > 127) or a.quant_max > 255:
        return f"activation grid [{a.quant_min}, {a.quant_max}] does not fit an 8-bit integer"
    return a, w


def match_linear_integer(node: torch.fx.Node) -> str | None:
    ops_ = _integer_operands(node)
    if isinstance(ops_, str):
        return ops_
    xv = _val(node.args[0])
    if xv is not None and xv.dim() < 2:
        return "a 1-D input"
    return None


def match_conv2d_integer(node: torch.fx.Node) -> str | None:
    ops_ = _integer_operands(node)
    if isinstance(ops_, str):
        return ops_
    _, _, _, groups = conv_args(node)
    if groups != 1:
        return f"a grouped convolution (groups={groups})"
    xv, yv = _val(node.args[0]), _val(node)
    if xv is None or yv is None or xv.dim() != 4:
        return "the input is not a known 4-D tensor"
    if not all(isinstance(d, int) for d in (*xv.shape[2:], *yv.shape[2:])):
        return "the spatial size is not static"
    return None


def nbits_block_size(w: WeightQuant) -> int | str:
    """MatMulNBits' block size for a weight, or why it has none."""
    k = w.q.shape[1]
    if w.group_size:
        g = w.group_size
        if w.axis != 1:
            return f"groups along axis {w.axis}, MatMulNBits blocks run along K (axis 1)"
        if g < 16 or g & (g - 1):
            return f"group size {g} is not a power of two ≥ 16"
        return g
    if w.axis not in (None, 0):
        return f"the weight's scale is along axis {w.axis}"
    return min(128, max(16, 1 << math.ceil(math.log2(max(k, 1)))))


def match_linear_weight_only(node: torch.fx.Node) -> str | None:
    if not isinstance(act_quant(node.args[0]), str):
        return "the activation is quantized (an integer placement applies)"
    w = weight_quant(node.args[1])
    if isinstance(w, str):
        return w
    if w.bits not in (2, 4, 8):
        return f"{w.bits}-bit weights (MatMulNBits takes 2, 4 or 8)"
    if not w.signed or not w.symmetric:
        return "asymmetric or unsigned weights"
    bs = nbits_block_size(w)
    return bs if isinstance(bs, str) else None


_INTEGER_ROWS = {LINEAR: (match_linear_integer, match_linear_weight_only), CONV2D: (match_conv2d_integer,)}


def takes_integer(node: torch.fx.Node) -> bool:
    return any(m(node) is None for m in _INTEGER_ROWS.get(node.target, ()))  # type: ignore[call-overload]


def _all_users_integer(node: torch.fx.Node) -> str | None:
    if not node.users:
        return "unused"
    for u in node.users:
        if u.target is ops.DEQUANTIZE and u.args[0] is node:  # unpack → dequantize
            why = _all_users_integer(u)
            if why:
                return why
            continue
        if not takes_integer(u):
            return f"{u.name} is not an integer placement"
    return None


def _always(node: torch.fx.Node) -> str | None:
    return None


def _is_table_gather(node: torch.fx.Node) -> str | None:
    g = match_timestep_gather(node)
    return None if g is not None and _attr(g.table) is not None else "not a timestep-table lookup"


def _unpack_feeds_dequantize(node: torch.fx.Node) -> str | None:
    if all(u.target is ops.DEQUANTIZE for u in node.users):
        return None
    return "unpacked integers used by something else than dequantize"


TABLE = (
    Placement("linear_integer", frozenset({LINEAR}), match_linear_integer, "com.microsoft.MatMulIntegerToFloat",
              integer=True, description="quantized activation × int8 weight, float output with bias"),
    Placement("conv2d_integer", frozenset({CONV2D}), match_conv2d_integer,
              "NHWC im2col + com.microsoft.MatMulIntegerToFloat", integer=True,
              description="quantized activation × int8 weight, exact integer accumulation"),
    Placement("linear_weight_only", frozenset({LINEAR}), match_linear_weight_only, "com.microsoft.MatMulNBits",
              integer=True, description="float activation × 2/4/8-bit weight, float32 compute"),
    Placement("activation_quantize", frozenset({ops.FAKE_QUANT}), _all_users_integer, "QuantizeLinear",
              integer=True, description="the activation quantizer of integer kernels"),
    Placement("activation_qdq", frozenset({ops.FAKE_QUANT}), _always, "QuantizeLinear → DequantizeLinear",
              integer=False, description="a quantizer whose consumer runs in float"),
    Placement("weight_integer", frozenset({ops.DEQUANTIZE}), _all_users_integer, "integer initializer",
              integer=True, description="integer weight read by an integer kernel"),
    Placement("weight_dequantize", frozenset({ops.DEQUANTIZE}), _always, "DequantizeLinear(INT8/INT4 initializer)",
              integer=False, description="integer weight read by a float kernel"),
    Placement("weight_unpack", frozenset({ops.UNPACK, ops.UNPACK_BASE3}), _unpack_feeds_dequantize, "folded into the initializer",
              integer=False),
    Placement("timestep_index", frozenset({ops.TIMESTEP_INDEX}), _always, "Cast·scale → Round → Cast → Clip",
              integer=False, description="ONNX cannot raise: out-of-range timesteps clamp"),
    Placement("timestep_gather", frozenset({INDEX}), _is_table_gather, "Gather(table, first timestep)",
              integer=False, description="one activation scale per tensor: a batch shares its first timestep"),
)


class OnnxPartitioner(Partitioner):
    """Tags a converted graph for ONNX; a quantized linear/conv2d no integer row takes is rejected."""

    def __init__(self) -> None:
        super().__init__(BACKEND, TABLE)

    def must_take(self, node: torch.fx.Node) -> bool:
        if node.target in (LINEAR, CONV2D):
            return isinstance(node.args[1], torch.fx.Node) and node.args[1].target is ops.DEQUANTIZE
        if node.target is INDEX:
            return False  # an ordinary index: the exporter's own translation takes it
        return True
