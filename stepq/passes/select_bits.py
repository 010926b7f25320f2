"""Select bits: activation quantizers switch their bit-width per timestep (PTQD step-aware mixed precision).

For widths b₁ < … < b_n (``recipe.ptqd.mixed_bits``, e.g. 4 < 8), every activation quantizer that the
recipe's default rule placed at the top width b_n gets one branch per lower width, and a bits table
gathered by the timestep picks the branch:

    q = fake_quant(x, s, z, 0, 2^{b_n}−1)
 →  q_n = fake_quant(x, s, z, 0, 2^{b_n}−1)                  unchanged (its scale may be a TDQ gather)
    q_j = fake_quant(x, s_j, z_j, 0, 2^{b_j}−1)              j < n: the same tensor's scale at b_j bits
    n_t = Bits[i],  i = timestep_index(t)                    Bits: [T] int64 buffer ``ptqd_bits_table``
    q   = where(n_t == b₁, q₁, where(n_t == b₂, q₂, … q_n))  per sample (n_t viewed [B, 1, …]) or per tensor

Weights are untouched (one integer weight set serves every width). ``s_j, z_j`` come from the same
calibration statistics as ``s, z`` (``prog.state.activation_stats``) with the spec's bits set to b_j
and, below 8 bits, the MSE range search the presets use. When ``s, z`` are per-timestep tables (TDQ),
the lower width gets tables too: the TDQ range at each t, [qmin − z(t), qmax − z(t)]·s(t), shrunk by
the ratio of the static b_j-bit range to the static b_n-bit range, then re-gridded at b_j bits.
Once a bits table is chosen, each lower width is calibrated on the statistics of the timesteps that
run at it (PTQD: "calibrated on that step range's data"; the observers keep per-timestep samples),
falling back to all timesteps where calibration saw none of them.

The io / timestep-embedding layers the presets keep at 8 bits by rule are not switched (PTQD's
8-bit islands). The table comes from ``prog.state.ptqd_bits`` (``stepq.methods.ptqd.MixedPrecision``);
without one every timestep uses b_n, so the rewrite changes nothing numerically until the bits are
chosen. In the reference backend both branches run and ``where`` selects per sample; the ONNX
export carries it as an If on the (batch-shared) step's width (see docs/PTQD.md).

Requires: materialized activation quantizers (and their statistics for a first run), ``recipe.ptqd``
with ``mixed_bits``. Guarantees: every switchable quantizer is switched once; a second run changes
nothing; a new bits table updates the buffer (one rewrite).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from stepq.calibration.qparams import activation_qparams, qparams_from_range
from stepq.compiler import meta, ops
from stepq.compiler.analysis import shares_batch
from stepq.compiler.errors import PreconditionError
from stepq.compiler.graph_utils import arg_node, fetch_attr, has_attr, register_tensor
from stepq.compiler.pass_manager import PassResult
from stepq.compiler.program import Program
from stepq.passes.attach_timestep_tables import timestep_index_node
from stepq.recipe.specs import MSEObserver, QuantSpec

if TYPE_CHECKING:
    from stepq.methods.ptqd.mixed import MixedPrecision

__all__ = ["BITS_TABLE", "SelectBits", "low_bit_spec", "switchable_quantizers"]

aten = torch.ops.aten

#: the buffer of activation bit-widths per training timestep.
BITS_TABLE = "ptqd_bits_table"
_ROLE = "select_bits"


def low_bit_spec(spec: QuantSpec, bits: int) -> QuantSpec:
    """``spec`` at ``bits`` bits (MSE range search below 8 bits, as the presets do)."""
    observer = MSEObserver() if bits < 8 else spec.observer
    return dataclasses.replace(spec, bits=bits, observer=observer)


def switchable_quantizers(gm: torch.fx.GraphModule, top_bits: int) -> list[torch.fx.Node]:
    """Activation fake_quants at ``top_bits`` whose every consumer was decided by the recipe default."""
    out = []
    for n in gm.graph.nodes:
        if n.target is not ops.FAKE_QUANT or n.meta.get(meta.QUANTIZER_ROLE) != "activation":
            continue
        spec = n.meta.get(meta.QSPEC)
        if spec is None or spec.bits != top_bits or n.meta.get(meta.PTQD_NODE) == _ROLE:
            continue
        users = [u for u in n.users if u.meta.get(meta.PTQD_NODE) != _ROLE]
        if users and all(u.meta.get(meta.RULE) == "default" for u in users):
            out.append(n)
    return out


def _bits_table(prog: Program, widths: tuple[int, ...]) -> torch.Tensor:
    T = prog.recipe.num_train_timesteps
    mp: MixedPrecision | None = prog.state.ptqd_bits
    if mp is None:
        return torch.full((T,), widths[-1], dtype=torch.int64)
    table = mp.table.to(torch.int64)
    if table.shape != (T,):
        raise PreconditionError(f"select_bits: the bits table has shape {tuple(table.shape)}, expected ({T},)")
    bad = set(table.unique().tolist()) - set(widths)
    if bad:
        raise PreconditionError(f"select_bits: the bits table uses widths {sorted(bad)} outside {widths}")
    return table


def _observed(st: Any, steps: torch.Tensor | None) -> tuple[torch.Tensor, float, float]:
    """(values, lo, hi) of a quantizer's calibration statistics, restricted to the training timesteps
    ``steps`` (those that run at the width being calibrated) where calibration saw them, else all."""
    if steps is not None:
        seen = [t for t in steps.tolist() if int(t) in st.per_timestep]
        if seen:
            idx = torch.tensor(seen, dtype=torch.int64)
            values = torch.cat([st.samples_at(t) for t in seen])
            return values, float(st.min[idx].min()), float(st.max[idx].max())
    return st.overall.values, st.global_min, st.global_max


def low_qparams(gm: torch.fx.GraphModule, fq: torch.fx.Node, st: Any, spec: QuantSpec, low: QuantSpec,
                steps: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the ``low``-bit branch of the quantizer ``fq`` (at ``spec``): scalars,
    or [T] tables when fq reads timestep tables (the TDQ range at each t, shrunk by the ratio of the
    static low-bit range to the static top-width range). Calibrated on the steps that run at ``low``."""
    values, lo, hi = _observed(st, steps)
    s_low, z_low = activation_qparams(values, lo, hi, low)
    s_node = fq.args[1]
    if not (isinstance(s_node, torch.fx.Node) and s_node.target is aten.index.Tensor):
        return s_low, z_low
    s_tab = fetch_attr(gm, arg_node(s_node, 0).target)
    z_tab = fetch_attr(gm, arg_node(arg_node(fq, 2), 0).target)
    s_hi, _ = activation_qparams(values, lo, hi, spec)
    ratio = (s_low * (low.quant_max - low.quant_min)) / (s_hi * (spec.quant_max - spec.quant_min))
    lo_t = (spec.quant_min - torch.round(z_tab)) * s_tab * ratio
    hi_t = (spec.quant_max - torch.round(z_tab)) * s_tab * ratio
    s_t, z_t = qparams_from_range(lo_t, hi_t, low)
    return s_t.float(), z_t.float()


