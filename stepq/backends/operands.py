"""The operands of a quantized Linear / Conv2d as backends see them, shared by the ONNX and CuPy
partitioners (kept outside ``backends/onnx/`` so that reading them imports no ONNX runtime).

* ``act_quant(node)``: the activation ``fake_quant`` feeding a layer, with where its scale comes from
  (a timestep table, a constant, or computed in the graph) and its grid, or why it is none;
* ``weight_quant(node)``: the integer weight behind a ``dequantize`` ([unpack | unpack_base3] of a
  stored tensor), its bits, scale / zero point layout and packed storage, or why it is none;
* ``conv_args(node)``: stride, padding, dilation, groups of an ``aten.conv2d`` node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx

from stepq.compiler import ops, ternary_ops
from stepq.compiler.graph_utils import fetch_attr
from stepq.compiler.timesteps import match_timestep_gather

__all__ = ["ActQuant", "WeightQuant", "act_quant", "conv_args", "weight_quant"]


def _attr(node: object) -> torch.Tensor | None:
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        gm = node.graph.owning_module
        if gm is None:
            return None
        t = fetch_attr(gm, node.target)
        return t if isinstance(t, torch.Tensor) else None
    return None


def _val(node: object) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


@dataclass(frozen=True)
class ActQuant:
    """An activation fake_quant as the lowering needs it."""

    node: torch.fx.Node
    x: torch.fx.Node
    source: str  # "static" | "table" | "computed"
    quant_min: int
    quant_max: int
    axis: int | None
    group_size: int


def act_quant(node: object) -> ActQuant | str:
    """The activation quantizer ``node`` is, or why it is not one an integer kernel can take."""
    if not (isinstance(node, torch.fx.Node) and node.target is ops.FAKE_QUANT):
        return "the activation is not quantized (no fake_quant)"
    x, s, z = node.args[:3]
    qmin, qmax, group = (int(cast(int, a)) for a in (node.args[3], node.args[4], node.args[6]))
    axis = cast("int | None", node.args[5])
    assert isinstance(x, torch.fx.Node)
    if group:
        return "the activation is quantized per group; integer kernels need one scale per tensor"
    st, zt = match_timestep_gather(s), match_timestep_gather(z)
    if st is not None and zt is not None and st.view is None and zt.view is None:
        if axis not in (None, 0):
            return f"a timestep-table quantizer on axis {axis}"
        return ActQuant(node, x, "table", qmin, qmax, axis, 0)
    sa, za = _attr(s), _attr(z)
    if sa is not None and za is not None:
        if sa.numel() != 1 or za.numel() != 1:
            return "the activation is quantized per channel; integer kernels need one scale per tensor"
        return ActQuant(node, x, "static", qmin, qmax, None, 0)
    sv = _val(s)
    if axis is None and sv is not None and sv.numel() == 1:
        return ActQuant(node, x, "computed", qmin, qmax, None, 0)
    return "the scale is computed in the graph and is not one value per tensor"


@dataclass(frozen=True)
class WeightQuant:
    """A dequantized integer weight: ``dequantize([unpack](W), s, z, axis, group)``."""

    node: torch.fx.Node
    q: torch.Tensor  # the integer values, unpacked (int8 or uint8), the weight's shape
    packed: torch.Tensor | None  # packed storage below 8 bits
    bits: int
    signed: bool
    scale: torch.Tensor
    zero_point: torch.Tensor
    axis: int | None
    group_size: int
    base3: bool = False  # ternary codes stored 5 per byte (unpack_base3), else ops.pack's layout

    @property
    def symmetric(self) -> bool:
        return not bool(self.zero_point.any())


def weight_quant(node: object) -> WeightQuant | str:
    if not (isinstance(node, torch.fx.Node) and node.target is ops.DEQUANTIZE):
        return "the weight is not an integer tensor (no dequantize)"
    src, s, z = node.args[:3]
    axis, group = cast("int | None", node.args[3]), int(cast(int, node.args[4]))
    scale, zp = _attr(s), _attr(z)
    if scale is None or zp is None:
        return "the weight's scale is not a constant"
    packed = None
    base3 = False
    if isinstance(src, torch.fx.Node) and src.target is ops.UNPACK:
        p_node = src.args[0]
        bits, signed = int(cast(int, src.args[1])), bool(src.args[2])
        shape = [int(d) for d in cast("list[int]", src.args[3])]
        packed = _attr(p_node)
        if packed is None:
            return "the packed weight is not a constant"
        q = ops.unpack(packed, bits, signed, shape)
    elif isinstance(src, torch.fx.Node) and src.target is ops.UNPACK_BASE3:  # ternary codes, 5 per byte
        packed = _attr(src.args[0])
        if packed is None:
            return "the packed weight is not a constant"
        q = ternary_ops.unpack_base3(packed, [int(d) for d in cast("list[int]", src.args[1])])
        bits, signed, base3 = 2, True, True
    else:
        q_attr = _attr(src)
        if q_attr is None or q_attr.dtype not in (torch.int8, torch.uint8):
            return "the weight is not a constant int8/uint8 tensor"
        q, bits, signed = q_attr, 8, q_attr.dtype == torch.int8
    return WeightQuant(node, q, packed, bits, signed, scale, zp, axis, group, base3)


def conv_args(node: torch.fx.Node) -> tuple[list[int], list[int], list[int], int]:
    """(stride, padding, dilation, groups) of an aten.conv2d node, each spatial list of length 2."""
    defaults = (None, None, None, [1, 1], [0, 0], [1, 1], 1)
    args = list(node.args) + list(defaults[len(node.args):])
    for k, i in (("stride", 3), ("padding", 4), ("dilation", 5), ("groups", 6)):
        if k in node.kwargs:
            args[i] = node.kwargs[k]

    def pair(v: Any) -> list[int]:
        v = list(v) if isinstance(v, (list, tuple)) else [v]
        return [int(v[0]), int(v[0])] if len(v) == 1 else [int(v[0]), int(v[1])]

    return pair(args[3]), pair(args[4]), pair(args[5]), int(cast(int, args[6]))
