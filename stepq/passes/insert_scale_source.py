"""Insert a scale source: activation quantizers take their step size from a function of t.

    fake_quant(x, s, z, qmin, qmax)                          s: the calibrated static step
 →  i = timestep_index(timestep, …)                          (shared with the timestep tables)
    S = call_module[activation_scale_source](i)              [L, B]: TDQ generators or a free table
    fake_quant(x, S[l], z, qmin, qmax, axis=0)               per sample (x shares the batch with t)
    fake_quant(x, S[l][0], z, qmin, qmax)                    otherwise

The source starts at the static steps (``stepq.methods.tdq.sources``), so the rewrite changes nothing
numerically until the source is trained; zero points stay static. The static scale buffers are kept
(``freeze_scale_source`` falls back to them). This is the trainable form used by PTQ fitting and QAT;
``freeze_scale_source`` turns it into timestep tables at convert time.

Requires: materialized activation quantizers, ``recipe.tdq``. Guarantees: every activation
quantizer reads the source; a second run changes nothing.
"""

from __future__ import annotations

import torch
import torch.fx

from stepq.compiler import meta, ops
from stepq.compiler.analysis import shares_batch
from stepq.compiler.graph_utils import arg_node, fetch_attr, has_attr
from stepq.compiler.pass_manager import PassResult
from stepq.compiler.program import Program
from stepq.methods.tdq.sources import ScaleGenerators, ScaleTable
from stepq.passes.attach_timestep_tables import timestep_index_node

__all__ = ["SCALE_SOURCE", "InsertScaleSource", "scale_source_node"]

aten = torch.ops.aten

#: the GraphModule attribute the scale source lives under.
SCALE_SOURCE = "activation_scale_source"


def scale_source_node(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target == SCALE_SOURCE:
            return n
    return None


class InsertScaleSource:
    name = "insert_scale_source"

    def __call__(self, prog: Program) -> PassResult:
        gm, graph = prog.gm, prog.gm.graph
        cfg = prog.recipe.tdq
        if cfg is None or has_attr(gm, SCALE_SOURCE):
            return PassResult(0)
        fqs = [n for n in graph.nodes if n.target is ops.FAKE_QUANT and n.meta.get(meta.QUANTIZER_ROLE) == "activation"
               and isinstance(n.args[1], torch.fx.Node) and arg_node(n, 1).op == "get_attr"]
        if not fqs:
            return PassResult(0)
        names = [n.meta[meta.ACT_QUANTIZER] for n in fqs]
        static = torch.stack([fetch_attr(gm, arg_node(n, 1).target).detach().reshape(()) for n in fqs]).float()
        T = prog.recipe.num_train_timesteps
        source: torch.nn.Module
        if cfg.method == "mlp":
            source = ScaleGenerators(names, static, fourier_dim=cfg.fourier_dim, hidden=cfg.hidden, t_max=cfg.t_max,
                                     num_train_timesteps=T, seed=cfg.seed)
        else:
            source = ScaleTable(names, static, num_train_timesteps=T)
        gm.add_submodule(SCALE_SOURCE, source)
        idx = timestep_index_node(prog)
        with graph.inserting_after(idx):
            call = graph.call_module(SCALE_SOURCE, (idx,))
        meta.mark_inserted(call)
        t_node = prog.timestep_node
        for row, fq in enumerate(fqs):
            old = arg_node(fq, 1)
            with graph.inserting_before(fq):
                s = graph.call_function(aten.select.int, (call, 0, row))
                per_sample = shares_batch(arg_node(fq, 0), t_node)
                if not per_sample:
                    s = graph.call_function(aten.select.int, (s, 0, 0))
            meta.mark_inserted(s)
            fq.update_arg(1, s)
            fq.update_arg(5, 0 if per_sample else None)
            if not old.users:
                graph.erase_node(old)
        return PassResult(len(fqs))
