"""PTQD's step-aware mixed precision: which activation bit-width each timestep gets, and what it costs.

The forward process at t has signal-to-noise ratio SNR^F(t) = ᾱ_t/(1 − ᾱ_t) (flow matching,
x_t = (1 − σ)x_0 + σε: ((1 − σ)/σ)²). The quantized model at b activation bits has
SNR^Q_b(t) = ‖ε‖/‖ε̂_b − ε‖ (``PTQDStats.snr`` of the model with every switchable quantizer at b
bits). PTQD picks per timestep the smallest b with SNR^Q_b(t) > SNR^F(t), and the largest width
when none qualifies: early, noisy steps tolerate low-bit noise that the late steps do not.

The graph side is ``stepq.passes.select_bits``; here: the choice (``choose_bits``), the state saved
with the model (``MixedPrecision``), the lower widths' scales (``CalibrateWidths``, into
``prog.state.ptqd_scales``), a helper that pins every step to one width (``set_bits``, used to
measure SNR^Q_b), ``specialize`` (the single-width graph, what each branch of the ONNX If is), and
bit operations (BOPs = Σ MACs · w_bits · a_bits over the conv / linear layers).

Each lower width b of a switched quantizer is calibrated on the statistics of the timesteps that run
at b once a bits table is chosen (PTQD: "calibrated on that step range's data"; the observers keep
per-timestep samples), falling back to all timesteps where calibration saw none of them, or before a
table is chosen (``stepq.calibration.qparams.low_bit_qparams``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import Tensor

from stepq.artifact.quantized_model import QuantizedModel
from stepq.calibration.qparams import low_bit_qparams, low_bit_spec
from stepq.compiler import meta, ops
from stepq.compiler.errors import PreconditionError
from stepq.compiler.graph_utils import fetch_attr, has_attr
from stepq.compiler.pass_manager import (
    CompileInputs,
    Contract,
    PassResult,
    RecipeHas,
    StateCovers,
    Step,
    run_passes,
)
from stepq.compiler.program import Program
from stepq.compiler.state import QParams
from stepq.passes.select_bits import BITS_TABLE, bits_table, switched_quantizers, to_switch
from stepq.passes.specialize_bits import SpecializeBits

__all__ = ["CalibrateWidths", "LayerCost", "MixedPrecision", "bit_operations", "choose_bits", "forward_snr",
           "layer_costs", "set_bits", "specialize"]

aten = torch.ops.aten


@dataclass
class MixedPrecision:
    """The per-timestep activation widths and the curves they were chosen from: ``bits`` (the
    candidate widths, ascending), ``table`` ([T] the width at each training timestep), ``snr_q``
    ([len(bits), T]), ``snr_f`` ([T]), ``visited`` ([T] measured) and ``margin`` (a width qualifies
    when SNR^Q > margin·SNR^F)."""

    bits: tuple[int, ...]  # candidate widths, ascending
    table: Tensor  # [T] int64: the width at each training timestep
    snr_q: Tensor  # [len(bits), T] SNR^Q per width (interpolated between measured timesteps)
    snr_f: Tensor  # [T] SNR^F
    visited: Tensor  # [T] bool: measured
    margin: float = 1.0  # a width qualifies when SNR^Q > margin·SNR^F

    def share(self, timesteps: Sequence[int] | Tensor, bits: int | None = None) -> float:
        """Fraction of ``timesteps`` (a sampling schedule) run at ``bits`` (default: the smallest width)."""
        t = torch.as_tensor(timesteps).long().reshape(-1)
        b = self.bits[0] if bits is None else bits
        return float((self.table[t] == b).double().mean())


def forward_snr(scheduler: Any, num_train_timesteps: int) -> Tensor:
    """SNR^F(t) for t in [0, T) of a diffusers ``scheduler`` (ᾱ/(1 − ᾱ); flow matching ((1 − σ)/σ)²,
    σ = t/T), T = ``num_train_timesteps``."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is not None:
        a = torch.as_tensor(alphas).double()
        if a.numel() != num_train_timesteps:
            raise PreconditionError(f"the scheduler has {a.numel()} training timesteps, the tables "
                                    f"{num_train_timesteps}")
        return (a / (1 - a)).float()
    sigma = (torch.arange(num_train_timesteps, dtype=torch.float64) / num_train_timesteps).clamp_min(1e-6)
    return (((1 - sigma) / sigma) ** 2).float()


