"""Attach timestep tables: activation quantizers read their scale and zero point from a table
indexed by the timestep.

    fake_quant(x, s, z, qmin, qmax)                       s, z: one value for every timestep
 →  i = timestep_index(timestep, T, timestep_scale, clamp)                  (once per forward)
    fake_quant(x, S[i], Z[i], qmin, qmax, axis=0)         per sample: x and timestep share the batch
    fake_quant(x, S[i₀], Z[i₀], qmin, qmax)               per tensor: scalar timestep, or a batch
                                                          that cannot be matched (i₀ = i[0])

``S, Z`` are buffers of length T (``<quantizer>_scale_table``, ``<quantizer>_zero_point_table``)
initialised from ``prog.state.timestep_tables`` (TDQ's frozen generators, a free per-step table,
PTQD's per-bit-width scales...). ``i = round(t · timestep_scale)`` (``stepq.compiler.timesteps``, whose
``gather_timestep_table`` builds both gather forms), so one compiled model serves any schedule and
step count; out-of-range timesteps raise or clamp by ``recipe.timestep_policy``. Inference pays one
index per forward and one gather per quantizer.

A quantizer that already reads a table is left alone: writing new table values into its buffers is
``refresh_tables``.

Requires: no observer and no scale source left (materialized quantizers, a frozen TDQ source).
Guarantees: every activation quantizer with a table in ``prog.state.timestep_tables`` reads it
through a timestep gather; a second run rewrites nothing. Not semantics-preserving (the tables are
new scales).
"""

from __future__ import annotations

import torch
import torch.fx

from stepq.compiler import meta, ops
from stepq.compiler.graph_utils import arg_node, delete_attr, register_tensor
from stepq.compiler.pass_manager import Contract, NoneLeft, OpAbsent, Pass, PassResult
from stepq.compiler.program import Program
from stepq.compiler.state import TimestepTable
from stepq.compiler.timesteps import gather_timestep_table, match_timestep_gather
from stepq.passes.insert_scale_source import is_scale_source
from stepq.passes.materialize_quantizers import is_observer

__all__ = ["AttachTimestepTables", "TimestepTable", "is_activation_quantizer"]


def is_activation_quantizer(node: torch.fx.Node) -> bool:
    return node.target is ops.FAKE_QUANT and node.meta.get(meta.QUANTIZER_ROLE) == "activation"


def _unattached(prog: Program) -> list[torch.fx.Node]:
    """Activation quantizers with a table in the state that do not gather it."""
    tables = prog.state.timestep_tables
    return [n for n in prog.gm.graph.nodes if is_activation_quantizer(n)
            and n.meta.get(meta.ACT_QUANTIZER) in tables and match_timestep_gather(n.args[1]) is None]


class AttachTimestepTables(Pass):
    name = "attach_timestep_tables"
    contract = Contract(
        requires=(OpAbsent(is_observer, "observer"), OpAbsent(is_scale_source, "scale source")),
        produces=(NoneLeft(_unattached, "quantizer with a timestep table in program state that does not read it"),),
        preserves_semantics=False,
        idempotent=True,
    )

    def __call__(self, prog: Program) -> PassResult:
        tables: dict[str, TimestepTable] = prog.state.timestep_tables
        gm, graph = prog.gm, prog.gm.graph
        T = prog.recipe.num_train_timesteps
        count = 0
        for node in _unattached(prog):
            name = node.meta[meta.ACT_QUANTIZER]
            table = tables[name]
            if table.scale.numel() != T:
                raise ValueError(f"timestep table of {name!r} has {table.scale.numel()} entries; the recipe's "
                                 f"num_train_timesteps is {T}")
            x = arg_node(node, 0)
            old_s, old_z = node.args[1], node.args[2]
            s_name = register_tensor(gm, f"{name}_scale_table", table.scale.detach().float().clone())
            z_name = register_tensor(gm, f"{name}_zero_point_table", table.zero_point.detach().float().clone())
            s = gather_timestep_table(prog, s_name, x, before=node)
            z = gather_timestep_table(prog, z_name, x, before=node)
            node.update_arg(1, s)
            node.update_arg(2, z)
            node.update_arg(5, 0 if match_timestep_gather(s).per_sample else None)  # type: ignore[union-attr]
            for old in (old_s, old_z):
                if isinstance(old, torch.fx.Node) and old.op == "get_attr" and not old.users:
                    graph.erase_node(old)
                    delete_attr(gm, old.target)
            count += 1
        return PassResult(count)
