"""The per-layer report: bits, scale ranges, and the SQNR of each layer's output against FP.

SQNR(y) = 10·log10(‖y_fp‖² / ‖y_fp − y_q‖²) in dB, where y_fp is the layer's output with every
quantizer of the program bypassed and y_q its output with all of them active, on the same
calibration batch: the error a layer shows includes what the layers before it added.

A layer whose float output is exactly zero on that batch (a zero-initialised projection: adaLN-Zero,
zero convolutions, an untrained gate) has no SQNR: the ratio is 0/0 (or x/0). Its row says so in
``note`` and carries ``sqnr_db=None`` instead of an infinite number that would read as "perfect".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.fx

from stepq.calibration.probe import collect_layer_outputs, sqnr_db
from stepq.compiler import meta, ops
from stepq.compiler.graph_utils import fetch_attr
from stepq.compiler.pass_manager import CompileInputs, Contract, PassResult, StageIs, Step
from stepq.compiler.program import Program

__all__ = ["LayerReport", "Report", "format_report", "layer_reports"]


@dataclass(frozen=True)
class LayerReport:
    layer: str
    node: str
    op: str
    rule: str
    weight_bits: int | None
    act_bits: int | None
    weight_scale_min: float | None
    weight_scale_max: float | None
    act_scale_min: float | None
    act_scale_max: float | None
    sqnr_db: float | None
    note: str = ""  # why sqnr_db is None although the layer was measured (a zero float output)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scale_range(gm: torch.fx.GraphModule, q: Any) -> tuple[float | None, float | None]:
    """The range of a quantizer's step size (a ternary weight's: its α)."""
    if not isinstance(q, torch.fx.Node) or q.target not in (ops.FAKE_QUANT, ops.TERNARY):
        return None, None
    s = q.args[1]
    if isinstance(s, torch.fx.Node) and s.op == "get_attr":
        t = fetch_attr(gm, s.target)
        return float(t.min()), float(t.max())
    return None, None


def layer_reports(prog: Program, batch: Mapping[str, Any] | None) -> list[LayerReport]:
    """One row per annotated op (quantized or kept in float by a rule)."""
    gm = prog.gm
    nodes = [n for n in gm.graph.nodes if meta.LAYER_SPEC in n.meta]
    sqnr: dict[str, float] = {}
    zero_out: dict[str, str] = {}
    if batch is not None and nodes:
        names = {n.name for n in nodes}
        fp = collect_layer_outputs(prog, batch, names, bypass=True)
        q = collect_layer_outputs(prog, batch, names, bypass=False)
        for k in fp:
            if k not in q:
                continue
            if not bool(fp[k].any()):
                zero_out[k] = ("float output is zero on the calibration batch (zero-initialised layer?); "
                               + ("the quantized output is zero too" if not bool(q[k].any()) else
                                  f"the quantized output is not (max |y| {float(q[k].abs().max()):.3g})")
                               + "; SQNR undefined")
            else:
                sqnr[k] = sqnr_db(fp[k], q[k])
    rows = []
    for n in nodes:
        spec = meta.get_layer_spec(n)
        w_bits = a_bits = None
        w_range: tuple[float | None, float | None] = (None, None)
        a_range: tuple[float | None, float | None] = (None, None)
        if spec is not None and spec.weight is not None:
            w_bits = spec.weight.bits
            w = n.args[1] if len(n.args) > 1 else None
            w_range = _scale_range(gm, w)
        if spec is not None and spec.activation is not None:
            a_bits = spec.activation.bits
            a_range = _scale_range(gm, n.args[0])
        rows.append(LayerReport(
            layer=n.meta.get(meta.LAYER, n.name), node=n.name, op=n.meta.get(meta.OP_KIND, "?"),
            rule=n.meta.get(meta.RULE, ""), weight_bits=w_bits, act_bits=a_bits,
            weight_scale_min=w_range[0], weight_scale_max=w_range[1],
            act_scale_min=a_range[0], act_scale_max=a_range[1], sqnr_db=sqnr.get(n.name),
            note=zero_out.get(n.name, "")))
    return rows


def _fmt(v: float | None, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, spec)


def format_report(rows: list[LayerReport], title: str = "") -> str:
    header = ("layer", "op", "W", "A", "W scale", "A scale", "SQNR dB", "rule")
    body = []
    for r in rows:
        w_scale = "-" if r.weight_scale_min is None else f"{_fmt(r.weight_scale_min)}..{_fmt(r.weight_scale_max)}"
        a_scale = "-" if r.act_scale_min is None else _fmt(r.act_scale_min)
        body.append((r.layer, r.op, str(r.weight_bits or "fp"), str(r.act_bits or "fp"), w_scale, a_scale,
                     "zero out" if r.note else _fmt(r.sqnr_db, ".1f"), r.rule))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    finite = [r.sqnr_db for r in rows if r.sqnr_db is not None and math.isfinite(r.sqnr_db)]
    if finite:
        lines.append(f"{len(rows)} layers; SQNR min {min(finite):.1f} dB, median {sorted(finite)[len(finite) // 2]:.1f} dB")
    zero = [r for r in rows if r.note]
    if zero:
        lines.append(f"{len(zero)} layers with a zero float output (no SQNR): "
                     + ", ".join(r.layer for r in zero[:8]) + (", …" if len(zero) > 8 else ""))
    return "\n".join(lines)


class Report(Step):
    """Convert's first step: the per-layer report on the kept calibration batch (count = rows)."""

    name = "report"
    contract: ClassVar[Contract] = Contract(requires=(StageIs(("calibrated", "prepared")),), writes=("report",))

    def __call__(self, prog: Program, inputs: CompileInputs) -> PassResult:
        prog.state.report = layer_reports(prog, prog.state.report_batch if inputs.report else None)
        return PassResult(len(prog.state.report))
