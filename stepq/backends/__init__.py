"""Backends: each partitions a converted graph (tags what it supports, from an explicit table) and
then lowers the tagged part. ``reference`` runs the QuantizedModel in PyTorch; ``onnx`` writes
quantized ONNX for ONNX Runtime. Import a backend's module to use it (``stepq.backends.onnx``):
importing this package pulls in neither onnxruntime nor onnxscript.
"""

from __future__ import annotations

from stepq.backends.base import Partitioner, PartitionResult, Placement, Rejection, UnsupportedNodesError

__all__ = ["PartitionResult", "Partitioner", "Placement", "Rejection", "UnsupportedNodesError"]
