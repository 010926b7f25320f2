"""Canonicalize what torch.export leaves that later stages cannot take.

Rewrites (each counted):

* ``call_module[_guards_fn]`` — the input-guard closure of ``ep.module()``. It holds arbitrary
  Python, so it can be neither serialised nor exported; stepq checks inputs itself
  (``InputSignature.bind``). Removed.
* ``aten.squeeze.dim(x, d)`` where ``x.shape[d] != 1`` — a no-op in PyTorch, but the ONNX exporter
  emits a real Squeeze and ONNX Runtime rejects the model (PixArt: ``hidden_states.squeeze(1)`` on a
  [B, 64, C] tensor; FACTS.md Q1). Replaced by its input.
* ``aten.dropout.default(x, p, train=False)`` — identity in eval mode. Replaced by its input.

Requires: placeholders with ``meta['val']`` (a captured graph). Guarantees: none of the above left;
bit-identical outputs; a second run rewrites nothing.
"""

from __future__ import annotations

import torch
import torch.fx

from stepq.compiler.pass_manager import Contract, NodesHave, OpAbsent, Pass, PassResult
from stepq.compiler.program import Program

__all__ = ["CanonicalizeExport"]

aten = torch.ops.aten


def _squeeze_is_noop(node: torch.fx.Node) -> bool:
    if node.target is not aten.squeeze.dim:
        return False
    src = node.args[0]
    val = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return False
    d = int(node.args[1]) % val.dim()  # type: ignore[arg-type]
    # a symbolic size (the dynamic batch) is kept: the squeeze may act on it
    size = val.shape[d]
    return isinstance(size, int) and size != 1


def _is_guards_fn(node: torch.fx.Node) -> bool:
    return node.op == "call_module" and node.target == "_guards_fn"


def _is_eval_dropout(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target is aten.dropout.default and len(node.args) >= 3
            and node.args[2] is False)


class CanonicalizeExport(Pass):
    name = "canonicalize_export"
    contract = Contract(
        requires=(NodesHave("val", on=lambda n: n.op == "placeholder", what="placeholder"),),
        produces=(OpAbsent(_is_guards_fn, "_guards_fn call"),
                  OpAbsent(lambda n: n.op == "call_function" and _squeeze_is_noop(n), "no-op squeeze"),
                  OpAbsent(_is_eval_dropout, "eval-mode dropout")),
        preserves_semantics=True,
        tolerance=0.0,
        idempotent=True,
    )

    def __call__(self, prog: Program) -> PassResult:
        graph = prog.gm.graph
        count = 0
        details = []
        for node in list(graph.nodes):
            if _is_guards_fn(node):
                graph.erase_node(node)
                if hasattr(prog.gm, "_guards_fn"):
                    delattr(prog.gm, "_guards_fn")
                count += 1
                details.append("removed _guards_fn")
            elif node.op == "call_function" and _squeeze_is_noop(node):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                count += 1
                details.append(f"removed no-op squeeze {node.name}")
            elif _is_eval_dropout(node):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                count += 1
        return PassResult(count, tuple(details))
