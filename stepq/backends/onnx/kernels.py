"""Kernel evidence: what ONNX Runtime actually runs, read from its optimised graph.

A session created with ``optimized_model_filepath`` writes the graph after every fusion; counting
its nodes says which quantized layers became integer kernels:

* integer kernels: MatMulIntegerToFloat, QLinearConv, QGemm, QLinearMatMul, MatMulInteger, ConvInteger,
  DynamicQuantizeMatMul (and the other ``QLinear*`` ops are reported with them);
* weight-only kernels: MatMulNBits (integer weights, float activations);
* float kernels: MatMul, Gemm, Conv (also NCHWc Conv), FusedConv, FusedGemm, FusedMatMul;
* a *quantized layer left in float* is a float kernel with an operand produced by a
  DequantizeLinear (a Q/DQ pair or an integer weight that ORT did not fuse).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from stepq.backends.onnx.runtime import DISABLED_OPTIMIZERS, session_options

__all__ = ["FLOAT_KERNELS", "INTEGER_KERNELS", "WEIGHT_ONLY_KERNELS", "KernelCounts", "count_kernels",
           "optimized_graph"]

INTEGER_KERNELS = frozenset({"MatMulIntegerToFloat", "QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger",
                             "ConvInteger", "DynamicQuantizeMatMul", "QAttention"})
WEIGHT_ONLY_KERNELS = frozenset({"MatMulNBits"})
FLOAT_KERNELS = frozenset({"MatMul", "Gemm", "Conv", "FusedConv", "FusedGemm", "FusedMatMul", "ConvTranspose"})


@dataclass
class KernelCounts:
    integer: Counter = field(default_factory=Counter)
    weight_only: Counter = field(default_factory=Counter)
    float: Counter = field(default_factory=Counter)
    #: float kernels that read a DequantizeLinear output: quantized layers ORT runs in float.
    quantized_in_float: list[str] = field(default_factory=list)
    other_quantized: Counter = field(default_factory=Counter)  # QLinearAdd, QuantizeLinear, ...

    @property
    def n_integer(self) -> int:
        return sum(self.integer.values())

    @property
    def n_weight_only(self) -> int:
        return sum(self.weight_only.values())

    @property
    def n_float(self) -> int:
        return sum(self.float.values())

    def row(self) -> dict[str, object]:
        def fmt(c: Counter) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "–"

        return {"integer": self.n_integer, "integer kernels": fmt(self.integer), "weight-only": self.n_weight_only,
                "float": self.n_float, "float kernels": fmt(self.float),
                "quantized in float": len(self.quantized_in_float)}


def optimized_graph(path: str | os.PathLike[str], *, disabled_optimizers: tuple[str, ...] = DISABLED_OPTIMIZERS,
                    threads: int = 1) -> onnx.ModelProto:
    """The graph ONNX Runtime (CPU, every optimisation on) runs for the model at ``path``."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        opts = session_options(threads=threads, optimized_model_path=out)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1048576")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(disabled_optimizers))
        return onnx.load(str(out), load_external_data=False)


def _is_float_kernel(node: onnx.NodeProto) -> bool:
    return node.op_type in FLOAT_KERNELS and node.domain in ("", "com.microsoft", "com.microsoft.nchwc")


def count_kernels(model: onnx.ModelProto | str | os.PathLike[str], **kwargs: object) -> KernelCounts:
    """Integer / weight-only / float kernels of an ORT-optimised graph (a path is optimised first)."""
    graph = model if isinstance(model, onnx.ModelProto) else optimized_graph(model, **kwargs)  # type: ignore[arg-type]
    producer = {o: n for n in graph.graph.node for o in n.output}
    counts = KernelCounts()
    for node in graph.graph.node:
        if node.op_type in INTEGER_KERNELS:
            counts.integer[node.op_type] += 1
        elif node.op_type in WEIGHT_ONLY_KERNELS:
            counts.weight_only[node.op_type] += 1
        elif _is_float_kernel(node):
            counts.float[node.op_type if node.domain != "com.microsoft.nchwc" else "Conv(NCHWc)"] += 1
            if any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in node.input):
                counts.quantized_in_float.append(node.name or node.op_type)
        elif node.op_type.startswith("QLinear") or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            counts.other_quantized[node.op_type] += 1
    return counts
