"""Refresh tables: write the program state's current values into the buffers the passes created from it.

The rewriting passes create their buffers once, from the state as it was (``attach_timestep_tables``,
``select_bits``, ``correct_noise``); the methods then keep changing the state (PTQD chooses a bits
table, recalibrates the lower widths, measures k_t and b_t). This step copies, for every state-fed
buffer a node of the graph reads,

    <q>_scale_table, <q>_zero_point_table  ←  prog.state.timestep_tables[q]      (S, Z)
    ptqd_bits_table                        ←  prog.state.ptqd_bits.table          (every step at the top
                                                                                  width without one)
    <q>_a<b>_scale[_table], …zero_point…   ←  prog.state.ptqd_scales[q][b]
    ptqd_k_table, ptqd_bias_table          ←  correction_tables(prog.state.ptqd, recipe.ptqd flags)
                                              (zeros without statistics)

and leaves the graph's structure alone. A buffer whose state has no entry (a loaded model has no
``ptqd_scales``) keeps its values. The count is the number of buffers whose contents changed.

Requires: nothing. Guarantees: every state-fed buffer equals its state; a second run writes
nothing. Not semantics-preserving (new values are the point).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.fx

from stepq.compiler import meta
from stepq.compiler.graph_utils import fetch_attr, has_attr
from stepq.compiler.pass_manager import Condition, Contract, Pass, PassResult
from stepq.compiler.program import Program
from stepq.compiler.timesteps import match_timestep_gather
from stepq.passes.attach_timestep_tables import is_activation_quantizer
from stepq.passes.correct_noise import BIAS_TABLE, K_TABLE, correction_tables, is_correction_table
from stepq.passes.select_bits import BITS_TABLE, bits_table, switched_quantizers

__all__ = ["RefreshTables", "state_fed_buffers"]


def _buffer(arg: object) -> str | None:
    """The buffer a scale / zero-point argument reads: a get_attr, or the table of a timestep gather."""
    if not isinstance(arg, torch.fx.Node):
        return None
    if arg.op == "get_attr":
        return str(arg.target)
    g = match_timestep_gather(arg)
    return str(g.table.target) if g is not None else None


def state_fed_buffers(prog: Program) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(buffer, the value the state gives it, the state field) for every state-fed buffer the graph reads."""
    gm, state = prog.gm, prog.state
    for n in gm.graph.nodes:
        table = state.timestep_tables.get(n.meta.get(meta.ACT_QUANTIZER)) if is_activation_quantizer(n) else None
        s, z = (match_timestep_gather(n.args[1]), match_timestep_gather(n.args[2])) if table is not None else (None, None)
        if table is not None and s is not None and z is not None:
            yield str(s.table.target), table.scale, "timestep_tables"
            yield str(z.table.target), table.zero_point, "timestep_tables"
    cfg = prog.recipe.ptqd if prog.recipe is not None else None
    if cfg is not None and cfg.mixed_bits and has_attr(gm, BITS_TABLE):
        yield BITS_TABLE, bits_table(prog, tuple(cfg.mixed_bits)), "ptqd_bits"
    for top, branches in switched_quantizers(gm):
        scales = state.ptqd_scales.get(str(top.meta.get(meta.ACT_QUANTIZER)), {})
        for bits, q in branches.items():
            qp = scales.get(bits)
            s_buf, z_buf = _buffer(q.args[1]), _buffer(q.args[2])
            if qp is not None and s_buf is not None and z_buf is not None:
                yield s_buf, qp.scale, "ptqd_scales"
                yield z_buf, qp.zero_point, "ptqd_scales"
    if any(is_correction_table(n) for n in gm.graph.nodes):
        k, b = correction_tables(prog, fetch_attr(gm, BIAS_TABLE).shape[1])
        yield K_TABLE, k, "ptqd"
        yield BIAS_TABLE, b, "ptqd"


def _stale(prog: Program) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, str]]:
    for name, value, field in state_fed_buffers(prog):
        buf = fetch_attr(prog.gm, name)
        new = value.detach().to(buf.dtype).reshape(buf.shape)
        if not torch.equal(buf, new):
            yield name, buf, new, field


class BuffersMatchState(Condition):
    """Every state-fed buffer holds what the program state gives it."""

    def violation(self, prog: Program) -> str | None:
        for name, _, _, field in _stale(prog):
            return f"buffer {name!r} differs from program state {field!r}"
        return None

    def describe(self) -> str:
        return "every state-fed buffer equal to the program state"


class RefreshTables(Pass):
    name = "refresh_tables"
    contract = Contract(produces=(BuffersMatchState(),), preserves_semantics=False, idempotent=True)

    def __call__(self, prog: Program) -> PassResult:
        details = []
        with torch.no_grad():
            for name, buf, new, field in list(_stale(prog)):
                buf.copy_(new)
                details.append(f"{name} <- {field}")
        return PassResult(len(details), tuple(details))
