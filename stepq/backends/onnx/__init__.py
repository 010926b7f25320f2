"""The ONNX backend: quantized ONNX for ONNX Runtime with integer kernels.

    result = stepq.backends.onnx.export(qm, "model.onnx")     # or qm.export_onnx("model.onnx")
    model = stepq.backends.onnx.load("model.onnx")            # call it like qm
    counts = stepq.backends.onnx.count_kernels("model.onnx")  # what ORT runs

See docs/ONNX.md for the placement table and the choices (per-tensor timestep, clamping).
"""

from __future__ import annotations

from stepq.backends.onnx.export import ExportResult, OnnxExportError, export
from stepq.backends.onnx.kernels import KernelCounts, count_kernels, optimized_graph
from stepq.backends.onnx.partition import TABLE, OnnxPartitioner
from stepq.backends.onnx.runtime import OnnxModel, load, session_options

__all__ = [
    "TABLE",
    "ExportResult",
    "KernelCounts",
    "OnnxExportError",
    "OnnxModel",
    "OnnxPartitioner",
    "count_kernels",
    "export",
    "load",
    "optimized_graph",
    "session_options",
]
