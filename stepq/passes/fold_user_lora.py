"""Fold a user's LoRA: merge the low-rank branch a PEFT / diffusers LoRA adds to a layer into its weight.

    y = op(x, W, b) + s · op_B(op_A(x, A), B)       (PEFT's LoRA Linear / Conv2d, diffusers' load_lora_weights)
 →  y = op(x, W + s · B·A, b)

for ``op`` a linear (A [r, in], B [out, r]) or a conv2d (A [r, in, kh, kw] with the layer's stride,
padding and dilation, B a 1×1 conv [out, r, 1, 1]). ``s`` is the adapter's scaling (α/r), a constant
multiplication of the branch (absent when it is 1); the branch may read x through an identity
(eval-mode dropout). Stacked adapters (several active) fold one after the other. The branch's own
nodes and weights are removed, so the quantizer sees one plain layer and the LoRA costs nothing at
inference (a quantized model + LoRA is the same size and speed as the quantized model).

Runs in prepare, before the recipe annotates layers, so the adapter's A and B are never quantized
on their own. Branches of other forms (DoRA's magnitude, a conv LoRA with another A kernel) are left
as they are.

Requires: nothing. Guarantees: no foldable LoRA branch left; outputs equal within float rounding
(the merged weight is one sum instead of two products); a second run rewrites nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from stepq.compiler import meta
from stepq.compiler.borrow import replace_tensor
from stepq.compiler.graph_utils import delete_attr, fetch_attr, register_tensor
from stepq.compiler.pass_manager import Contract, NoneLeft, Pass, PassResult
from stepq.compiler.program import Program

__all__ = ["FoldUserLoRA", "LoRABranch", "find_lora_branches"]

aten = torch.ops.aten

_OPS = {aten.linear.default: "linear", aten.conv2d.default: "conv2d"}
_IDENTITY = {aten.dropout.default, aten.clone.default, aten.alias.default}


@dataclass(frozen=True)
class LoRABranch:
    """One foldable branch: ``add`` = base + scale · op_B(op_A(x))."""

    add: torch.fx.Node
    base: torch.fx.Node
    a: torch.fx.Node
    b: torch.fx.Node
    mul: torch.fx.Node | None
    scale: float


def _stored(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "get_attr"


def _through_identity(node: object) -> object:
    while isinstance(node, torch.fx.Node) and node.target in _IDENTITY and (
            node.target is not aten.dropout.default or node.args[2] is False or node.args[1] == 0):
        node = node.args[0]
    return node


def _conv_geometry(node: torch.fx.Node) -> tuple[list[int], list[int], list[int], int]:
    args = list(node.args) + [None] * (7 - len(node.args))
    stride, padding, dilation, groups = args[3] or [1, 1], args[4] or [0, 0], args[5] or [1, 1], args[6] or 1
    norm = (lambda v: list(v) * 2 if len(v) == 1 else list(v))  # noqa: E731
    return norm(stride), norm(padding), norm(dilation), int(groups)  # type: ignore[arg-type]


def _branch(add: torch.fx.Node) -> LoRABranch | None:
    if add.target is not aten.add.Tensor or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return None
    for base, other in (add.args, add.args[::-1]):
        if not isinstance(base, torch.fx.Node) or base.target not in _OPS or not isinstance(other, torch.fx.Node):
            continue
        mul, scale, b = None, 1.0, other
        if other.target is aten.mul.Tensor:
            x, y = other.args
            if isinstance(y, (int, float)) and isinstance(x, torch.fx.Node):
                mul, scale, b = other, float(y), x
            elif isinstance(x, (int, float)) and isinstance(y, torch.fx.Node):
                mul, scale, b = other, float(x), y
            else:
                continue
        if b.target is not base.target or len(b.users) != 1 or not _stored(b.args[1]):
            continue
        a = b.args[0]
        if not isinstance(a, torch.fx.Node) or a.target is not base.target or len(a.users) != 1 or not _stored(a.args[1]):
            continue
        if (len(b.args) > 2 and b.args[2] is not None) or (len(a.args) > 2 and a.args[2] is not None):
            continue  # a branch with a bias is not a LoRA
        if _through_identity(a.args[0]) is not _through_identity(base.args[0]) or not _stored(base.args[1]):
            continue
        if mul is not None and len(mul.users) != 1:
            continue
        if _OPS[base.target] == "conv2d":
            geo, ga, gb = _conv_geometry(base), _conv_geometry(a), _conv_geometry(b)
            kb = b.args[1].meta.get("val")  # type: ignore[union-attr]
            if geo[3] != 1 or ga != geo or gb != ([1, 1], [0, 0], [1, 1], 1) or kb is None or tuple(kb.shape[2:]) != (1, 1):
                continue
        return LoRABranch(add, base, a, b, mul, scale)
    return None


def find_lora_branches(gm: torch.fx.GraphModule) -> list[LoRABranch]:
    """Every foldable LoRA branch of ``gm``, in graph order."""
    return [br for n in gm.graph.nodes if (br := _branch(n)) is not None]


class FoldUserLoRA(Pass):
    name = "fold_user_lora"
    contract = Contract(
        produces=(NoneLeft(lambda prog: [br.add for br in find_lora_branches(prog.gm)], "foldable LoRA branch"),),
        preserves_semantics=True,
        tolerance=1e-5,
        idempotent=True,
    )

    def __call__(self, prog: Program) -> PassResult:
        gm, graph = prog.gm, prog.gm.graph
        count = 0
        while branches := find_lora_branches(gm):
            br = branches[0]
            w_node = br.base.args[1]
            assert isinstance(w_node, torch.fx.Node)
            w = fetch_attr(gm, w_node.target)
            A = fetch_attr(gm, br.a.args[1].target).detach()  # type: ignore[union-attr]
            B = fetch_attr(gm, br.b.args[1].target).detach()  # type: ignore[union-attr]
            delta = (B.reshape(B.shape[0], -1).double() @ A.reshape(A.shape[0], -1).double()).reshape(w.shape)
            with torch.no_grad():
                merged = (w.double() + br.scale * delta).to(w.dtype)
                if len(w_node.users) == 1:
                    replace_tensor(gm, str(w_node.target), merged)  # W is the user's (borrowed): never written
                else:  # the weight is shared: the merged one is a new tensor
                    name = register_tensor(gm, f"{w_node.target}_lora_merged", merged)
                    with graph.inserting_before(br.base):
                        new_w = graph.get_attr(name)
                    new_w.meta.update(w_node.meta)
                    meta.mark_inserted(new_w)
                    br.base.update_arg(1, new_w)
            br.add.replace_all_uses_with(br.base)
            factors = [br.b.args[1], br.a.args[1]]
            for n in [br.add] + ([br.mul] if br.mul is not None else []) + [br.b, br.a]:
                graph.erase_node(n)
            for p in factors:
                assert isinstance(p, torch.fx.Node)
                if not p.users:
                    target = p.target
                    graph.erase_node(p)
                    delete_attr(gm, target)
            count += 1
        return PassResult(count)
