"""Lower a tagged graph to the CuPy backend's ops (stateless: reads the tags ``partition`` wrote).

    linear(fake_quant(x, s[t], z[t]), dequantize(W_q, s_w), b)  →  stepq_cupy::linear_w8a8(x, W_pad, Σ_k W_q, s_w, b, S, Z, t)
    conv2d(fake_quant(x, …), dequantize(W_q, …), b, …)           →  stepq_cupy::conv2d_w8a8(x, W_pad [O, C·KH·KW], …)
    linear(x, dequantize([unpack](P), s, z, axis, g), b)         →  stepq_cupy::linear_weight_only(x, P, s, z, b, fmt, …)
    timestep_index(t, T, scale, clamp)                           →  stepq_cupy::timestep_index(t, T, scale)

W_pad is the int8 weight with rows padded to K_ALIGN bytes and N_ALIGN rows (zeros); a per-tensor
weight scale is repeated per channel. The packed low-bit weights are passed as quantize_weights
stored them: the kernels read that layout. Quantizers, dequantizes and weights nothing reads any
more are removed with their buffers.
"""

from __future__ import annotations

import torch
import torch.fx

from stepq.backends.base import placement_of
from stepq.backends.cupy import ops as cupy_ops
from stepq.backends.cupy.partition import BACKEND, conv_args, w8a8_operands, weight_only
from stepq.compiler import meta
from stepq.compiler.graph_utils import delete_attr, register_tensor
from stepq.cuda.emulate import K_ALIGN, N_ALIGN, pad_to

__all__ = ["lower_graph"]


def _buffer(gm: torch.fx.GraphModule, name: str, t: torch.Tensor) -> torch.fx.Node:
    node = gm.graph.get_attr(register_tensor(gm, name, t.contiguous()))
    meta.mark_inserted(node)
    return node


def _w8a8(gm: torch.fx.GraphModule, node: torch.fx.Node, conv: bool) -> None:
    o = w8a8_operands(node)
    assert not isinstance(o, str), o
    wq = o.weight.q.reshape(o.weight.q.shape[0], -1)
    n, k = wq.shape
    w = torch.zeros(pad_to(n, N_ALIGN), pad_to(k, K_ALIGN), dtype=torch.int8)
    w[:n, :k] = wq
    scale = o.weight.scale.detach().float().reshape(-1).expand(n) if o.weight.axis is None else o.weight.scale
    a = o.act
    shift = 128 if a.quant_max > 127 else 0
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    name = node.meta.get(meta.LAYER) or node.name
    with gm.graph.inserting_before(node):
        args = (a.x, _buffer(gm, f"{name}_cupy_w", w), _buffer(gm, f"{name}_cupy_rowsum", wq.to(torch.int32).sum(1)),
                _buffer(gm, f"{name}_cupy_w_scale", scale.detach().float().reshape(-1)), bias,
                o.scale_table, o.zero_point_table, o.index, a.quant_min, a.quant_max, shift)
        if conv:
            stride, padding, dilation, _ = conv_args(node)
            kh, kw = (int(d) for d in o.weight.q.shape[2:])
            new = gm.graph.call_function(cupy_ops.CONV2D_W8A8, (*args, kh, kw, stride, padding, dilation))
        else:
            new = gm.graph.call_function(cupy_ops.LINEAR_W8A8, args)
    _replace(node, new)


def _weight_only(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    wo = weight_only(node)
    assert not isinstance(wo, str), wo
    w = wo.weight
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    name = node.meta.get(meta.LAYER) or node.name
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(cupy_ops.LINEAR_WEIGHT_ONLY, (
            node.args[0], _buffer(gm, f"{name}_cupy_packed", wo.stored.reshape(-1)),
            _buffer(gm, f"{name}_cupy_scale", w.scale.detach().float().reshape(-1)),
            _buffer(gm, f"{name}_cupy_zero_point", w.zero_point.detach().float().reshape(-1)),
            bias, wo.fmt, wo.n, wo.k, wo.sn, wo.gs))
    _replace(node, new)


def _timestep_index(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    t, num, scale = node.args[:3]
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(cupy_ops.TIMESTEP_INDEX, (t, num, scale))
    _replace(node, new)


def _replace(node: torch.fx.Node, new: torch.fx.Node) -> None:
    new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
    new.meta["val"] = node.meta.get("val")
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


def lower_graph(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Rewrite every node tagged ``cupy:<placement>`` in place; the rewrite counts per placement."""
    counts: dict[str, int] = {}
    # the kernels first: their operands are found through the timestep gathers, which match the
    # reference's timestep_index node; the index nodes are rewritten after
    nodes = list(gm.graph.nodes)
    nodes.sort(key=lambda n: placement_of(n, BACKEND) == "timestep_index")
    for node in nodes:
        p = placement_of(node, BACKEND)
        if p is None:
            continue
        if p in ("linear_w8a8", "conv2d_w8a8"):
            _w8a8(gm, node, conv=p == "conv2d_w8a8")
        elif p == "linear_weight_only":
            _weight_only(gm, node)
        elif p == "timestep_index":
            _timestep_index(gm, node)
        else:  # pragma: no cover - the table has no other rows
            raise AssertionError(f"no lowering for placement {p!r}")
        counts[p] = counts.get(p, 0) + 1
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers()) + list(gm.named_parameters()):
        if name not in used:
            delete_attr(gm, name)
    gm.graph.lint()
    gm.recompile()
    return counts
