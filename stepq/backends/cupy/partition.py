"""The CuPy backend's placement table and partitioner.

| placement | pattern (converted graph) | kernels (stepq/cuda) |
|---|---|---|
| linear_w8a8 | linear(fake_quant(x) 8-bit grid, table or constant scale, dequantize(W int8 symmetric, per channel / tensor), b) | quantize_act → w8a8_gemv_dp4a (M ≤ 16) or torch._int_mm + w8a8_epilogue |
| conv2d_w8a8 | conv2d(the same operands), groups 1, 4-D input | quantize_act → im2col_s8 → the W8A8 GEMM |
| linear_weight_only | linear(x float or fake-quantized, dequantize([unpack](W) 8/4/2-bit or base-3 ternary, per tensor / channel / groups along K), b) | weight_only_gemv (M ≤ 16) or dequantize_weight + cuBLAS |
| timestep_index | timestep_index(t, T, scale) | round · clamp to [0, T−1] on the device |

A quantized linear / conv2d that no row takes stays a PyTorch op (its dequantize too) and is
reported with every row's reason; ``strict=True`` raises ``UnsupportedNodesError``. An activation
``fake_quant`` is absorbed into the W8A8 kernels it feeds (they quantize on the device); one that
also feeds a float op stays for that op. A batch shares its first timestep's activation scale, as
in the ONNX backend (one scale per tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx

from stepq.backends.base import Partitioner, Placement
from stepq.backends.operands import ActQuant, WeightQuant, _attr, _val, act_quant, conv_args, weight_quant
from stepq.compiler import ops
from stepq.compiler.timesteps import match_timestep_gather

__all__ = ["BACKEND", "MAX_K", "TABLE", "CupyPartitioner", "W8A8Operands", "WeightOnly", "w8a8_operands",
           "weight_only"]

aten = torch.ops.aten
BACKEND = "cupy"
LINEAR = aten.linear.default
CONV2D = aten.conv2d.default
#: the int32 accumulator holds Σ_k (q − z)·w for |q − z| ≤ 255, |w| ≤ 128 up to this K
MAX_K = 65536


@dataclass(frozen=True)
class W8A8Operands:
    act: ActQuant
    weight: WeightQuant
    scale_table: torch.fx.Node  # get_attr: a table [T] or a constant [1]
    zero_point_table: torch.fx.Node
    index: torch.fx.Node | None  # the timestep_index node (None: a constant quantizer)


def _tables(a: ActQuant) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node | None] | str:
    s, z = a.node.args[1], a.node.args[2]
    if a.source == "table":
        st, zt = match_timestep_gather(s), match_timestep_gather(z)
        assert st is not None and zt is not None
        for g in (st, zt):
            t = _attr(g.table)
            if t is None or t.dim() == 0 or t.numel() != t.shape[0]:
                return "the timestep table does not hold one value per timestep"
        if st.index is not zt.index:
            return "the scale and zero-point tables are indexed by different timestep nodes"
        return st.table, zt.table, st.index
    if a.source == "static":
        assert isinstance(s, torch.fx.Node) and isinstance(z, torch.fx.Node)
        return s, z, None
    return "the activation's scale is computed in the graph; the kernel reads it from a table or a constant"


def w8a8_operands(node: torch.fx.Node) -> W8A8Operands | str:
    """The operands of an int8 × int8 placement, or why ``node`` has none."""
    a = act_quant(node.args[0])
    if isinstance(a, str):
        return a
    if (a.quant_min < 0 and a.quant_max > 127) or a.quant_min < -128 or a.quant_max > 255:
        return f"activation grid [{a.quant_min}, {a.quant_max}] does not fit an 8-bit integer"
    w = weight_quant(node.args[1])
    if isinstance(w, str):
        return w
    if w.bits != 8 or not w.signed:
        return f"{w.bits}-bit {'signed' if w.signed else 'unsigned'} weights; the int8 kernel takes signed 8-bit weights"
    if not w.symmetric:
        return "the weight has a zero point; the int8 kernel takes symmetric weights"
    if w.group_size:
        return f"the weight is quantized in groups of {w.group_size}; the int8 kernel takes one scale per output channel"
    if w.axis not in (None, 0):
        return f"the weight's scale is along axis {w.axis}, not the output channels"
    k = w.q[0].numel()
    if k > MAX_K:
        return f"K = {k} > {MAX_K} could overflow the int32 accumulator"
    tables = _tables(a)
    if isinstance(tables, str):
        return tables
    return W8A8Operands(a, w, *tables)


def match_linear_w8a8(node: torch.fx.Node) -> str | None:
    ops_ = w8a8_operands(node)
    return ops_ if isinstance(ops_, str) else None


def match_conv2d_w8a8(node: torch.fx.Node) -> str | None:
    o = w8a8_operands(node)
    if isinstance(o, str):
        if isinstance(act_quant(node.args[0]), str):
            return f"{o}; there is no weight-only convolution kernel"
        return o
    _, _, _, groups = conv_args(node)
    if groups != 1:
        return f"a grouped convolution (groups={groups})"
    xv = _val(node.args[0])  # a graph read back from an artefact has no shapes in meta: aten.conv2d is 4-D anyway
    if xv is not None and xv.dim() != 4:
        return f"a {xv.dim()}-D input"
    if o.weight.q.dim() != 4:
        return f"a {o.weight.q.dim()}-D weight"
    return None


@dataclass(frozen=True)
class WeightOnly:
    weight: WeightQuant
    fmt: str  # a key of stepq.cuda.emulate.FORMATS
    stored: torch.Tensor  # the bytes the kernel reads (the packed buffer, or the int8 / uint8 weight)
    n: int
    k: int
    sn: int  # scale index stride per output row
    gs: int  # group size along K (0: none)


def weight_only(node: torch.fx.Node) -> WeightOnly | str:
    """The packed weight of a weight-only placement, or why ``node`` has none."""
    w = weight_quant(node.args[1])
    if isinstance(w, str):
        return w
    if w.q.dim() != 2:
        return f"a {w.q.dim()}-D weight"
    n, k = (int(d) for d in w.q.shape)
    if w.base3:
        fmt = "base3"
    elif w.bits in (8, 4, 2):
        fmt = f"{'s' if w.signed else 'u'}{w.bits}"
    else:
        return f"{w.bits}-bit weights are stored as a bit stream; the kernels read 8, 4, 2-bit and base-3 codes"
    stored = w.packed if w.packed is not None else w.q.view(torch.uint8)
    if w.axis is None:
        if w.scale.numel() != 1:
            return "a per-tensor scale with more than one value"
        sn, gs = 0, 0
    elif w.axis == 0 and not w.group_size:
        sn, gs = 1, 0
    elif w.axis == 1 and w.group_size:
        sn, gs = math.ceil(k / w.group_size), w.group_size
    else:
        return f"scales along axis {w.axis} with groups of {w.group_size}; the kernels take per tensor, per output channel or groups along K"
    if w.scale.numel() != max(1, n * sn) or w.zero_point.numel() != w.scale.numel():
        return f"scale / zero point of {w.scale.numel()} / {w.zero_point.numel()} values for this layout"
    return WeightOnly(w, fmt, stored, n, k, sn, gs)


def match_linear_weight_only(node: torch.fx.Node) -> str | None:
    wo = weight_only(node)
    return wo if isinstance(wo, str) else None


def _always(node: torch.fx.Node) -> str | None:
    return None


TABLE = (
    Placement("linear_w8a8", frozenset({LINEAR}), match_linear_w8a8,
              "quantize_act + w8a8_gemv_dp4a / torch._int_mm + w8a8_epilogue", integer=True,
              description="int8 activation × int8 weight, int32 accumulation, fused scale / bias, fp16 or fp32 out"),
    Placement("conv2d_w8a8", frozenset({CONV2D}), match_conv2d_w8a8, "quantize_act + im2col_s8 + the W8A8 GEMM",
              integer=True, description="Conv2d (groups 1) as the W8A8 GEMM over int8 im2col"),
    Placement("linear_weight_only", frozenset({LINEAR}), match_linear_weight_only,
              "weight_only_gemv / dequantize_weight + cuBLAS", integer=True,
              description="packed 8/4/2-bit or base-3 weight dequantised in registers × fp16 / fp32 activation"),
    Placement("timestep_index", frozenset({ops.TIMESTEP_INDEX}), _always, "round · clamp on the device",
              integer=False, description="no host synchronisation: out-of-range timesteps clamp"),
)


class CupyPartitioner(Partitioner):
    """Tags a converted graph for the CuPy kernels; a quantized linear / conv2d no row takes is rejected."""

    def __init__(self) -> None:
        super().__init__(BACKEND, TABLE)

    def must_take(self, node: torch.fx.Node) -> bool:
        if node.target in (LINEAR, CONV2D):
            return isinstance(node.args[1], torch.fx.Node) and node.args[1].target is ops.DEQUANTIZE
        return True
