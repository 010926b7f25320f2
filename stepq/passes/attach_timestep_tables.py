"""Attach timestep tables: activation quantizers read their scale and zero point from a table
indexed by the timestep.

    fake_quant(x, s, z, qmin, qmax)                       s, z: one value for every timestep
 →  i = timestep_index(timestep, T, timestep_scale, clamp)                  (once per forward)
    fake_quant(x, S[i], Z[i], qmin, qmax, axis=0)         per sample: x and timestep share the batch
    fake_quant(x, S[i₀], Z[i₀], qmin, qmax)               per tensor: scalar timestep, or a batch
                                                          that cannot be matched (i₀ = i[0])

``S, Z`` are buffers of length T (``<quantizer>_scale_table``, ``<quantizer>_zero_point_table``)
taken from ``prog.state.timestep_tables`` (TDQ's frozen generators, a free per-step table,
PTQD's per-bit-width scales...). ``i = round(t · timestep_scale)`` (``stepq.compiler.timesteps``), so
one compiled model serves any schedule and step count; out-of-range timesteps raise or clamp by
``recipe.timestep_policy``. Inference pays one index per forward and one gather per quantizer.

Requires: materialized activation quantizers. Guarantees: each quantizer with a table reads it;
a second run with the same tables changes nothing; new table values update the buffers (counted).
"""

from __future__ import annotations

import torch
import torch.fx

from stepq.compiler import meta, ops
from stepq.compiler.analysis import shares_batch
from stepq.compiler.graph_utils import arg_node, delete_attr, fetch_attr, register_tensor
from stepq.compiler.pass_manager import PassResult
from stepq.compiler.program import Program
from stepq.compiler.state import TimestepTable

__all__ = ["AttachTimestepTables", "TimestepTable", "timestep_index_node"]

aten = torch.ops.aten


def timestep_index_node(prog: Program) -> torch.fx.Node:
    """The graph's single ``timestep_index`` node (created after the placeholders if absent)."""
    graph = prog.gm.graph
    for n in graph.nodes:
        if n.target is ops.TIMESTEP_INDEX:
            return n
    t = prog.timestep_node
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
    recipe = prog.recipe
    with graph.inserting_after(last_placeholder):
        idx = graph.call_function(ops.TIMESTEP_INDEX, (t, recipe.num_train_timesteps, float(prog.timestep_scale),
                                                       recipe.timestep_policy == "clamp"))
    meta.mark_inserted(idx)
    val = t.meta.get("val")
    if isinstance(val, torch.Tensor):
        idx.meta["val"] = val.new_empty(val.shape, dtype=torch.int64) if not val.is_meta else val
    return idx


def _table_target(node: torch.fx.Node) -> str | None:
    """The scale-table buffer a fake_quant reads, if it reads one."""
    s = node.args[1]
    if isinstance(s, torch.fx.Node) and s.target is aten.index.Tensor:
        table = arg_node(s, 0)
        if table.op == "get_attr":
            return str(table.target)
    return None


class AttachTimestepTables:
    name = "attach_timestep_tables"

    def __call__(self, prog: Program) -> PassResult:
        tables: dict[str, TimestepTable] = prog.state.timestep_tables
        if not tables:
            return PassResult(0)
        gm, graph = prog.gm, prog.gm.graph
        T = prog.recipe.num_train_timesteps
        count = 0
        idx_node = None
        for node in list(graph.nodes):
            if node.target is not ops.FAKE_QUANT or node.meta.get(meta.QUANTIZER_ROLE) != "activation":
                continue
            name = node.meta[meta.ACT_QUANTIZER]
            table = tables.get(name)
            if table is None:
                continue
            if table.scale.numel() != T:
                raise ValueError(f"timestep table of {name!r} has {table.scale.numel()} entries; the recipe's "
                                 f"num_train_timesteps is {T}")
            existing = _table_target(node)
            if existing is not None:
                s_buf = fetch_attr(gm, existing)
                z_buf = fetch_attr(gm, arg_node(arg_node(node, 2), 0).target)
                if torch.equal(s_buf, table.scale.float()) and torch.equal(z_buf, table.zero_point.float()):
                    continue
                s_buf.copy_(table.scale)
                z_buf.copy_(table.zero_point)
                count += 1
                continue
            if idx_node is None:
                idx_node = timestep_index_node(prog)
            x = arg_node(node, 0)
            old_s, old_z = node.args[1], node.args[2]
            s_name = register_tensor(gm, f"{name}_scale_table", table.scale.detach().float().clone())
            z_name = register_tensor(gm, f"{name}_zero_point_table", table.zero_point.detach().float().clone())
            per_sample = shares_batch(x, prog.timestep_node)
            with graph.inserting_before(node):
                index = idx_node
                if not per_sample and isinstance(idx_node.meta.get("val"), torch.Tensor) and idx_node.meta["val"].dim() == 1:
                    index = graph.call_function(aten.select.int, (idx_node, 0, 0))
                    meta.mark_inserted(index)
                s_attr, z_attr = graph.get_attr(s_name), graph.get_attr(z_name)
                s = graph.call_function(aten.index.Tensor, (s_attr, [index]))
                z = graph.call_function(aten.index.Tensor, (z_attr, [index]))
            for n in (s_attr, z_attr, s, z):
                meta.mark_inserted(n)
            node.update_arg(1, s)
            node.update_arg(2, z)
            node.update_arg(5, 0 if per_sample else None)
            for old in (old_s, old_z):
                if isinstance(old, torch.fx.Node) and old.op == "get_attr" and not old.users:
                    graph.erase_node(old)
                    delete_attr(gm, old.target)
            count += 1
        return PassResult(count)
