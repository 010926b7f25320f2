"""The graph module split into one submodule per transformer / UNet block, for per-block FSDP2 units.

An exported graph reads every weight with ``get_attr`` inside its own forward, so FSDP2 (which
gathers a unit's parameters in the unit's forward pre-hook) can only treat it as one unit. Here
the graph is cut into contiguous partitions (``torch.fx.passes.split_module``): one per block
(a module path ``…blocks.<i>`` / ``transformer_blocks.<i>`` / ``single_transformer_blocks.<i>`` /
``layers.<i>`` / ``down_blocks.<i>`` / ``up_blocks.<i>`` / ``mid_block``, the outermost one on the
node's ``nn_module_stack``) and one per stretch of the graph between blocks. Each partition is a
submodule the split graph calls, and each tensor only one partition reads (``get_attr``) is
registered in that partition, under its original qualified name: the partition's forward then
reads its own weights, and ``fully_shard`` on it gathers one block at a time.

Which node goes where: a node with an ``nn_module_stack`` goes to its outermost block (or
outside every block); a node without one (the quantizers stepq inserted) goes where all its
users go, outside the blocks when they disagree; a stretch outside the blocks that lies between
two stretches of the same block joins it. Partitions follow the node order (a partition reads
only values of earlier ones), so the split graph computes exactly what the graph computes, op
for op, in the same order.

The split module holds the graph's own tensor and module objects (no copy: ``split_blocks``
checks that every parameter and buffer of the split is one of ``gm``'s). It is a view to
train through and throw away; ``gm`` is not changed.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx.passes.split_module import split_module

from stepq.compiler.errors import PostconditionError

__all__ = ["BLOCK_PATH", "BlockSplit", "block_of", "split_blocks"]

#: a module path that is one block of a DiT-like or UNet-like denoiser (diffusers and DiT naming)
BLOCK_PATH = re.compile(r"(?:.*\.)?(?:(?:transformer_blocks|single_transformer_blocks|blocks|layers|down_blocks|up_blocks)"
                        r"\.\d+|mid_block)")

_COMPUTE = ("call_function", "call_method", "call_module")


@dataclass
class BlockSplit:
    """``module``: the split graph module (its forward is ``gm``'s); ``blocks``: its partitions that
    are blocks, in call order, each with the block's module path."""

    module: torch.fx.GraphModule
    blocks: list[tuple[str, torch.fx.GraphModule]]


def block_of(node: torch.fx.Node) -> str | None:
    """The outermost block on ``node``'s module stack; ``""`` outside every block; None without a stack."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for path, _ in stack.values():
        if isinstance(path, str) and BLOCK_PATH.fullmatch(path):
            return path
    return ""


def _keys(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, str]:
    """Each compute node's block (``""``: outside), by the rules of the module docstring."""
    nodes = [n for n in gm.graph.nodes if n.op in _COMPUTE]
    key: dict[torch.fx.Node, str] = {}
    for n in reversed(nodes):  # users first
        k = block_of(n)
        if k is None:
            users = {key[u] for u in n.users if u in key}
            k = users.pop() if len(users) == 1 else ""
        key[n] = k
    ordered = [key[n] for n in nodes]
    i = 0
    while i < len(ordered):  # an outside stretch between two stretches of one block joins it
        j = i
        while j < len(ordered) and ordered[j] == "":
            j += 1
        if j > i and i > 0 and j < len(ordered) and ordered[i - 1] == ordered[j]:
            ordered[i:j] = [ordered[j]] * (j - i)
        i = max(j, i + 1)
    return dict(zip(nodes, ordered, strict=True))


def _get(root: nn.Module, qualname: str) -> object:
    *prefix, leaf = qualname.split(".")
    return getattr(root.get_submodule(".".join(prefix)) if prefix else root, leaf)


def _put(root: nn.Module, qualname: str, t: Tensor) -> None:
    *prefix, leaf = qualname.split(".")
    owner = root
    for item in prefix:
        if not hasattr(owner, item):
            owner.add_module(item, nn.Module())
        owner = getattr(owner, item)
    if isinstance(t, nn.Parameter):
        owner.register_parameter(leaf, t)
    else:
        owner.register_buffer(leaf, t)


def _delete(root: nn.Module, qualname: str) -> None:
    *prefix, leaf = qualname.split(".")
    delattr(root.get_submodule(".".join(prefix)) if prefix else root, leaf)


def _localize(split: torch.fx.GraphModule) -> None:
    """Move every tensor the split graph reads by ``get_attr`` for exactly one partition call into
    that partition (the same object, under the same qualified name)."""
    for call in [n for n in split.graph.nodes if n.op == "call_module"]:
        sub = split.get_submodule(str(call.target))
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        kept = []
        for arg, ph in zip(call.args, placeholders, strict=True):
            t = _get(split, str(arg.target)) if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" else None
            if not isinstance(t, Tensor) or len(arg.users) != 1:
                kept.append(arg)
                continue
            _put(sub, str(arg.target), t)
            with sub.graph.inserting_before(ph):
                read = sub.graph.get_attr(str(arg.target))
            read.meta = ph.meta
            ph.replace_all_uses_with(read)
            sub.graph.erase_node(ph)
        if len(kept) != len(call.args):
            moved = [a for a in call.args if a not in kept]
            call.args = tuple(kept)
            for a in moved:
                split.graph.erase_node(a)
                _delete(split, str(a.target))
            sub.recompile()
    split.delete_all_unused_submodules()
    split.graph.lint()


def split_blocks(gm: torch.fx.GraphModule) -> BlockSplit | None:
    """``gm`` split per block (module docstring); None when no node lies in a block."""
    key = _keys(gm)
    segment: dict[torch.fx.Node, int] = {}
    names: list[str] = []
    for n, k in key.items():
        if not names or names[-1] != k:
            names.append(k)
        segment[n] = len(names) - 1
    if not any(names):
        return None
    split = split_module(gm, gm, lambda n: segment[n], keep_original_order=True)
    _localize(split)
    split.graph._codegen = copy.deepcopy(gm.graph._codegen)  # gm's signature and output structure
    split.recompile()
    own = {id(t) for t in (*gm.parameters(), *gm.buffers())}
    foreign = [name for name, t in (*split.named_parameters(), *split.named_buffers()) if id(t) not in own]
    if foreign:
        raise PostconditionError(f"split_blocks: the split holds tensors that are not the graph's own: {foreign[:5]}")
    blocks = [(k, split.get_submodule(f"submod_{i}")) for i, k in enumerate(names) if k]
    return BlockSplit(split, blocks)  # type: ignore[arg-type]
