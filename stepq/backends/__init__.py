"""Backends: each partitions a converted graph (tags what it supports, from an explicit table),
lowers the tagged part, and writes / loads its artefact (``Backend`` in ``base.py``). The table
(``table.py``) names them: ``reference`` runs the QuantizedModel in PyTorch, ``onnx`` writes
quantized ONNX for ONNX Runtime, ``cupy`` runs stepq/cuda's low-bit kernels (their CPU emulation
off the GPU; docs/CUDA.md).

    backend = stepq.backends.get_backend("onnx")     # what qm.export("onnx", path) resolves
    stepq.backends.available(); print(stepq.backends.describe())

A backend's module is imported when it is looked up: importing this package pulls in neither
onnxruntime nor onnxscript.
"""

from __future__ import annotations

from stepq.backends.base import (
    Backend,
    Exported,
    Lowered,
    Partitioner,
    PartitionResult,
    Placement,
    Rejection,
    UnsupportedNodesError,
)
from stepq.backends.table import (
    BACKENDS,
    BackendEntry,
    BackendNotImplementedError,
    BackendUnavailableError,
    UnknownBackendError,
    available,
    describe,
    get_backend,
)

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendEntry",
    "BackendNotImplementedError",
    "BackendUnavailableError",
    "Exported",
    "Lowered",
    "PartitionResult",
    "Partitioner",
    "Placement",
    "Rejection",
    "UnknownBackendError",
    "UnsupportedNodesError",
    "available",
    "describe",
    "get_backend",
]
