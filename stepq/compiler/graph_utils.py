"""Small helpers for editing a GraphModule's attributes and nodes."""

from __future__ import annotations

import copy
from collections.abc import Collection

import torch
import torch.fx

from stepq.compiler.noise import contained_noise

__all__ = ["arg_node", "as_parameter", "delete_attr", "fetch_attr", "fold_constant_calls", "has_attr", "owner",
           "register_tensor", "unique_name"]


def _owner(gm: torch.nn.Module, qualname: object, create: bool) -> tuple[torch.nn.Module, str]:
    *path, leaf = str(qualname).split(".")
    mod = gm
    for part in path:
        nxt = getattr(mod, part, None)
        if nxt is None:
            if not create:
                raise AttributeError(qualname)
            nxt = torch.nn.Module()
            mod.add_module(part, nxt)
        if not isinstance(nxt, torch.nn.Module):
            raise AttributeError(f"{qualname}: {part!r} is not a module")
        mod = nxt
    return mod, leaf


def owner(gm: torch.nn.Module, qualname: object) -> tuple[torch.nn.Module, str]:
    """(the module that holds ``qualname``, its leaf name)."""
    return _owner(gm, qualname, create=False)


def has_attr(gm: torch.nn.Module, qualname: object) -> bool:
    try:
        mod, leaf = _owner(gm, qualname, create=False)
    except AttributeError:
        return False
    return hasattr(mod, leaf)


def fetch_attr(gm: torch.nn.Module, qualname: object) -> torch.Tensor:
    mod, leaf = _owner(gm, qualname, create=False)
    return getattr(mod, leaf)


def unique_name(gm: torch.nn.Module, qualname: str) -> str:
    if not has_attr(gm, qualname):
        return qualname
    i = 1
    while has_attr(gm, f"{qualname}_{i}"):
        i += 1
    return f"{qualname}_{i}"


def register_tensor(gm: torch.nn.Module, qualname: str, tensor: torch.Tensor, *, parameter: bool = False,
                    requires_grad: bool = False) -> str:
    """Register ``tensor`` under a fresh qualified name (a suffix is added on a clash); returns the name."""
    qualname = unique_name(gm, qualname)
    mod, leaf = _owner(gm, qualname, create=True)
    if parameter:
        mod.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=requires_grad))
    else:
        mod.register_buffer(leaf, tensor)
    return qualname


def delete_attr(gm: torch.nn.Module, qualname: object) -> None:
    mod, leaf = _owner(gm, qualname, create=False)
    if leaf in mod._parameters:
        del mod._parameters[leaf]
    elif leaf in mod._buffers:
        del mod._buffers[leaf]
    else:
        delattr(mod, leaf)


def arg_node(node: torch.fx.Node, index: int) -> torch.fx.Node:
    """``node.args[index]``, which must be a Node (typed access for passes)."""
    a = node.args[index]
    if not isinstance(a, torch.fx.Node):
        raise TypeError(f"argument {index} of {node.name} is {a!r}, not a graph node")
    return a


def as_parameter(gm: torch.nn.Module, qualname: str) -> torch.nn.Parameter:
    """The attribute ``qualname`` as a parameter: a buffer is re-registered as a ``Parameter`` with
    its value (so an optimiser can train it, e.g. a quantizer's step size); a parameter is returned."""
    mod, leaf = _owner(gm, qualname, create=False)
    t = getattr(mod, leaf)
    if isinstance(t, torch.nn.Parameter):
        return t
    del mod._buffers[leaf]
    p = torch.nn.Parameter(t.detach().clone())
    mod.register_parameter(leaf, p)
    return p


@torch.no_grad()
def fold_constant_calls(gm: torch.fx.GraphModule, targets: Collection[object], *, prefix: str,
                        budget: int | None = None) -> tuple[torch.fx.GraphModule, int]:
    """A module running a copy of ``gm``'s graph in which every call of one of ``targets`` whose tensor
    operands are all constant (``get_attr`` nodes, or calls folded before it: a chain such as
    unpack → dequantize folds whole) is replaced by its value, computed once by the same op on the
    same tensors, so the outputs are bit for bit ``gm``'s. Returns the module and the number of
    values it holds (intermediates of a chain are dropped once their consumers are folded).

    ``gm`` is not modified: the copy shares its parameters, buffers and submodules, and holds the
    values as buffers ``<prefix>_<i>``. ``budget``: the most bytes of values held (the rest is left
    as it is); None, no limit."""
    with contained_noise():  # a graph's deepcopy reports pytree's LeafSpec deprecation
        graph = copy.deepcopy(gm.graph)
    folded = torch.fx.GraphModule(gm, graph)
    made: dict[str, int] = {}  # the values' names → their bytes
    used = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in targets:
            continue
        operands = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.fx.Node)]
        if not operands or any(a.op != "get_attr" for a in operands):
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: fetch_attr(folded, a.target))
        value = node.target(*args, **kwargs)  # type: ignore[operator]
        size = value.numel() * value.element_size()
        if budget is not None and used + size > budget:
            break
        used += size
        name = register_tensor(folded, f"{prefix}_{len(made)}", value)
        made[name] = size
        with graph.inserting_before(node):
            const = graph.get_attr(name)
        const.meta = dict(node.meta)
        node.replace_all_uses_with(const)
        graph.erase_node(node)
        for a in operands:  # an intermediate of a chain whose last consumer was just folded
            if not a.users and str(a.target) in made:
                graph.erase_node(a)
                delete_attr(folded, a.target)
                del made[str(a.target)]
    for node in list(graph.nodes):  # what only the folded calls read (the copy's module still holds it)
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    folded.recompile()
    return folded, len(made)
