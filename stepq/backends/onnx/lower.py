"""Lower a tagged copy of a converted graph to the ONNX backend's ops (``ops.py``).

Placement rewrites, per tag (see ``partition.py`` for the table):

    linear(fake_quant(x, s, z), dequantize(W, sw, zw), b)
      → matmul_integer_to_float(quantize_linear(x, s, z_u8), Wᵀ, s, sw, z_u8, zw, b)
    conv2d(fake_quant(x, s, z), dequantize(W, sw, zw), b, stride, padding, dilation)
      → conv_integer_to_float(quantize_linear(x, s, z_u8), W as [(kh, kw, C), O], s, sw, z_u8, zw, b, …)
    linear(x, dequantize(W, sw, 0), b)   (weight-only, 2/4/8 bits)
      → matmul_nbits(x, pack(W + 2^(b−1)) per block, sw per block, b, K, N, bits, block)
    any other fake_quant(x, s, z)  → dequantize_linear(quantize_linear(x, s, z_u8), s, z_u8)
    any other dequantize(W, s, z)  → dequantize_linear(W (INT4 at 4 bits), s, z_int)

Scales and zero points: a static quantizer keeps its scale buffer and gets a uint8 (int8 for a
signed grid) zero-point buffer; a timestep-table quantizer reads ``gather_row(table, i₀)`` with
``i₀ = first_element(timestep_index(t))`` and a uint8 zero-point table: integer kernels take one
scale per tensor, so in ONNX a batch shares its first timestep (the reference backend keeps
per-sample scales). The lowered graph still runs in PyTorch with these semantics.

Works on the graph it is given (the exporter's deep copy); never on a QuantizedModel's graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.fx

from stepq.backends.base import PartitionResult
from stepq.backends.onnx import ops as onnx_ops
from stepq.backends.onnx.partition import (
    ActQuant,
    WeightQuant,
    act_quant,
    conv_args,
    nbits_block_size,
    weight_quant,
)
from stepq.compiler import meta, ops
from stepq.compiler.errors import PostconditionError
from stepq.compiler.graph_utils import delete_attr, fetch_attr, register_tensor
from stepq.compiler.timesteps import match_timestep_gather

__all__ = ["LoweringResult", "lower"]

log = logging.getLogger(__name__)
aten = torch.ops.aten

#: stepq ops that must not survive lowering (timestep_index has its own translation).
_CORE_OPS = (ops.FAKE_QUANT, ops.QUANTIZE, ops.DEQUANTIZE, ops.UNPACK, ops.UNPACK_BASE3, ops.TERNARY)


@dataclass
class LoweringResult:
    counts: dict[str, int] = field(default_factory=dict)
    #: quantizers whose per-sample timestep scales became per tensor (first timestep of the batch).
    collapsed_per_sample: list[str] = field(default_factory=list)

    def add(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1


def _zp_dtype(quant_min: int) -> torch.dtype:
    return torch.uint8 if quant_min >= 0 else torch.int8


class _Lowering:
    def __init__(self, gm: torch.fx.GraphModule, result: LoweringResult, unsigned_weights: bool = False):
        self.gm = gm
        self.unsigned_weights = unsigned_weights
        self.graph = gm.graph
        self.result = result
        self._act: dict[torch.fx.Node, tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]] = {}
        self._deq: dict[torch.fx.Node, torch.fx.Node] = {}
        self._first: dict[torch.fx.Node, torch.fx.Node] = {}
        self._u8: dict[str, str] = {}

    # -- helpers ---------------------------------------------------------------------------------
    def _buffer(self, name: str, tensor: torch.Tensor) -> torch.fx.Node:
        return self.graph.get_attr(register_tensor(self.gm, name, tensor))

    def _int_zero_point(self, z_node: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node:
        key = f"{z_node.target}:{dtype}"
        if key not in self._u8:
            z = fetch_attr(self.gm, z_node.target)
            self._u8[key] = register_tensor(self.gm, f"{z_node.target}_{str(dtype).removeprefix('torch.')}",
                                            torch.round(z.detach()).to(dtype))
        return self.graph.get_attr(self._u8[key])

    def _first_timestep(self, idx: torch.fx.Node) -> torch.fx.Node:
        if idx not in self._first:
            with self.graph.inserting_after(idx):
                self._first[idx] = self.graph.call_function(onnx_ops.FIRST_ELEMENT, (idx,))
        return self._first[idx]

    def act(self, a: ActQuant) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]:
        """(quantized activation, scale, integer zero point) of an activation fake_quant."""
        if a.node in self._act:
            return self._act[a.node]
        fq = a.node
        _, s, z = fq.args[:3]
        assert isinstance(s, torch.fx.Node) and isinstance(z, torch.fx.Node)
        dtype = _zp_dtype(a.quant_min)
        with self.graph.inserting_before(fq):
            if a.source == "table":
                sg, zg = match_timestep_gather(s), match_timestep_gather(z)
                assert sg is not None and zg is not None  # act_quant said "table"
                i0 = self._first_timestep(sg.index)
                scale = self.graph.call_function(onnx_ops.GATHER_ROW, (sg.table, i0))
                zp = self.graph.call_function(onnx_ops.GATHER_ROW, (self._int_zero_point(zg.table, dtype), i0))
                if a.axis == 0:
                    self.result.collapsed_per_sample.append(fq.name)
            elif a.source == "static":
                scale = s
                zp = self._int_zero_point(z, dtype)
                zval = fetch_attr(self.gm, zp.target)
                if zval.dim():
                    zp_name = register_tensor(self.gm, f"{zp.target}_0d", zval.reshape(()))
                    zp = self.graph.get_attr(zp_name)
                if fetch_attr(self.gm, s.target).dim():
                    scale = self.graph.call_function(aten.reshape.default, (s, []))
            else:  # computed per tensor
                scale = self.graph.call_function(aten.reshape.default, (s, []))
                zr = self.graph.call_function(aten.round.default, (z,))
                zp = self.graph.call_function(aten.reshape.default, (
                    self.graph.call_function(aten._to_copy.default, (zr,), {"dtype": dtype}), []))
            xq = self.graph.call_function(onnx_ops.QUANTIZE_LINEAR, (a.x, scale, zp, a.quant_min, a.quant_max))
        self._act[fq] = (xq, scale, zp)
        return self._act[fq]

    def _shifted(self, w: WeightQuant) -> bool:
        """Whether an integer kernel's signed 8-bit weight is stored as uint8 (codes and zero point + 128,
        the same products exactly): ONNX Runtime's U8S8 kernel on x86 CPUs without VNNI adds pairs of
        u8·s8 products in saturating int16 (VPMADDUBSW), its U8U8 kernel does not (runtime.py)."""
        return self.unsigned_weights and w.signed and w.bits == 8

    def _kernel_weight(self, w: WeightQuant, mat: torch.Tensor, name: str) -> torch.fx.Node:
        """``mat`` as an integer kernel's weight input (``_weight_storage``, or shifted to uint8)."""
        if self._shifted(w):
            return self._buffer(f"{name}_uint8", (mat.to(torch.int16) + 128).to(torch.uint8).contiguous())
        return self._weight_storage(w, mat, name)

    def _weight_storage(self, w: WeightQuant, mat: torch.Tensor, name: str) -> torch.fx.Node:
        """The integer matrix ``mat`` as a graph input: INT4 below 8 bits when it fits, else int8/uint8."""
        if w.bits <= 4 and w.signed:
            packed = ops.pack(mat, 4, True)
            p = self._buffer(f"{name}_int4", packed)
            return self.graph.call_function(onnx_ops.INT4_WEIGHT, (p, list(mat.shape), True))
        return self._buffer(f"{name}_{'int8' if w.signed else 'uint8'}", mat.contiguous())

    def _weight_zero_point(self, w: WeightQuant, name: str, n: int) -> torch.fx.Node | None:
        if self._shifted(w):
            z = (torch.round(w.zero_point.reshape(-1)).to(torch.int16) + 128).to(torch.uint8)
            return self._buffer(f"{name}_zero_point_uint8", z.expand(n).contiguous() if z.numel() == 1 else z)
        if w.symmetric:
            return None
        z = torch.round(w.zero_point.reshape(-1)).to(w.q.dtype)
        return self._buffer(f"{name}_zero_point_int", z.expand(n).contiguous() if z.numel() == 1 else z)

    def _weight_scale(self, w: WeightQuant, name: str, n: int) -> torch.fx.Node:
        s = w.scale.detach().float().reshape(-1)
        return self._buffer(f"{name}_scale_col", s.expand(n).contiguous() if s.numel() == 1 else s.contiguous())

    @staticmethod
    def _wname(w: WeightQuant) -> str:
        src = w.node.args[0]
        assert isinstance(src, torch.fx.Node)
        if src.target in (ops.UNPACK, ops.UNPACK_BASE3):
            src = cast(torch.fx.Node, src.args[0])
        return str(src.target).removesuffix("_int8").removesuffix("_uint8")

    # -- placements ------------------------------------------------------------------------------
    def linear_integer(self, node: torch.fx.Node) -> None:
        a, w = act_quant(node.args[0]), weight_quant(node.args[1])
        assert isinstance(a, ActQuant) and isinstance(w, WeightQuant)
        xq, scale, zp = self.act(a)
        name = self._wname(w)
        n = w.q.shape[0]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with self.graph.inserting_before(node):
            b = self._kernel_weight(w, w.q.t(), f"{name}_t")
            y = self.graph.call_function(onnx_ops.MATMUL_INTEGER_TO_FLOAT, (
                xq, b, scale, self._weight_scale(w, name, n), zp, self._weight_zero_point(w, name, n), bias))
        self._replace(node, y, "linear_integer")

    def conv2d_integer(self, node: torch.fx.Node) -> None:
        a, w = act_quant(node.args[0]), weight_quant(node.args[1])
        assert isinstance(a, ActQuant) and isinstance(w, WeightQuant)
        xq, scale, zp = self.act(a)
        stride, padding, dilation, _ = conv_args(node)
        name = self._wname(w)
        o, _, kh, kw = w.q.shape
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        out_hw = [int(d) for d in node.meta["val"].shape[2:]]
        in_hw = [int(d) for d in node.args[0].meta["val"].shape[2:]]  # type: ignore[union-attr]
        with self.graph.inserting_before(node):
            b = self._kernel_weight(w, onnx_ops.conv_weight_matrix(w.q), f"{name}_mat")
            y = self.graph.call_function(onnx_ops.CONV_INTEGER_TO_FLOAT, (
                xq, b, scale, self._weight_scale(w, name, o), zp, self._weight_zero_point(w, name, o), bias,
                [kh, kw], stride, padding, dilation, in_hw, out_hw))
        self._replace(node, y, "conv2d_integer")

    def linear_weight_only(self, node: torch.fx.Node) -> None:
        w = weight_quant(node.args[1])
        assert isinstance(w, WeightQuant)
        n, k = w.q.shape
        block = nbits_block_size(w)
        assert isinstance(block, int)
        packed, blocks = onnx_ops.nbits_pack(w.q, w.bits, block)
        s = w.scale.detach().float().reshape(-1)
        s = s.expand(n) if s.numel() == 1 else s  # one scale per tensor (a ternary α): the same in every block
        s = s.reshape(n, -1)
        if s.shape[1] == 1:
            s = s.expand(n, blocks)
        name = self._wname(w)
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with self.graph.inserting_before(node):
            b = self._buffer(f"{name}_nbits{w.bits}", packed)
            sc = self._buffer(f"{name}_nbits_scales", s.contiguous().reshape(-1))
            y = self.graph.call_function(onnx_ops.MATMUL_NBITS, (node.args[0], b, sc, bias, k, n, w.bits, block))
        self._replace(node, y, "linear_weight_only")

    # -- fallbacks -------------------------------------------------------------------------------
    def activation_qdq(self, fq: torch.fx.Node) -> None:
        a = act_quant(fq)
        if isinstance(a, str):
            a = self._generic_act(fq)
        xq, scale, zp = self.act(a)
        with self.graph.inserting_before(fq):
            y = self.graph.call_function(onnx_ops.DEQUANTIZE_LINEAR, (xq, scale, zp, None, 0))
        self._replace(fq, y, "activation_qdq")

    def _generic_act(self, fq: torch.fx.Node) -> ActQuant:
        x = fq.args[0]
        qmin, qmax = int(cast(int, fq.args[3])), int(cast(int, fq.args[4]))
        axis, group = fq.args[5], fq.args[6]
        if axis is not None or group:
            raise PostconditionError(f"{fq.name}: per-axis activation quantizers with computed scales cannot be "
                                     "lowered to ONNX (QuantizeLinear needs constant per-axis scales)")
        assert isinstance(x, torch.fx.Node)
        return ActQuant(fq, x, "computed", qmin, qmax, None, 0)

    def weight_dequantize(self, dq: torch.fx.Node) -> None:
        w = weight_quant(dq)
        if isinstance(w, str):
            raise PostconditionError(f"{dq.name}: {w}")
        name = self._wname(w)
        with self.graph.inserting_before(dq):
            q = self._weight_storage(w, w.q, f"{name}_dq")
            axis = w.axis if w.scale.numel() > 1 else None
            shape = w.scale.shape if axis is not None else ()
            s = self._buffer(f"{name}_dq_scale", w.scale.detach().float().reshape(shape))
            z = self._buffer(f"{name}_dq_zero_point", torch.round(w.zero_point.detach()).to(w.q.dtype).reshape(shape))
            y = self.graph.call_function(onnx_ops.DEQUANTIZE_LINEAR, (q, s, z, axis, w.group_size if axis is not None else 0))
        self._replace(dq, y, "weight_dequantize")

    def _replace(self, old: torch.fx.Node, new: torch.fx.Node, what: str) -> None:
        new.meta.update({k: v for k, v in old.meta.items() if k != meta.BACKEND_TAG})
        old.replace_all_uses_with(new)
        self.result.add(what)


