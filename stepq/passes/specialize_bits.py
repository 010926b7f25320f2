"""Specialize bits: a mixed-precision graph runs every switched quantizer at one width.

    q = where(Bits[i] == b₁, q₁, where(Bits[i] == b₂, q₂, … q_n))      select_bits' switch
 →  q = q_b                                                             the branch of width b

The other widths' branches, the bits gathers and the ``ptqd_bits_table`` buffer become dead and go
(with every buffer only they read). The result is the single-width graph that runs at b bits on every
step: what the reference computes at a step whose table entry is b, and each branch of the ONNX If
(``stepq.backends.onnx.mixed``). Used by backends on their own copy (``stepq.ptqd.specialize``);
not a stage of the pipeline.

Requires: the width is one of the recipe's ``ptqd.mixed_bits``. Guarantees: no bit switch left; a
second run rewrites nothing. Semantics: identical wherever the bits table says b (not elsewhere).
"""

from __future__ import annotations

import torch
import torch.fx

from stepq.compiler import meta
from stepq.compiler.errors import PreconditionError
from stepq.compiler.graph_utils import delete_attr
from stepq.compiler.pass_manager import Contract, OpAbsent, Pass, PassResult, RecipeHas
from stepq.compiler.program import Program

__all__ = ["SpecializeBits", "is_bit_switch"]

aten = torch.ops.aten


def is_bit_switch(node: torch.fx.Node) -> bool:
    """A ``where`` of select_bits' per-timestep switch."""
    return node.target is aten.where.self and node.meta.get(meta.PTQD_NODE) == "select_bits"


def _branch(node: torch.fx.Node, bits: int) -> torch.fx.Node:
    cond, low, rest = node.args
    assert isinstance(cond, torch.fx.Node) and isinstance(low, torch.fx.Node) and isinstance(rest, torch.fx.Node)
    return low if cond.args[1] == bits else rest


class SpecializeBits(Pass):
    name = "specialize_bits"
    contract = Contract(requires=(RecipeHas("ptqd"),), produces=(OpAbsent(is_bit_switch, "bit switch (select_bits where)"),),
                        preserves_semantics=False, idempotent=True)

    def __init__(self, bits: int):
        self.bits = int(bits)

    def __call__(self, prog: Program) -> PassResult:
        cfg = prog.recipe.ptqd
        if cfg is None or self.bits not in cfg.mixed_bits:
            raise PreconditionError(f"cannot specialize to {self.bits} bits; the model's widths are "
                                    f"{() if cfg is None else tuple(cfg.mixed_bits)}")
        gm = prog.gm
        switch_attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.meta.get(meta.PTQD_NODE) == "select_bits"}
        count = 0
        for node in list(gm.graph.nodes):
            if is_bit_switch(node):
                node.replace_all_uses_with(_branch(node, self.bits))
                count += 1
        if not count:
            return PassResult(0)
        gm.graph.eliminate_dead_code()
        live = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for name in switch_attrs - live:
            delete_attr(gm, str(name))
        return PassResult(count)

    def __repr__(self) -> str:
        return f"SpecializeBits({self.bits})"
