"""Freeze the scale source: evaluate it at every training timestep and drop it from the graph.

    S = call_module[activation_scale_source](i);  fake_quant(x, S[l]…, z, …)
 →  fake_quant(x, s_static, z, …)   and   prog.state.timestep_tables[q_l] = (S_l(0 … T−1), z)

The tables are what ``attach_timestep_tables`` (the next pass) gathers from, so the deployed graph
has no generator: TDQ costs one gather per quantizer at inference. For a free table, timesteps
never visited in fitting are interpolated (``ScaleTable.tables``).

Requires: ``insert_scale_source``. Guarantees: no scale source left; one table per quantizer it fed.
"""

from __future__ import annotations

import torch

from stepq.compiler import meta, ops
from stepq.compiler.graph_utils import arg_node, fetch_attr
from stepq.compiler.pass_manager import PassResult
from stepq.compiler.program import Program
from stepq.compiler.state import TimestepTable
from stepq.methods.tdq.sources import ScaleGenerators, ScaleTable
from stepq.passes.insert_scale_source import SCALE_SOURCE, scale_source_node

__all__ = ["FreezeScaleSource"]

aten = torch.ops.aten


class FreezeScaleSource:
    name = "freeze_scale_source"

    def __call__(self, prog: Program) -> PassResult:
        gm, graph = prog.gm, prog.gm.graph
        call = scale_source_node(gm)
        if call is None:
            return PassResult(0)
        source = gm.get_submodule(SCALE_SOURCE)
        assert isinstance(source, (ScaleGenerators, ScaleTable))
        tables = source.tables().detach().float()  # [L, T]
        store = prog.state.timestep_tables
        count = 0
        for fq in [n for n in graph.nodes if n.target is ops.FAKE_QUANT]:
            s = fq.args[1]
            chain = []
            while isinstance(s, torch.fx.Node) and s.target is aten.select.int and s is not call:
                chain.append(s)
                s = s.args[0]
            if s is not call:
                continue
            name = fq.meta[meta.ACT_QUANTIZER]
            row = source.names.index(name)
            z = float(fetch_attr(gm, arg_node(fq, 2).target))
            store[name] = TimestepTable(tables[row].clone(), torch.full_like(tables[row], z))
            with graph.inserting_before(fq):
                static = graph.get_attr(f"{name}_scale")
            meta.mark_inserted(static)
            fq.update_arg(1, static)
            fq.update_arg(5, None)
            for n in chain:
                if not n.users:
                    graph.erase_node(n)
            count += 1
        for n in list(call.users):
            if not n.users:
                graph.erase_node(n)
        if not call.users:
            graph.erase_node(call)
            gm.delete_submodule(SCALE_SOURCE)
        return PassResult(count)