def choose_bits(snr_q: Tensor, snr_f: Tensor, bits: Sequence[int]) -> Tensor:
    """[T] int64: per timestep the smallest width of ``bits`` whose SNR^Q exceeds SNR^F, else the
    largest. ``snr_q`` is [len(bits), T], ``snr_f`` [T]."""
    bits = list(bits)
    if snr_q.shape != (len(bits), snr_f.numel()):
        raise ValueError(f"snr_q must be [{len(bits)}, {snr_f.numel()}], got {tuple(snr_q.shape)}")
    table = torch.full((snr_f.numel(),), bits[-1], dtype=torch.int64)
    for j in reversed(range(len(bits) - 1)):
        table = torch.where(snr_q[j] > snr_f, torch.tensor(bits[j]), table)
    return table


class CalibrateWidths(Step):
    """The lower widths' scale and zero point of every switched (or switchable) activation quantizer,
    from its calibration statistics, into ``prog.state.ptqd_scales`` (graph untouched).

    The steps of width b are those ``prog.state.ptqd_bits`` runs at b (all steps without a chosen
    table). A quantizer reading timestep tables (its ``prog.state.timestep_tables`` entry: TDQ) gets
    [T] tables. Switched quantizers without statistics (a loaded model) are skipped. The count is the
    number of (quantizer, width) entries that changed.
    """

    name = "calibrate_widths"
    contract = Contract(
        requires=(RecipeHas("ptqd"), StateCovers("activation_stats", to_switch, "switchable activation quantizer")),
        produces=(StateCovers("ptqd_scales", to_switch, "switchable activation quantizer"),),
        preserves_semantics=True,  # state only
        idempotent=True,
    )

    def __call__(self, prog: Program, inputs: CompileInputs | None = None) -> PassResult:
        cfg = prog.recipe.ptqd
        if cfg is None or not cfg.mixed_bits:
            return PassResult(0)
        widths = tuple(cfg.mixed_bits)
        table, chosen = bits_table(prog, widths), prog.state.has("ptqd_bits")
        state = prog.state
        quantizers = [top for top, _ in switched_quantizers(prog.gm)] + to_switch(prog)
        count = 0
        for fq in quantizers:
            name = fq.meta[meta.ACT_QUANTIZER]
            st = state.activation_stats.get(name)
            if st is None:
                continue
            spec = fq.meta[meta.QSPEC]
            tt = state.timestep_tables.get(name)
            tables = (tt.scale.detach().float(), tt.zero_point.detach().float()) if tt is not None else None
            entry = dict(state.ptqd_scales.get(name, {}))  # a state copy shares the inner dicts: replace, never edit
            state.ptqd_scales[name] = entry
            for b in widths[:-1]:
                steps = torch.nonzero(table == b).reshape(-1) if chosen else None
                s, z = low_bit_qparams(st, spec, low_bit_spec(spec, b), steps, tables)
                old = entry.get(b)
                if old is None or not (torch.equal(old.scale, s) and torch.equal(old.zero_point, z)):
                    entry[b] = QParams(s, z)
                    count += 1
        return PassResult(count)


def set_bits(qm: QuantizedModel, bits: int | Tensor) -> None:
    """Write ``qm``'s bits table in place: ``bits`` is one width for every timestep, or a [T] table."""
    if not has_attr(qm.gm, BITS_TABLE):
        raise PreconditionError("the model has no per-timestep bit switch (select_bits did not run)")
    buf = fetch_attr(qm.gm, BITS_TABLE)
    buf.copy_(torch.as_tensor(bits, dtype=torch.int64).expand_as(buf))


