"""The integer timestep grid that every timestep-indexed table uses.

A table has T entries (T = the scheduler's ``num_train_timesteps``, 1000 by default), indexed by the
integer training timestep. A model's timestep input ``t`` maps to ``round(t · timestep_scale)``, so
continuous timesteps (flow matching) land on the grid and one table serves any sampling schedule.
Continuous schedules reach t = T exactly (flow matching starts at σ = 1, t = 1000): the closed
range [0, T] is valid and T maps to the last entry, T − 1.

In a graph the index is one node, ``i = stepq::timestep_index(t, T, timestep_scale, clamp)``
(``timestep_index_node``), and every table is read through one form, built by
``gather_timestep_table`` and recognised by ``match_timestep_gather``:

    index(table, [i])                     per sample: the consumer shares the timestep's batch
    index(table, [select(i, 0, 0)])       one row (the first sample's) otherwise, or i itself when t is 0-d
    … → view(·, [-1, *row, 1, …])         optionally, to broadcast against the consumer

Everything that turns ``t`` into a row outside the graph (the observers, PTQD's statistics) calls
``timestep_index`` with the recipe's ``timestep_policy``, so a table row means the same everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from stepq.compiler import meta, ops
from stepq.compiler.analysis import shares_batch
from stepq.compiler.ops import timestep_index

if TYPE_CHECKING:
    from stepq.compiler.program import Program

__all__ = [
    "TimestepGather",
    "gather_timestep_table",
    "gathers_per_sample",
    "interpolate_unvisited",
    "match_timestep_gather",
    "timestep_index",
    "timestep_index_node",
]

aten = torch.ops.aten

log = logging.getLogger(__name__)


# -- in the graph --------------------------------------------------------------------------------


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


def _batched(idx: torch.fx.Node) -> bool:
    val = idx.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() == 1


def gathers_per_sample(prog: Program, consumer: torch.fx.Node) -> bool:
    """Whether a per-timestep value applied to ``consumer`` is taken per sample: ``consumer``'s
    leading dimension is provably the timestep's batch (else the batch shares its first timestep)."""
    return shares_batch(consumer, prog.timestep_node)


def _precedes(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    n = a.next
    while n is not b and n.op != "root":
        n = n.next
    return n is b


def _first_row(idx: torch.fx.Node, before: torch.fx.Node | None) -> torch.fx.Node:
    """A ``select(i, 0, 0)`` that precedes ``before`` (or, without ``before``, sits right after the
    index); created right after the index if there is none. ``i`` itself when it is 0-d."""
    if not _batched(idx):
        return idx
    for u in idx.users:
        if u.target is aten.select.int and u.args[1:] == (0, 0) and (u.prev is idx if before is None else _precedes(u, before)):
            return u
    graph = idx.graph
    with graph.inserting_before(idx.next):
        first = meta.mark_inserted(graph.call_function(aten.select.int, (idx, 0, 0)))
    val = idx.meta.get("val")
    if isinstance(val, torch.Tensor):
        first.meta["val"] = val[0]
    return first


def gather_timestep_table(prog: Program, table: str, consumer: torch.fx.Node, *, broadcast: bool = False,
                          before: torch.fx.Node | None = None,
                          extra_meta: Mapping[str, Any] | None = None) -> torch.fx.Node:
    """``table[i]`` for ``consumer``: the row of every sample when ``consumer`` shares the timestep's
    batch, else the first sample's row.

    ``table`` is the qualified name of a [T, ...] buffer. With ``broadcast`` the rows are viewed as
    ``[-1, *row_shape, 1, …]`` to ``consumer``'s rank. The nodes go before ``before`` (default: right
    after the index, which precedes every use) and are marked inserted, with ``extra_meta`` on each
    (the shared index and first-row nodes get the plain mark). Returns the last node.
    """
    graph = prog.gm.graph
    extra = dict(extra_meta or {})
    idx = timestep_index_node(prog)
    per_sample = gathers_per_sample(prog, consumer) and _batched(idx)
    row = idx if per_sample else _first_row(idx, before)
    anchor = before if before is not None else row.next
    with graph.inserting_before(anchor):
        attr = meta.mark_inserted(graph.get_attr(table), **extra)
        out = meta.mark_inserted(graph.call_function(aten.index.Tensor, (attr, [row])), **extra)
        cval = consumer.meta.get("val")
        row_shape = list(prog.gm.get_buffer(table).shape[1:])
        if broadcast and isinstance(cval, torch.Tensor) and cval.dim() > len(row_shape):
            ones = [1] * (cval.dim() - 1 - len(row_shape))
            if not per_sample or ones:
                out = meta.mark_inserted(graph.call_function(aten.view.default, (out, [-1, *row_shape, *ones])),
                                         **extra)
    return out


@dataclass(frozen=True)
class TimestepGather:
    """A recognised ``table[i]`` (see the module docstring for the form)."""

    gather: torch.fx.Node  # the aten.index node
    table: torch.fx.Node  # the table's get_attr
    index: torch.fx.Node  # the graph's timestep_index node
    per_sample: bool  # every sample its own row (else the first sample's)
    view: torch.fx.Node | None = None  # the broadcasting view, when ``node`` was it


def match_timestep_gather(node: object) -> TimestepGather | None:
    """The gather ``node`` is (its index node, or the view of one), or None."""
    if not isinstance(node, torch.fx.Node):
        return None
    view = None
    if node.target is aten.view.default and isinstance(node.args[0], torch.fx.Node):
        view, node = node, node.args[0]
    if node.target is not aten.index.Tensor:
        return None
    table, indices = node.args[0], node.args[1]
    if not (isinstance(table, torch.fx.Node) and table.op == "get_attr"):
        return None
    if not isinstance(indices, (list, tuple)) or len(indices) != 1 or not isinstance(indices[0], torch.fx.Node):
        return None
    row = indices[0]
    if row.target is ops.TIMESTEP_INDEX:
        return TimestepGather(node, table, row, _batched(row), view)
    if row.target is aten.select.int and row.args[1:] == (0, 0):
        idx = row.args[0]
        if isinstance(idx, torch.fx.Node) and idx.target is ops.TIMESTEP_INDEX:
            return TimestepGather(node, table, idx, False, view)
    return None


@torch.no_grad()
def interpolate_unvisited(values: torch.Tensor, visited: torch.Tensor) -> torch.Tensor:
    """[L, T] per-timestep values with the timesteps never ``visited`` ([T] bool) filled by linear
    interpolation between the visited neighbours (held at the ends); visited entries unchanged.
    With nothing visited the values are returned as they are."""
    seen = torch.nonzero(visited).reshape(-1)
    if seen.numel() == 0:
        return values.clone()
    if seen.numel() == 1:
        return values[:, seen].expand_as(values).clone()
    t = torch.arange(values.shape[1], dtype=torch.float32, device=values.device)
    pos = torch.searchsorted(seen.float(), t).clamp(1, seen.numel() - 1)
    lo, hi = seen[pos - 1], seen[pos]
    w = ((t - lo.float()) / (hi - lo).float()).clamp(0, 1)
    out = values[:, lo] * (1 - w) + values[:, hi] * w
    out[:, seen] = values[:, seen]
    return out
