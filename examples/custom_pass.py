"""A user pass: keep in floating point every Linear whose fan-in is below a threshold.

A Linear with few inputs (a timestep MLP's first layer, a small conditioning projection) costs
next to nothing in floating point, and quantizing it saves little while its error reaches every
block it conditions. The recipe's rules select by path, op kind and role, not by shape, so this
pass does it: after ``annotate_layers`` it rewrites the annotation of every Linear with
``in_features < min_fan_in`` to ``LayerSpec None`` (= keep in float). ``insert_quantizers`` reads
the annotation and inserts nothing for those layers: policy annotates, mechanism rewrites.

    linear(x, W[out, in], b) with in < N, meta[stepq.layer_spec] = spec
 →  the same node, meta[stepq.layer_spec] = None, meta[stepq.rule] = "keep_narrow_linears_float"

The graph is unchanged, so the pass preserves semantics bit for bit; the count is the number of
annotations it changed, so a second run reports 0.

    python examples/custom_pass.py
"""

from __future__ import annotations

import torch
import torch.fx

import stepq
from stepq.compiler import meta
from stepq.compiler.pass_manager import Contract, NodesHave, OpAbsent, Pass, PassResult
from stepq.compiler.program import Program


def is_linear(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.aten.linear.default


def fan_in(node: torch.fx.Node) -> int | None:
    """in_features of a Linear: the last dimension of its weight (from the capture's FakeTensor)."""
    w = node.args[1]
    val = w.meta.get("val") if isinstance(w, torch.fx.Node) else None
    return int(val.shape[-1]) if isinstance(val, torch.Tensor) else None


class KeepNarrowLinearsFloat(Pass):
    """Annotations of Linears with fan-in below ``min_fan_in`` → keep in float."""

    name = "keep_narrow_linears_float"

    def __init__(self, min_fan_in: int = 64):
        if min_fan_in < 1:
            raise ValueError(f"min_fan_in must be >= 1, got {min_fan_in}")
        self.min_fan_in = min_fan_in
        # the contract depends on the threshold, so it is set per instance
        self.contract = Contract(  # type: ignore[misc]
            requires=(NodesHave(meta.LAYER_SPEC, on=is_linear, what="linear"),),
            produces=(OpAbsent(self._narrow_and_quantized, what=f"quantized linear with fan-in < {min_fan_in}"),),
            preserves_semantics=True,
            tolerance=0.0,
        )

    def _narrow_and_quantized(self, node: torch.fx.Node) -> bool:
        k = fan_in(node) if is_linear(node) else None
        return k is not None and k < self.min_fan_in and meta.get_layer_spec(node) is not None

    def __call__(self, prog: Program) -> PassResult:
        details = []
        for node in prog.gm.graph.nodes:
            if self._narrow_and_quantized(node):
                node.meta[meta.LAYER_SPEC] = None
                node.meta[meta.RULE] = self.name
                details.append(f"{node.meta.get(meta.LAYER, node.name)}: fan-in {fan_in(node)} → float")
        return PassResult(len(details), tuple(details))


def main() -> None:
    from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser

    cfg = RandomDenoiserConfig(kind="dit", width=32, temb_dim=16)
    model = build_random_denoiser(cfg)
    data = [cfg.example_inputs(4, torch.tensor([0, 300, 600, 999]), seed=i) for i in range(4)]
    qm = stepq.quantize(model, data[0], "w4a8", calibration=data, progress=False,
                        passes=[stepq.At(KeepNarrowLinearsFloat(min_fan_in=32), after="annotate_layers")])
    rows = qm.report(print_table=True)
    kept = [r.layer for r in rows if r.rule == KeepNarrowLinearsFloat.name]
    print(f"{len(kept)} narrow linear(s) kept in float: {', '.join(kept)}")


if __name__ == "__main__":
    main()
