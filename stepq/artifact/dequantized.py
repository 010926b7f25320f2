"""The weights of a converted graph kept dequantized: the PyTorch path without per-call dequantization.

A converted graph reads every quantized weight as ``dequantize([unpack](W_int), s, z)`` of constant
tensors, so the reference backend dequantizes every weight on every call (for the digits UNet, 113
dequantize and 109 unpack nodes per forward). ``cached_graph`` evaluates each such weight path once
(``stepq.compiler.graph_utils.fold_constant_calls``) and returns a module running a copy of the graph
in which the path is one ``get_attr`` of the float weight. It computes bit for bit what the graph
computes: the cached tensor is the output of the same ops on the same tensors, and the rest of the
graph (activation quantizers, timestep tables, float layers) is the graph's own, sharing its tensors.

What it costs: one float32 tensor per quantized weight (the FP model's weight bytes again) beside the
integer weights, which stay what ``save`` and every other backend read. What remains above the FP
model's latency is the activation quantizers (docs/SPEED.md, "The PyTorch path").
"""

from __future__ import annotations

import torch

from stepq.compiler import ops
from stepq.compiler.graph_utils import fold_constant_calls

__all__ = ["WEIGHT_PATH_OPS", "cached_graph"]

#: the ops on a weight's path from its stored form to the float weight the layer reads
WEIGHT_PATH_OPS = frozenset({ops.DEQUANTIZE, ops.UNPACK, ops.UNPACK_BASE3})


def cached_graph(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, int]:
    """A module computing what ``gm`` computes with every constant weight path evaluated once, and the
    number of weights it holds dequantized. ``gm`` is not modified; the module shares its tensors."""
    return fold_constant_calls(gm, WEIGHT_PATH_OPS, prefix="_stepq_dequantized")