def _drop_dead(gm: torch.fx.GraphModule) -> None:
    gm.graph.eliminate_dead_code()
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers()) + list(gm.named_parameters()):
        if name not in used:
            delete_attr(gm, name)


def lower(gm: torch.fx.GraphModule, partition: PartitionResult, *, unsigned_weights: bool = False) -> LoweringResult:
    """Rewrite the tagged nodes of ``gm`` in place (``gm`` is the exporter's copy). ``unsigned_weights``:
    the integer kernels' signed 8-bit weights as uint8 with zero point 128 (``_Lowering._shifted``)."""
    result = LoweringResult()
    low = _Lowering(gm, result, unsigned_weights)
    by_name = {n.name: n for n in gm.graph.nodes}
    order = ("linear_integer", "conv2d_integer", "linear_weight_only")
    for name, placement in list(partition.tags.items()):
        node = by_name.get(name)
        if node is not None and placement in order:
            getattr(low, placement)(node)
    _drop_dead(gm)
    # whatever quantizer still has a consumer runs in float: Q/DQ pairs and DequantizeLinear
    for node in list(gm.graph.nodes):
        if node.target is ops.FAKE_QUANT and node.users:
            low.activation_qdq(node)
        elif node.target is ops.DEQUANTIZE and node.users:
            low.weight_dequantize(node)
    _drop_dead(gm)
    left = [n.name for n in gm.graph.nodes if n.target in _CORE_OPS]
    if left:
        raise PostconditionError(f"ONNX lowering left stepq ops that have no ONNX form: {left}")
    gm.recompile()
    log.info("onnx lowering: %s", result.counts)
    return result