def _steps(table: torch.Tensor, widths: tuple[int, ...], chosen: bool) -> dict[int, torch.Tensor | None]:
    return {b: (torch.nonzero(table == b).reshape(-1) if chosen else None) for b in widths}


def _recalibrate(prog: Program, steps: dict[int, torch.Tensor | None]) -> int:
    """Refresh the low-bit branches' scales from the steps that now run at their width."""
    gm, stats = prog.gm, prog.state.activation_stats
    count = 0
    for w in [n for n in gm.graph.nodes if n.target is aten.where.self and n.meta.get(meta.PTQD_NODE) == _ROLE]:
        q_low, high = arg_node(w, 1), arg_node(w, 2)
        while high.target is aten.where.self:
            high = arg_node(high, 2)
        st = stats.get(high.meta.get(meta.ACT_QUANTIZER))
        if st is None or q_low.target is not ops.FAKE_QUANT:
            continue  # a loaded model: no calibration statistics to recompute from
        low: QuantSpec = q_low.meta[meta.QSPEC]
        s_new, z_new = low_qparams(gm, high, st, high.meta[meta.QSPEC], low, steps[low.bits])
        changed = False
        for arg, new in ((arg_node(q_low, 1), s_new), (arg_node(q_low, 2), z_new)):
            buf = fetch_attr(gm, (arg_node(arg, 0) if arg.op != "get_attr" else arg).target)
            if not torch.equal(buf, new.to(buf.dtype).reshape(buf.shape)):
                buf.copy_(new.reshape(buf.shape))
                changed = True
        count += changed
    return count


class SelectBits:
    name = "select_bits"

    def __call__(self, prog: Program) -> PassResult:
        cfg = prog.recipe.ptqd
        if cfg is None or not cfg.mixed_bits:
            return PassResult(0)
        widths = tuple(cfg.mixed_bits)
        gm = prog.gm
        table = _bits_table(prog, widths)
        steps = _steps(table, widths, prog.state.has('ptqd_bits'))
        count = 0
        if has_attr(gm, BITS_TABLE):
            buf = fetch_attr(gm, BITS_TABLE)
            if not torch.equal(buf, table):
                buf.copy_(table)
                count += 1
            count += _recalibrate(prog, steps)
        fqs = switchable_quantizers(gm, widths[-1])
        if not fqs:
            return PassResult(count)
        stats = prog.state.activation_stats
        missing = [fq.meta[meta.ACT_QUANTIZER] for fq in fqs if fq.meta[meta.ACT_QUANTIZER] not in stats]
        if missing:
            raise PreconditionError(f"select_bits needs the calibration statistics of {missing[:3]}... "
                                    "(prog.state.activation_stats); run it at convert time")
        if not has_attr(gm, BITS_TABLE):
            register_tensor(gm, BITS_TABLE, table)
        switch = _Switch(prog, widths)
        for fq in fqs:
            switch(fq, stats[fq.meta[meta.ACT_QUANTIZER]], steps)
            count += 1
        return PassResult(count)


