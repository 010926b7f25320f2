"""Insert a scale source: activation quantizers take their step size from a function of t.

    fake_quant(x, s, z, qmin, qmax)                          s: the calibrated static step
 →  i = timestep_index(timestep, …)                          (shared with the timestep tables)
    S = call_module[activation_scale_source](i)              [L, B]: TDQ generators or a free table
    fake_quant(x, S[l], z, qmin, qmax, axis=0)               per sample (x shares the batch with t)
    fake_quant(x, S[l][0], z, qmin, qmax)                    otherwise

The source is made by the factory the pass is constructed with, ``make_source(recipe, names,
static, zero_points) -> nn.Module`` (``stepq.methods.tdq.sources.make_scale_source``: TDQ generators
or a free table; ``stepq.methods.efficientdm.talsq.make_temporal_steps``: EfficientDM's TALSQ),
called with the quantizer names and their static steps and zero points; it maps the index [B] to
[L, B]. A source with a ``zero_point_source`` submodule (TALSQ) also gives the zero points,

    Z = call_module[activation_scale_source.zero_point_source](i)   [L, B]
    fake_quant(x, S[l], Z[l], qmin, qmax, axis=0)

otherwise the zero points stay static. A source
starts at the static steps (and zero points), so until the source is trained the rewrite changes the steps by rounding
only (softplus∘softplus⁻¹, ~1 ulp; a value on a rounding boundary can move one level, which is why
the contract does not claim semantics); zero points stay static. The static scale buffers are
kept (``freeze_scale_source`` falls back to them). This is the trainable form used by PTQ fitting
and QAT; ``freeze_scale_source`` turns it into timestep tables at convert time.

This is not ``stepq.compiler.timesteps.gather_timestep_table``'s form: the timestep dimension is
consumed by the source itself (it is evaluated at i for the whole batch, so gradients reach it), and
S[l] / S[l][0] select a quantizer's row and a sample of that output, not a table row. The per-sample
decision is the same one (``gathers_per_sample``).

Requires: a recipe with a ``tdq`` section or a ``qalora`` section with TALSQ; no observer left. Guarantees: no activation quantizer
reads a static step (every one reads the source); a second run rewrites nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx

from stepq.compiler import meta, ops
from stepq.compiler.graph_utils import arg_node, fetch_attr, has_attr
from stepq.compiler.pass_manager import Condition, Contract, OpAbsent, Pass, PassResult
from stepq.compiler.program import Program
from stepq.compiler.timesteps import gathers_per_sample, timestep_index_node
from stepq.passes.materialize_quantizers import is_observer
from stepq.recipe.specs import Recipe

__all__ = ["SCALE_SOURCE", "ZERO_POINT_SOURCE", "InsertScaleSource", "RecipeHasTimestepSteps", "ScaleSourceFactory", "is_scale_source", "scale_source_node"]

aten = torch.ops.aten

#: the GraphModule attribute the scale source lives under.
SCALE_SOURCE = "activation_scale_source"

#: ``make_source(recipe, names, static_scales [L], static_zero_points [L]) -> module`` mapping timestep
#: indices [B] to [L, B].
ScaleSourceFactory = Callable[[Recipe, list[str], torch.Tensor, torch.Tensor], torch.nn.Module]

#: the submodule of a source that also gives the zero points (TALSQ)
ZERO_POINT_SOURCE = "zero_point_source"


class RecipeHasTimestepSteps(Condition):
    """The recipe learns activation steps per timestep: a ``tdq`` section, or ``qalora`` with TALSQ."""

    def violation(self, prog: Program) -> str | None:
        r = prog.recipe
        if r is None:
            return "the program has no recipe"
        if r.tdq is not None or (r.qalora is not None and r.qalora.talsq):
            return None
        return f"recipe {r.name!r} has no 'tdq' section and no 'qalora' section with talsq"

    def describe(self) -> str:
        return "a recipe with a 'tdq' section or a 'qalora' section with talsq"


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
        requires=(RecipeHasTimestepSteps(), OpAbsent(is_observer, "observer")),
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
        zeros = torch.stack([fetch_attr(gm, arg_node(n, 2).target).detach().reshape(()) for n in fqs]).float()
        source = self.make_source(prog.recipe, names, static, zeros)
        gm.add_submodule(SCALE_SOURCE, source)
        idx = timestep_index_node(prog)
        with graph.inserting_after(idx):
            call = graph.call_module(SCALE_SOURCE, (idx,))
        meta.mark_inserted(call)
        zcall = None
        if isinstance(getattr(source, ZERO_POINT_SOURCE, None), torch.nn.Module):
            with graph.inserting_after(call):
                zcall = graph.call_module(f"{SCALE_SOURCE}.{ZERO_POINT_SOURCE}", (idx,))
            meta.mark_inserted(zcall)
        for row, fq in enumerate(fqs):
            old_s, old_z = arg_node(fq, 1), arg_node(fq, 2)
            per_sample = gathers_per_sample(prog, arg_node(fq, 0))
            fq.update_arg(1, _row(graph, call, row, per_sample, fq))
            if zcall is not None:
                fq.update_arg(2, _row(graph, zcall, row, per_sample, fq))
            fq.update_arg(5, 0 if per_sample else None)
            for old in (old_s, old_z):
                if not old.users:
                    graph.erase_node(old)
        return PassResult(len(fqs))


def _row(graph: torch.fx.Graph, call: torch.fx.Node, row: int, per_sample: bool, before: torch.fx.Node) -> torch.fx.Node:
    """S[row] (per sample) or S[row][0] of the source's [L, B] output, inserted before ``before``."""
    with graph.inserting_before(before):
        s = graph.call_function(aten.select.int, (call, 0, row))
        if not per_sample:
            s = graph.call_function(aten.select.int, (s, 0, 0))
    meta.mark_inserted(s)
    return s
