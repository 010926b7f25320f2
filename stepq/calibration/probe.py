"""The program run as a probe: with its quantizers bypassed (its own floating-point path), and
with the outputs of chosen nodes recorded; SQNR between two such runs.

    SQNR(y) = 10·log10(‖y_ref‖² / ‖y_ref − y‖²)  dB
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx

from stepq.calibration.observers import ActivationObserver
from stepq.compiler import ops
from stepq.compiler.program import Program

__all__ = ["collect_layer_outputs", "run_without_quantizers", "sqnr_db"]


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.detach().double(), test.detach().double()
    noise = float(((ref - test) ** 2).sum())
    signal = float((ref**2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


class _Probe(torch.fx.Interpreter):
    """Runs the graph, recording the outputs of ``watch``; with ``bypass`` quantizers are identities."""

    def __init__(self, gm: torch.fx.GraphModule, watch: set[str], bypass: bool):
        super().__init__(gm)
        self.watch = watch
        self.bypass = bypass
        self.outputs: dict[str, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.watch and isinstance(out, torch.Tensor):
            self.outputs[n.name] = out.detach()
        return out

    def call_function(self, target, args, kwargs):
        if self.bypass and target in (ops.FAKE_QUANT, ops.TERNARY):
            return args[0]
        return super().call_function(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        if isinstance(self.module.get_submodule(target), ActivationObserver):
            return args[0]
        return super().call_module(target, args, kwargs)


@torch.no_grad()
def run_without_quantizers(gm: torch.fx.GraphModule, *flat: Any) -> Any:
    """The graph's outputs with every quantizer an identity: the program's own floating-point path."""
    return _Probe(gm, set(), bypass=True).run(*flat)


@torch.no_grad()
def collect_layer_outputs(prog: Program, batch: Mapping[str, Any], names: set[str], *, bypass: bool
                          ) -> dict[str, torch.Tensor]:
    probe = _Probe(prog.gm, names, bypass)
    probe.run(*prog.flat_inputs((), batch))
    return probe.outputs