class _Switch:
    """Builds the branches and the where chain for one quantizer at a time (bits gathers are shared)."""

    def __init__(self, prog: Program, widths: tuple[int, ...]):
        self.prog, self.gm, self.graph = prog, prog.gm, prog.gm.graph
        self.widths = widths
        self.idx = timestep_index_node(prog)
        self.gathers: dict[tuple[bool, int], torch.fx.Node] = {}

    def _new(self, node: torch.fx.Node, **extra: Any) -> torch.fx.Node:
        return meta.mark_inserted(node, **{meta.PTQD_NODE: _ROLE, **extra})

    def _bits(self, x: torch.fx.Node) -> torch.fx.Node:
        """Bits[i] shaped to broadcast against x (per sample when x shares t's batch)."""
        xv, iv = x.meta.get("val"), self.idx.meta.get("val")
        per_sample = shares_batch(x, self.prog.timestep_node) and isinstance(iv, torch.Tensor) and iv.dim() == 1
        rank = xv.dim() if isinstance(xv, torch.Tensor) else 0
        key = (per_sample, rank if per_sample else 0)
        if key not in self.gathers:
            g = self.graph
            with g.inserting_before(self.idx.next):  # right after the index: before every quantizer's use
                index = self.idx
                if not per_sample and isinstance(iv, torch.Tensor) and iv.dim() == 1:
                    index = self._new(g.call_function(aten.select.int, (self.idx, 0, 0)))
                bits = self._new(g.call_function(aten.index.Tensor, (self._new(g.get_attr(BITS_TABLE)), [index])))
                if per_sample and rank > 1:
                    bits = self._new(g.call_function(aten.view.default, (bits, [-1] + [1] * (rank - 1))))
            self.gathers[key] = bits
        return self.gathers[key]

    def _low_qparams(self, fq: torch.fx.Node, st: Any, spec: QuantSpec, low: QuantSpec,
                     steps: torch.Tensor | None) -> tuple[torch.fx.Node, torch.fx.Node]:
        """Scale and zero-point nodes of the ``low`` branch (static buffers, or tables gathered like fq's)."""
        g, name = self.graph, fq.meta[meta.ACT_QUANTIZER]
        s_low, z_low = low_qparams(self.gm, fq, st, spec, low, steps)
        s_node = fq.args[1]
        if isinstance(s_node, torch.fx.Node) and s_node.target is aten.index.Tensor:
            index_arg = s_node.args[1]
            s_name = register_tensor(self.gm, f"{name}_a{low.bits}_scale_table", s_low)
            z_name = register_tensor(self.gm, f"{name}_a{low.bits}_zero_point_table", z_low)
            s_attr, z_attr = self._new(g.get_attr(s_name)), self._new(g.get_attr(z_name))
            return (self._new(g.call_function(aten.index.Tensor, (s_attr, index_arg))),
                    self._new(g.call_function(aten.index.Tensor, (z_attr, index_arg))))
        s_name = register_tensor(self.gm, f"{name}_a{low.bits}_scale", s_low)
        z_name = register_tensor(self.gm, f"{name}_a{low.bits}_zero_point", z_low)
        return self._new(g.get_attr(s_name)), self._new(g.get_attr(z_name))

    def __call__(self, fq: torch.fx.Node, st: Any, steps: dict[int, torch.Tensor | None]) -> None:
        g = self.graph
        x = arg_node(fq, 0)
        spec: QuantSpec = fq.meta[meta.QSPEC]
        name = fq.meta[meta.ACT_QUANTIZER]
        axis = fq.args[5] if len(fq.args) > 5 else None
        users = list(fq.users)
        bits = self._bits(x)
        with g.inserting_before(fq.next):
            result = fq
            for b in reversed(self.widths[:-1]):
                low = low_bit_spec(spec, b)
                s, z = self._low_qparams(fq, st, spec, low, steps[b])
                q = g.call_function(ops.FAKE_QUANT, (x, s, z, low.quant_min, low.quant_max, axis, 0))
                self._new(q, **{meta.QUANTIZER_ROLE: "activation", meta.ACT_QUANTIZER: f"{name}@a{b}",
                                meta.QSPEC: low})
                q.meta["val"] = fq.meta.get("val")
                cond = self._new(g.call_function(aten.eq.Scalar, (bits, b)))
                result = self._new(g.call_function(aten.where.self, (cond, q, result)), **{meta.ACT_QUANTIZER: name})
                result.meta["val"] = fq.meta.get("val")
        for u in users:
            u.replace_input_with(fq, result)
