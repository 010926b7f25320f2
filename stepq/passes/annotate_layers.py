"""Annotate: the recipe decides, per quantizable op, what to quantize.

For every op whose kind is "linear" (``aten.linear``), "conv2d" (``aten.conv2d``) or "attention"
(``aten.scaled_dot_product_attention`` and activation×activation ``matmul``/``bmm``/``baddbmm``),
this pass writes into ``node.meta`` the layer's module path (from ``nn_module_stack``), its op kind,
its structural roles (``stepq.compiler.analysis``) and the ``LayerSpec`` of the first recipe rule
that matches (None = keep in floating point).

Requires: nothing. Guarantees: every quantizable op carries ``meta.LAYER_SPEC`` (possibly None),
``meta.LAYER``, ``meta.OP_KIND`` and ``meta.ROLES``; the graph itself is unchanged (bit-identical
outputs). The count is the number of ops whose annotation changed, so a second run reports 0.
"""

from __future__ import annotations

from stepq.compiler import analysis, meta
from stepq.compiler.pass_manager import Contract, NodesHave, Pass, PassResult
from stepq.compiler.program import Program
from stepq.recipe.specs import Recipe

__all__ = ["AnnotateLayers"]

_MISSING = object()


def _quantizable(node: object) -> bool:
    return analysis.op_kind(node) is not None  # type: ignore[arg-type]


class AnnotateLayers(Pass):
    name = "annotate_layers"
    contract = Contract(
        produces=tuple(NodesHave(k, on=_quantizable, what="quantizable op")
                       for k in (meta.LAYER_SPEC, meta.LAYER, meta.OP_KIND, meta.ROLES)),
        preserves_semantics=True,
        tolerance=0.0,
        idempotent=True,
    )

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def __repr__(self) -> str:
        return f"AnnotateLayers({self.recipe.name!r})"

    def __call__(self, prog: Program) -> PassResult:
        gm = prog.gm
        roles = analysis.structural_roles(gm, prog.sample_arg, prog.timestep_arg)
        count = 0
        for node, node_roles in roles.items():
            path = analysis.module_path(node)
            kind = analysis.op_kind(node)
            assert kind is not None
            spec, rule = self.recipe.spec_for(path, kind, node_roles)
            new = {meta.LAYER: path, meta.OP_KIND: kind, meta.ROLES: node_roles, meta.LAYER_SPEC: spec,
                   meta.RULE: rule}
            if any(node.meta.get(k, _MISSING) != v for k, v in new.items()):
                node.meta.update(new)
                count += 1
        return PassResult(count)
