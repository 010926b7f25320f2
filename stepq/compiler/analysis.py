"""Graph facts the passes share: which nodes are quantizable ops, their operands, the layer they
belong to, and their structural roles.

Roles (a quantizable op may have several):

* ``input``: its activation is reached from the sample input through no other quantizable op
  (the input conv / patch embedding);
* ``output``: the model output is reached from it through no other quantizable op;
* ``conditioning``: its activation does not depend on the sample input (timestep, class, text
  and adaLN projections);
* ``timestep_embedding``: a conditioning op that depends on the timestep and is one of the first
  two quantizable ops on the timestep's path (the MLP on the sinusoidal encoding).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
import torch.fx

from stepq.compiler import meta

__all__ = [
    "activation_arg_indices",
    "dependency_sets",
    "is_float_tensor",
    "module_path",
    "op_kind",
    "quantizable_nodes",
    "structural_roles",
    "weight_arg_index",
]

aten = torch.ops.aten

_LINEAR = {aten.linear.default}
_CONV = {aten.conv2d.default, aten.conv2d.padding}
_SDPA = {aten.scaled_dot_product_attention.default}
_MATMUL = {aten.matmul.default, aten.bmm.default}
_BADDBMM = {aten.baddbmm.default}


def _is_param_like(node: torch.fx.Node) -> bool:
    """True if ``node`` is computed from attributes and constants only (no graph input)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return False
        stack.extend(n.all_input_nodes)
    return True


def op_kind(node: torch.fx.Node) -> str | None:
    """The recipe op kind of a node ("linear", "conv2d", "attention"), or None."""
    if node.op != "call_function":
        return None
    t = node.target
    if t in _LINEAR or t in _CONV:
        w = node.args[1] if len(node.args) > 1 else None
        if isinstance(w, torch.fx.Node) and _is_param_like(w):
            return "linear" if t in _LINEAR else "conv2d"
        return None
    if t in _SDPA:
        return "attention"
    if t in _MATMUL or t in _BADDBMM:
        operands = node.args[1:3] if t in _BADDBMM else node.args[:2]
        if all(isinstance(a, torch.fx.Node) and not _is_param_like(a) for a in operands):
            return "attention"
    return None


def weight_arg_index(node: torch.fx.Node) -> int | None:
    return 1 if op_kind(node) in ("linear", "conv2d") else None


def activation_arg_indices(node: torch.fx.Node) -> list[int]:
    kind = op_kind(node)
    if kind in ("linear", "conv2d"):
        return [0]
    if kind == "attention":
        if node.target in _SDPA:
            return [0, 1, 2]
        if node.target in _BADDBMM:
            return [1, 2]
        return [0, 1]
    return []


def is_float_tensor(node: object) -> bool:
    if not isinstance(node, torch.fx.Node):
        return False
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def module_path(node: torch.fx.Node) -> str:
    """The qualified name of the innermost module the op was called in (from nn_module_stack)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if isinstance(path, str) and path:
            return path
    return node.name


def quantizable_nodes(gm: torch.fx.GraphModule) -> Iterator[torch.fx.Node]:
    for node in gm.graph.nodes:
        if op_kind(node) is not None:
            yield node


def data_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The inputs of ``node`` that carry tensor data (or containers of tensors).

    Shape-only edges are left out: with a dynamic batch, ``sym_size(sample, 0)`` feeds views and
    ``ones(B)`` everywhere, and counting those edges would make every node depend on the sample.
    """
    return [i for i in node.all_input_nodes if not isinstance(i.meta.get("val"), (int, torch.SymInt, float,
                                                                                   torch.SymFloat, bool))]


def dependency_sets(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, frozenset[str]]:
    """For each node, the names of the graph inputs (placeholders) its data depends on."""
    deps: dict[torch.fx.Node, frozenset[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            deps[node] = frozenset({node.name})
        else:
            acc: frozenset[str] = frozenset()
            for inp in data_inputs(node):
                acc |= deps.get(inp, frozenset())
            deps[node] = acc
    return deps


def structural_roles(gm: torch.fx.GraphModule, sample: str | None, timestep: str | None
                     ) -> dict[torch.fx.Node, frozenset[str]]:
    """Roles of every quantizable op (see module docstring)."""
    qops = {n for n in gm.graph.nodes if op_kind(n) is not None}
    deps = dependency_sets(gm)

    # forward: reached from the sample without crossing a quantizable op
    fresh: dict[torch.fx.Node, bool] = {}
    # forward: number of quantizable ops on the longest timestep path into a node
    tdepth: dict[torch.fx.Node, int] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            fresh[node] = node.name == sample
            tdepth[node] = 0
            continue
        inputs = data_inputs(node)
        fresh[node] = any(fresh.get(i, False) and i not in qops for i in inputs)
        tdepth[node] = max((tdepth.get(i, 0) + (i in qops) for i in inputs), default=0)

    # backward: the output is reached without crossing a quantizable op
    tail: dict[torch.fx.Node, bool] = {}
    for node in reversed(gm.graph.nodes):
        if node.op == "output":
            tail[node] = True
            continue
        tail[node] = any(tail.get(u, False) and u not in qops and node in data_inputs(u) for u in node.users)

    roles: dict[torch.fx.Node, frozenset[str]] = {}
    for node in qops:
        acts = [node.args[i] for i in activation_arg_indices(node) if i < len(node.args)]
        acts = [a for a in acts if isinstance(a, torch.fx.Node)]
        r: set[str] = set()
        if any(fresh.get(a, False) for a in acts):
            r.add("input")
        if any(tail.get(u, False) for u in node.users):
            r.add("output")
        act_deps = frozenset().union(*(deps[a] for a in acts)) if acts else frozenset()
        if sample is not None and sample not in act_deps:
            r.add("conditioning")
            if timestep is not None and timestep in act_deps and max(tdepth[a] for a in acts) < 2:
                r.add("timestep_embedding")
        roles[node] = frozenset(r)
    return roles


def shares_batch(x: torch.fx.Node, t: torch.fx.Node) -> bool:
    """True when x's leading dimension is provably the timestep's length (same size or symbol), so a
    per-sample scale taken from t lines up with x's samples."""
    xv, tv = x.meta.get("val"), t.meta.get("val")
    if not isinstance(xv, torch.Tensor) or not isinstance(tv, torch.Tensor) or tv.dim() != 1 or xv.dim() == 0:
        return False
    return str(xv.shape[0]) == str(tv.shape[0])


def getitem_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [u for u in node.users if u.op == "call_function" and u.target is operator.getitem]


def annotated(node: torch.fx.Node) -> bool:
    spec = meta.get_layer_spec(node)
    return spec is not None and not spec.is_float
