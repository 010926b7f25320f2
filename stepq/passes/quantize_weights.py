"""Quantize weights: store every fake-quantized weight as integers, packed below 8 bits.

    fake_quant(W, s, z, qmin, qmax, axis, g)
      →  dequantize(W_q, s, z, axis, g)                         (8 bits: W_q int8 / uint8)
      →  dequantize(unpack(W_p, b, signed, shape), s, z, axis, g) (b < 8 bits: W_p packed uint8)

with ``W_q = clamp(round(W / s) + z, qmin, qmax)``. A ternary weight (TerDiT) is stored as its codes
W_t ∈ {−1, 0, 1} with the learned scale α and a zero point of 0 (``stepq.compiler.ternary_ops``):

    ternary(W, α, axis, eps)  →  dequantize(unpack_base3(W_p, shape), α, 0, axis)   (5 codes per byte)
                              →  dequantize(unpack(W_p, 2, True, shape), α, 0, axis) (4 codes per byte)
 The dequantized weight equals the fake-quantized
one bit for bit (same arithmetic), so the converted model computes exactly what the calibrated
program did. The floating-point weight is deleted when nothing else reads it.

Requires: nothing. Guarantees: no weight fake_quant of a ``get_attr`` weight left (one of a weight
computed in the graph stays); bit-identical outputs; a second run rewrites nothing.
"""

from __future__ import annotations

import math
from typing import cast

import torch

from stepq.compiler import meta, ops
from stepq.compiler.graph_utils import delete_attr, fetch_attr, register_tensor
from stepq.compiler.pass_manager import Contract, OpAbsent, Pass, PassResult
from stepq.compiler.program import Program
from stepq.compiler.ternary_ops import pack_base3, ternary_codes
from stepq.recipe.specs import TernarySpec

__all__ = ["QuantizeWeights", "grid_bits"]


def grid_bits(quant_min: int, quant_max: int) -> tuple[int, bool]:
    """(bits, signed) of a standard grid."""
    signed = quant_min < 0
    bits = int(math.log2(quant_max + 1)) + (1 if signed else 0)
    return bits, signed


def _stored_weight_fake_quant(node: torch.fx.Node) -> bool:
    return (node.target in (ops.FAKE_QUANT, ops.TERNARY) and node.meta.get(meta.QUANTIZER_ROLE) == "weight"
            and isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "get_attr")


def _replace(gm: torch.fx.GraphModule, fq: torch.fx.Node, w_node: torch.fx.Node, dq: torch.fx.Node) -> None:
    """``dq`` takes the place of the weight quantizer ``fq``; the float weight goes when nothing else reads it."""
    dq.meta["val"] = fq.meta.get("val")
    fq.replace_all_uses_with(dq)
    gm.graph.erase_node(fq)
    if not w_node.users:
        gm.graph.erase_node(w_node)
        delete_attr(gm, w_node.target)


class QuantizeWeights(Pass):
    name = "quantize_weights"
    contract = Contract(
        produces=(OpAbsent(_stored_weight_fake_quant, "weight fake_quant of a stored weight"),),
        preserves_semantics=True,
        tolerance=0.0,
        idempotent=True,
    )

    def __call__(self, prog: Program) -> PassResult:
        gm = prog.gm
        graph = gm.graph
        count = 0
        for node in list(graph.nodes):
            if node.target is ops.TERNARY and node.meta.get(meta.QUANTIZER_ROLE) == "weight":
                count += _store_ternary(gm, node)
                continue
            if node.target is not ops.FAKE_QUANT or node.meta.get(meta.QUANTIZER_ROLE) != "weight":
                continue
            w_node, s_node, z_node, qmin, qmax, axis, group = node.args
            if w_node.op != "get_attr":
                continue
            w = fetch_attr(gm, w_node.target)
            s = fetch_attr(gm, s_node.target)
            z = fetch_attr(gm, z_node.target)
            bits, signed = grid_bits(qmin, qmax)
            dtype = torch.int8 if signed else torch.uint8
            q = ops.quantize(w.detach(), s, z, qmin, qmax, axis, group, dtype)
            with graph.inserting_before(node):
                if bits == 8:
                    q_name = register_tensor(gm, f"{w_node.target}_int8" if signed else f"{w_node.target}_uint8", q)
                    q_node = graph.get_attr(q_name)
                    meta.mark_inserted(q_node)
                else:
                    p_name = register_tensor(gm, f"{w_node.target}_packed{bits}", ops.pack(q, bits, signed))
                    p_node = graph.get_attr(p_name)
                    q_node = graph.call_function(ops.UNPACK, (p_node, bits, signed, list(w.shape)))
                    meta.mark_inserted(p_node)
                    meta.mark_inserted(q_node)
                dq = graph.call_function(ops.DEQUANTIZE, (q_node, s_node, z_node, axis, group, w.dtype))
            meta.mark_inserted(dq, **{meta.QUANTIZER_ROLE: "weight_dequant", meta.ACT_QUANTIZER: str(w_node.target),
                                      meta.WEIGHT_BITS: bits})
            _replace(gm, node, w_node, dq)
            count += 1
        return PassResult(count)


def _store_ternary(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    graph = gm.graph
    w_node, a_node = node.args[0], node.args[1]
    axis = cast("int | None", node.args[2])
    eps = float(cast(float, node.args[3]))
    if not isinstance(w_node, torch.fx.Node) or w_node.op != "get_attr" or not isinstance(a_node, torch.fx.Node):
        return 0
    spec = node.meta.get(meta.QSPEC)
    packing = spec.packing if isinstance(spec, TernarySpec) else "base3"
    w = fetch_attr(gm, w_node.target)
    alpha = fetch_attr(gm, a_node.target)
    codes = ternary_codes(w.detach(), axis, eps)
    with graph.inserting_before(node):
        if packing == "base3":
            p_name = register_tensor(gm, f"{w_node.target}_base3", pack_base3(codes))
            p_node = graph.get_attr(p_name)
            q_node = graph.call_function(ops.UNPACK_BASE3, (p_node, list(w.shape)))
        else:
            p_name = register_tensor(gm, f"{w_node.target}_packed2", ops.pack(codes, 2, True))
            p_node = graph.get_attr(p_name)
            q_node = graph.call_function(ops.UNPACK, (p_node, 2, True, list(w.shape)))
        z_name = register_tensor(gm, f"{w_node.target}_zero_point", torch.zeros_like(alpha.detach()))
        z_node = graph.get_attr(z_name)
        dq = graph.call_function(ops.DEQUANTIZE, (q_node, a_node, z_node, axis, 0, w.dtype))
    for n in (p_node, q_node, z_node):
        meta.mark_inserted(n)
    meta.mark_inserted(dq, **{meta.QUANTIZER_ROLE: "weight_dequant", meta.ACT_QUANTIZER: str(w_node.target),
                              meta.WEIGHT_BITS: 2, meta.QSPEC: spec})
    _replace(gm, node, w_node, dq)
    return 1
