"""Insert a scale source: activation quantizers take their step size from a function of t.

    fake_quant(x, s, z, qmin, qmax)                          s: the calibrated static step
 →  i = timestep_index(timestep, …)                          (shared with the timestep tables)
    S = call_module[activation_scale_source](i)              [L, B]: TDQ generators or a free table
    fake_quant(x, S[l], z, qmin, qmax, axis=0)               per sample (x shares the batch with t)
    fake_quant(x, S[l][0], z, qmin, qmax)                    otherwise

The source is made by the factory the pass is constructed with, ``make_source(recipe, names,
static) -> nn.Module`` (``stepq.methods.tdq.sources.make_scale_source``: TDQ generators or a free
table), called with the quantizer names and their static steps; it maps the index [B] to [L, B] and
starts at the static steps, so until the source is trained the rewrite changes the steps by rounding
only (softplus∘softplus⁻¹, ~1 ulp; a value on a rounding boundary can move one level, which is why
the contract does not claim semantics); zero points stay static. The static scale buffers are
kept (``freeze_scale_source`` falls back to them). This is the trainable form used by PTQ fitting
and QAT; ``freeze_scale_source`` turns it into timestep tables at convert time.

This is not ``stepq.compiler.timesteps.gather_timestep_table``'s form: the timestep dimension is
consumed by the source itself (it is evaluated at i for the whole batch, so gradients reach it), and
S[l] / S[l][0] select a quantizer's row and a sample of that output, not a table row. The per-sample
decision is the same one (``gathers_per_sample``).

Requires: a recipe with a ``tdq`` section; no observer left. Guarantees: no activation quantizer
reads a static step (every one reads the source); a second run rewrites nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx

from stepq.compiler import meta, ops
from stepq.compiler.graph_utils import arg_node, fetch_attr, has_attr
from stepq.compiler.pass_manager import Contract, OpAbsent, Pass, PassResult, RecipeHas
from stepq.compiler.program import Program
from stepq.compiler.timesteps import gathers_per_sample, timestep_index_node
from stepq.passes.materialize_quantizers import is_observer
from stepq.recipe.specs import Recipe

__all__ = ["SCALE_SOURCE", "InsertScaleSource", "ScaleSourceFactory", "is_scale_source", "scale_source_node"]

aten = torch.ops.aten

#: the GraphModule attribute the scale source lives under.
SCALE_SOURCE = "activation_scale_source"

#: ``make_source(recipe, names, static_scales [L]) -> module`` mapping timestep indices [B] to [L, B].
ScaleSourceFactory = Callable[[Recipe, list[str], torch.Tensor], torch.nn.Module]


def is_scale_source(node: torch.fx.Node) -> bool:
    return node.op == "call_module" and node.target == SCALE_SOURCE


def scale_source_node(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    return next((n for n in gm.graph.nodes if is_scale_source(n)), None)


def _static_activation_quantizer(node: torch.fx.Node) -> bool:
    return (node.target is ops.FAKE_QUANT and node.meta.get(meta.QUANTIZER_ROLE) == "activation"
            and isinstance(node.args[1], torch.fx.Node) and arg_node(node, 1).op == "get_attr")


class InsertScaleSource(Pass):
    name = "insert_scale_source"
    contract = Contract(
        requires=(RecipeHas("tdq"), OpAbsent(is_observer, "observer")),
        produces=(OpAbsent(_static_activation_quantizer, "activation quantizer with a static step"),),
        # the source reproduces each static step to ~1 ulp, but a value on a rounding boundary can then move one
        # level (rel. L2 up to 4e-3 measured on random models, more at 4 bits): no tolerance is claimed
        preserves_semantics=False,
        idempotent=True,
    )

    def __init__(self, make_source: ScaleSourceFactory):
        self.make_source = make_source

    def __repr__(self) -> str:
        return f"InsertScaleSource({getattr(self.make_source, '__name__', self.make_source)!s})"

    def __call__(self, prog: Program) -> PassResult:
        gm, graph = prog.gm, prog.gm.graph
        if has_attr(gm, SCALE_SOURCE):
            return PassResult(0)
        fqs = [n for n in graph.nodes if _static_activation_quantizer(n)]
        if not fqs:
            return PassResult(0)
        names = [n.meta[meta.ACT_QUANTIZER] for n in fqs]
        static = torch.stack([fetch_attr(gm, arg_node(n, 1).target).detach().reshape(()) for n in fqs]).float()
        gm.add_submodule(SCALE_SOURCE, self.make_source(prog.recipe, names, static))
        idx = timestep_index_node(prog)
        with graph.inserting_after(idx):
            call = graph.call_module(SCALE_SOURCE, (idx,))
        meta.mark_inserted(call)
        for row, fq in enumerate(fqs):
            old = arg_node(fq, 1)
            per_sample = gathers_per_sample(prog, arg_node(fq, 0))
            with graph.inserting_before(fq):
                s = graph.call_function(aten.select.int, (call, 0, row))
                if not per_sample:
                    s = graph.call_function(aten.select.int, (s, 0, 0))
            meta.mark_inserted(s)
            fq.update_arg(1, s)
            fq.update_arg(5, 0 if per_sample else None)
            if not old.users:
                graph.erase_node(old)
        return PassResult(len(fqs))