def specialize(qm: QuantizedModel, bits: int) -> QuantizedModel:
    """A copy of ``qm`` whose switched quantizers always run at ``bits`` (``stepq.passes.specialize_bits``
    on the copy): the bit switch, the other widths' branches and the bits table are gone. Each branch
    of the ONNX If is one of these."""
    cfg = qm.recipe.ptqd
    if cfg is None or bits not in cfg.mixed_bits:
        raise PreconditionError(f"cannot specialize to {bits} bits; the model's widths are "
                                f"{() if cfg is None else tuple(cfg.mixed_bits)}")
    prog = qm.program.copy()
    run_passes(prog, [SpecializeBits(bits)])
    return QuantizedModel(prog)


@dataclass(frozen=True)
class LayerCost:
    """One conv / linear ``layer``: ``macs`` per sample and its operand widths ``w_bits`` and
    ``a_bits`` (None = switched per step)."""

    layer: str
    macs: int
    w_bits: int
    a_bits: int | None


def _act_bits(x: Any) -> int | None:
    if not isinstance(x, torch.fx.Node):
        return 32
    if x.target is aten.where.self and x.meta.get(meta.PTQD_NODE) == "select_bits":
        return None
    if x.target is ops.FAKE_QUANT:
        spec = x.meta.get(meta.QSPEC)
        return spec.bits if spec is not None else 32
    return 32


@torch.no_grad()
def layer_costs(qm: QuantizedModel, inputs: Mapping[str, Any]) -> list[LayerCost]:
    """MACs per sample and operand widths of every conv2d / linear of ``qm``, shapes from one run on
    ``inputs``."""
    prog = qm.program
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    class _Rec(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            if n.op == "call_function" and n.target in (aten.linear.default, aten.conv2d.default):
                w: Any = self.env[n.args[1]] if isinstance(n.args[1], torch.fx.Node) else n.args[1]
                shapes[n.name] = (tuple(out.shape), tuple(w.shape))
            return out

    _Rec(prog.gm).run(*prog.flat_inputs((), inputs))
    costs = []
    for n in prog.gm.graph.nodes:
        if n.name not in shapes:
            continue
        (out_shape, w_shape) = shapes[n.name]
        per_sample = 1
        for s in out_shape[1:]:
            per_sample *= s
        fan_in = 1
        for s in w_shape[1:]:
            fan_in *= s
        w = n.args[1]
        w_bits = w.meta.get(meta.WEIGHT_BITS, 32) if isinstance(w, torch.fx.Node) else 32
        costs.append(LayerCost(str(n.meta.get(meta.LAYER, n.name)), per_sample * fan_in, int(w_bits), _act_bits(n.args[0])))
    return costs


def bit_operations(costs: Sequence[LayerCost], table: Tensor | None, timesteps: Sequence[int] | Tensor) -> dict[str, float]:
    """Mean BOPs per sample and step over ``timesteps`` with per-step widths from ``table``, and the
    same layers at W8A8 (every quantized operand at 8 bits, float ones at 32) and in FP32.
    ``costs`` is ``layer_costs(qm, inputs)``; ``table`` None means fixed widths."""
    ts = torch.as_tensor(timesteps).long().reshape(-1)
    total = w8a8 = fp = 0.0
    for t in ts.tolist():
        for c in costs:
            a = c.a_bits if c.a_bits is not None else int(table[t]) if table is not None else 8
            total += c.macs * c.w_bits * a
            w8a8 += c.macs * (8 if c.w_bits < 32 else 32) * (8 if c.a_bits is None or c.a_bits < 32 else 32)
            fp += c.macs * 32 * 32
    n = max(len(ts), 1)
    return {"bops": total / n, "bops_w8a8": w8a8 / n, "bops_fp32": fp / n,
            "saved_vs_w8a8": 1.0 - total / w8a8 if w8a8 else 0.0,
            "x_vs_fp32": fp / total if total else float("inf")}
