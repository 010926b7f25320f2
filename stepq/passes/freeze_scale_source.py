"""Freeze the scale source: evaluate it at every training timestep and drop it from the graph.

    S = call_module[activation_scale_source](i);  fake_quant(x, S[l]…, z, …)
 →  fake_quant(x, s_static, z, …)   and   prog.state.timestep_tables[q_l] = (S_l(0 … T−1), z)

The tables are what ``attach_timestep_tables`` (the next pass) gathers from, so the deployed graph
has no generator: TDQ costs one gather per quantizer at inference.

The source is duck-typed: any module under ``activation_scale_source`` with

    names: list[str]          the quantizer of each row, in order
    tables() -> Tensor [L, T] every row at every training timestep t = 0 … T−1

(``stepq.methods.tdq.sources``' ``ScaleGenerators`` evaluate their MLPs; ``ScaleTable``
interpolates the timesteps never visited in fitting). A source whose ``zero_point_source`` feeds the
zero points (EfficientDM's TALSQ) also has ``zero_point_tables() -> Tensor [L, T]``; otherwise each
table's zero point is the quantizer's static one.

Requires: nothing (without a scale source the pass rewrites nothing). Guarantees: no scale source
left; one table per quantizer it fed, in ``prog.state.timestep_tables``. Not semantics-preserving:
until ``attach_timestep_tables`` runs, the quantizers read their static steps again; idempotent.
"""

from __future__ import annotations

import torch

from stepq.compiler import meta, ops
from stepq.compiler.errors import PreconditionError
from stepq.compiler.graph_utils import arg_node, fetch_attr
from stepq.compiler.pass_manager import Contract, OpAbsent, Pass, PassResult
from stepq.compiler.program import Program
from stepq.compiler.state import TimestepTable
from stepq.passes.insert_scale_source import (
    SCALE_SOURCE,
    ZERO_POINT_SOURCE,
    is_scale_source,
    scale_source_node,
)

__all__ = ["FreezeScaleSource"]

aten = torch.ops.aten


class FreezeScaleSource(Pass):
    name = "freeze_scale_source"
    contract = Contract(produces=(OpAbsent(is_scale_source, "scale source"),), writes=("timestep_tables",),
                        preserves_semantics=False, idempotent=True)

    def __call__(self, prog: Program) -> PassResult:
        gm, graph = prog.gm, prog.gm.graph
        call = scale_source_node(gm)
        if call is None:
            return PassResult(0)
        source = gm.get_submodule(SCALE_SOURCE)
        tables_of, names = getattr(source, "tables", None), getattr(source, "names", None)
        if not (callable(tables_of) and isinstance(names, list)):
            raise PreconditionError(f"freeze_scale_source: the scale source {type(source).__name__} has no "
                                    "names list and tables() method")
        tables = tables_of().detach().float()  # [L, T]
        zcall = next((n for n in graph.nodes if n.op == "call_module" and n.target == f"{SCALE_SOURCE}.{ZERO_POINT_SOURCE}"),
                     None)
        zero_of = getattr(source, "zero_point_tables", None)
        if zcall is not None and not callable(zero_of):
            raise PreconditionError(f"freeze_scale_source: the scale source {type(source).__name__} feeds zero points "
                                    "but has no zero_point_tables() method")
        zero_tables = zero_of().detach().float() if zcall is not None and callable(zero_of) else None
        store = prog.state.timestep_tables
        count = 0
        for fq in [n for n in graph.nodes if n.target is ops.FAKE_QUANT]:
            s_chain = _select_chain(fq.args[1], call)
            if s_chain is None:
                continue
            name = fq.meta[meta.ACT_QUANTIZER]
            row = names.index(name)
            z_chain = _select_chain(fq.args[2], zcall) if zcall is not None else None
            with graph.inserting_before(fq):
                static = graph.get_attr(f"{name}_scale")
                meta.mark_inserted(static)
                fq.update_arg(1, static)
                if z_chain is not None and zero_tables is not None:
                    zero = zero_tables[row].clone()
                    z_static = graph.get_attr(f"{name}_zero_point")
                    meta.mark_inserted(z_static)
                    fq.update_arg(2, z_static)
                else:
                    zero = torch.full_like(tables[row], float(fetch_attr(gm, arg_node(fq, 2).target)))
            store[name] = TimestepTable(tables[row].clone(), zero)
            fq.update_arg(5, None)
            for n in (s_chain or []) + (z_chain or []):
                if not n.users:
                    graph.erase_node(n)
            count += 1
        for c in (zcall, call):
            if c is None:
                continue
            for n in list(c.users):
                if not n.users:
                    graph.erase_node(n)
            if not c.users:
                graph.erase_node(c)
        if not call.users and (zcall is None or not zcall.users):
            gm.delete_submodule(SCALE_SOURCE)
        return PassResult(count)


def _select_chain(node: object, call: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The selects from ``node`` up to ``call`` (node = select(...select(call, …)…)), or None when
    ``node`` does not read ``call``."""
    chain = []
    while isinstance(node, torch.fx.Node) and node.target is aten.select.int and node is not call:
        chain.append(node)
        node = node.args[0]
    return chain if node is call else None
