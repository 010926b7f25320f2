"""Select bits: activation quantizers switch their bit-width per timestep (PTQD step-aware mixed precision).

For widths b₁ < … < b_n (``recipe.ptqd.mixed_bits``, e.g. 4 < 8), every activation quantizer that the
recipe's default rule placed at the top width b_n gets one branch per lower width, and a bits table
gathered by the timestep picks the branch:

    q = fake_quant(x, s, z, 0, 2^{b_n}−1)
 →  q_n = fake_quant(x, s, z, 0, 2^{b_n}−1)                  unchanged (its scale may be a TDQ gather)
    q_j = fake_quant(x, s_j, z_j, 0, 2^{b_j}−1)              j < n: the same tensor's scale at b_j bits
    n_t = Bits[i],  i = timestep_index(t)                    Bits: [T] int64 buffer ``ptqd_bits_table``
    q   = where(n_t == b₁, q₁, where(n_t == b₂, q₂, … q_n))  per sample (n_t viewed [B, 1, …]) or per tensor

Weights are untouched (one integer weight set serves every width). ``s_j, z_j`` are
``prog.state.ptqd_scales[q][b_j]``, computed from the calibration statistics by
``stepq.methods.ptqd.mixed.CalibrateWidths`` (``stepq.calibration.qparams.low_bit_qparams``): a
buffer for a static quantizer, [T] tables gathered like the quantizer's own when it reads timestep
tables (TDQ). The gathers are ``stepq.compiler.timesteps.gather_timestep_table``'s.

The io / timestep-embedding layers the presets keep at 8 bits by rule are not switched (PTQD's
8-bit islands). The bits table starts from ``prog.state.ptqd_bits`` (``stepq.methods.ptqd.MixedPrecision``);
without one every timestep uses b_n, and the rewrite is then exact (``where`` picks q_n). With a chosen
table it is not, so the contract does not claim semantics. Writing a new table or new low-bit scales into
the buffers of an existing switch is ``refresh_tables``'s job, not this pass's. In the reference
backend both branches run and ``where`` selects per sample; the ONNX export carries it as an If on the
(batch-shared) step's width (see docs/PTQD.md).

Requires: a recipe with a ``ptqd`` section; no observer left; ``prog.state.ptqd_scales`` for every
switchable quantizer. Guarantees: no switchable quantizer left unswitched (each switched once); a
second run rewrites nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from stepq.calibration.qparams import low_bit_spec
from stepq.compiler import meta, ops
from stepq.compiler.errors import PreconditionError
from stepq.compiler.graph_utils import arg_node, has_attr, register_tensor
from stepq.compiler.pass_manager import Contract, NoneLeft, OpAbsent, Pass, PassResult, RecipeHas, StateCovers
from stepq.compiler.program import Program
from stepq.compiler.state import QParams
from stepq.compiler.timesteps import gather_timestep_table, gathers_per_sample, match_timestep_gather
from stepq.passes.materialize_quantizers import is_observer

if TYPE_CHECKING:
    from stepq.methods.ptqd.mixed import MixedPrecision

__all__ = ["BITS_TABLE", "SelectBits", "bits_table", "switchable_quantizers", "switched_quantizers", "to_switch"]

aten = torch.ops.aten

#: the buffer of activation bit-widths per training timestep.
BITS_TABLE = "ptqd_bits_table"
_ROLE = "select_bits"


def _widths(prog: Program) -> tuple[int, ...]:
    cfg = prog.recipe.ptqd if prog.recipe is not None else None
    return tuple(cfg.mixed_bits) if cfg is not None else ()


def switchable_quantizers(gm: torch.fx.GraphModule, top_bits: int) -> list[torch.fx.Node]:
    """Activation fake_quants at ``top_bits``, not yet switched, whose every consumer was decided by the
    recipe default."""
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


def switched_quantizers(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, dict[int, torch.fx.Node]]]:
    """Every switched quantizer: (its top-width fake_quant, {lower width: that branch's fake_quant})."""
    out: dict[torch.fx.Node, dict[int, torch.fx.Node]] = {}
    for w in gm.graph.nodes:
        if w.target is not aten.where.self or w.meta.get(meta.PTQD_NODE) != _ROLE:
            continue
        q_low, high = arg_node(w, 1), arg_node(w, 2)
        while high.target is aten.where.self:
            high = arg_node(high, 2)
        if q_low.target is ops.FAKE_QUANT:
            out.setdefault(high, {})[q_low.meta[meta.QSPEC].bits] = q_low
    return list(out.items())


def to_switch(prog: Program) -> list[torch.fx.Node]:
    """The quantizers select_bits would switch now (top width from ``recipe.ptqd.mixed_bits``)."""
    widths = _widths(prog)
    return switchable_quantizers(prog.gm, widths[-1]) if widths else []


def bits_table(prog: Program, widths: tuple[int, ...]) -> torch.Tensor:
    """[T] int64: ``prog.state.ptqd_bits``'s table (checked), or every step at the top width."""
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


class SelectBits(Pass):
    name = "select_bits"
    contract = Contract(
        requires=(RecipeHas("ptqd"), OpAbsent(is_observer, "observer"),
                  StateCovers("ptqd_scales", to_switch, "switchable activation quantizer")),
        produces=(NoneLeft(to_switch, "switchable activation quantizer left unswitched"),),
        preserves_semantics=False,  # exact only while the bits table is all top width
        idempotent=True,
    )

    def __call__(self, prog: Program) -> PassResult:
        widths = _widths(prog)
        if not widths:
            return PassResult(0)
        fqs = to_switch(prog)
        if not fqs:
            return PassResult(0)
        if not has_attr(prog.gm, BITS_TABLE):
            register_tensor(prog.gm, BITS_TABLE, bits_table(prog, widths))
        switch = _Switch(prog, widths)
        for fq in fqs:
            switch(fq, prog.state.ptqd_scales[fq.meta[meta.ACT_QUANTIZER]])
        return PassResult(len(fqs))


class _Switch:
    """Builds the branches and the where chain for one quantizer at a time (bits gathers are shared)."""

    def __init__(self, prog: Program, widths: tuple[int, ...]):
        self.prog, self.gm, self.graph = prog, prog.gm, prog.gm.graph
        self.widths = widths
        self.gathers: dict[tuple[bool, int], torch.fx.Node] = {}

    def _new(self, node: torch.fx.Node, **extra: Any) -> torch.fx.Node:
        return meta.mark_inserted(node, **{meta.PTQD_NODE: _ROLE, **extra})

    def _bits(self, x: torch.fx.Node) -> torch.fx.Node:
        """Bits[i] shaped to broadcast against x (one gather per form and rank, right after the index)."""
        xv = x.meta.get("val")
        key = (gathers_per_sample(self.prog, x), xv.dim() if isinstance(xv, torch.Tensor) else 0)
        if key not in self.gathers:
            self.gathers[key] = gather_timestep_table(self.prog, BITS_TABLE, x, broadcast=True,
                                                      extra_meta={meta.PTQD_NODE: _ROLE})
        return self.gathers[key]

    def _qparams(self, fq: torch.fx.Node, x: torch.fx.Node, bits: int, qp: QParams) -> tuple[torch.fx.Node, torch.fx.Node]:
        """Scale and zero-point nodes of the ``bits`` branch (static buffers, or tables gathered like fq's)."""
        g, name = self.graph, fq.meta[meta.ACT_QUANTIZER]
        tables = match_timestep_gather(fq.args[1]) is not None
        if tables != (qp.scale.dim() == 1):
            raise PreconditionError(f"select_bits: {name!r} reads {'timestep tables' if tables else 'one scale'} "
                                    f"but its {bits}-bit scale in prog.state.ptqd_scales has shape "
                                    f"{tuple(qp.scale.shape)}")
        if tables:
            s_name = register_tensor(self.gm, f"{name}_a{bits}_scale_table", qp.scale.clone())
            z_name = register_tensor(self.gm, f"{name}_a{bits}_zero_point_table", qp.zero_point.clone())
            extra = {meta.PTQD_NODE: _ROLE}
            return (gather_timestep_table(self.prog, s_name, x, before=fq, extra_meta=extra),
                    gather_timestep_table(self.prog, z_name, x, before=fq, extra_meta=extra))
        s_name = register_tensor(self.gm, f"{name}_a{bits}_scale", qp.scale.clone())
        z_name = register_tensor(self.gm, f"{name}_a{bits}_zero_point", qp.zero_point.clone())
        with g.inserting_before(fq):
            return self._new(g.get_attr(s_name)), self._new(g.get_attr(z_name))

    def __call__(self, fq: torch.fx.Node, scales: dict[int, QParams]) -> None:
        g = self.graph
        x = arg_node(fq, 0)
        spec = fq.meta[meta.QSPEC]
        name = fq.meta[meta.ACT_QUANTIZER]
        axis = fq.args[5] if len(fq.args) > 5 else None
        users = list(fq.users)
        bits = self._bits(x)
        after = fq.next
        result = fq
        for b in reversed(self.widths[:-1]):
            low = low_bit_spec(spec, b)
            s, z = self._qparams(fq, x, b, scales[b])
            with g.inserting_before(after):
                q = g.call_function(ops.FAKE_QUANT, (x, s, z, low.quant_min, low.quant_max, axis, 0))
                self._new(q, **{meta.QUANTIZER_ROLE: "activation", meta.ACT_QUANTIZER: f"{name}@a{b}",
                                meta.QSPEC: low})
                q.meta["val"] = fq.meta.get("val")
                cond = self._new(g.call_function(aten.eq.Scalar, (bits, b)))
                result = self._new(g.call_function(aten.where.self, (cond, q, result)), **{meta.ACT_QUANTIZER: name})
                result.meta["val"] = fq.meta.get("val")
        for u in users:
            u.replace_input_with(fq, result)
