"""The ONNX backend: quantized ONNX for ONNX Runtime with integer kernels.

    result = stepq.backends.onnx.export(qm, "model.onnx")     # or qm.export_onnx / qm.export("onnx", ...)
    model = stepq.backends.onnx.load("model.onnx")            # call it like qm
    counts = stepq.backends.onnx.count_kernels("model.onnx")  # what ORT runs

``export`` writes a PTQD mixed-precision model (a graph that reads ``ptqd_bits_table``) as one file
with an If over its activation widths (``mixed.py``), any other as one graph (``export.py``).
``BACKEND`` is this package as a ``stepq.backends.Backend`` (the table's ``"onnx"`` row).
See docs/ONNX.md for the placement table and the choices (per-tensor timestep, clamping).
"""

from __future__ import annotations

from stepq.backends.onnx.backend import BACKEND, OnnxBackend, export
from stepq.backends.onnx.export import ExportResult, OnnxExportError, OnnxInput, export_graph
from stepq.backends.onnx.kernels import KernelCounts, count_kernels, optimized_graph
from stepq.backends.onnx.mixed import MixedExportResult, export_mixed, is_mixed
from stepq.backends.onnx.partition import TABLE, OnnxPartitioner
from stepq.backends.onnx.runtime import OnnxModel, load, session_options

__all__ = [
    "BACKEND",
    "TABLE",
    "ExportResult",
    "KernelCounts",
    "MixedExportResult",
    "OnnxBackend",
    "OnnxExportError",
    "OnnxInput",
    "OnnxModel",
    "OnnxPartitioner",
    "count_kernels",
    "export",
    "export_graph",
    "export_mixed",
    "is_mixed",
    "load",
    "optimized_graph",
    "session_options",
]
