"""Small helpers for editing a GraphModule's attributes and nodes."""

from __future__ import annotations

import torch
import torch.fx

__all__ = ["arg_node", "as_parameter", "delete_attr", "fetch_attr", "has_attr", "owner", "register_tensor", "unique_name"]


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
