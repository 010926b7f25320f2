"""Annotate: the recipe decides, per quantizable op, what to quantize.

For every op whose kind is "linear" (``aten.linear``), "conv2d" (``aten.conv2d``) or "attention"
(``aten.scaled_dot_product_attention`` and activation×activation ``matmul``/``bmm``/``baddbmm``),
this pass writes into ``node.meta`` the layer's module path (from ``nn_module_stack``), its op kind,
its structural roles (``stepq.compiler.analysis``) and the ``LayerSpec`` of the first recipe rule
that matches (None = keep in floating point).

Requires: a captured graph. Guarantees: every quantizable op carries ``meta.LAYER_SPEC`` (possibly
None) and ``meta.LAYER``; the graph itself is unchanged. The count is the number of ops whose
annotation changed, so a second run reports 0.
"""

from __future__ import annotations

from stepq.compiler import analysis, meta
from stepq.compiler.pass_manager import PassResult
from stepq.compiler.program import Program
from stepq.recipe.specs import Recipe

__all__ = ["AnnotateLayers"]

_MISSING = object()


class AnnotateLayers:
    name = "annotate_layers"

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

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
