"""The reference backend: the converted graph run by PyTorch (simulated quantization).

Every stepq op has a PyTorch implementation, so the reference backend takes every node; the
QuantizedModel itself is the compiled artefact. Other backends are tested against it.
"""

from __future__ import annotations

import copy

from stepq.artifact.quantized_model import QuantizedModel
from stepq.backends.base import Partitioner, PartitionResult, Placement
from stepq.compiler import ops

__all__ = ["TABLE", "load", "partition"]

TABLE = (
    Placement("pytorch", frozenset({ops.FAKE_QUANT, ops.QUANTIZE, ops.DEQUANTIZE, ops.UNPACK, ops.TIMESTEP_INDEX}),
              lambda node: None, kernel="torch.library implementation", integer=False,
              description="every stepq op runs as its PyTorch implementation"),
)


def partition(qm: QuantizedModel, *, strict: bool = False) -> PartitionResult:
    """Tag a copy of ``qm``'s graph (everything is supported)."""
    return Partitioner("reference", TABLE).partition(copy.deepcopy(qm.gm), strict=strict)


def load(qm: QuantizedModel) -> QuantizedModel:
    """The reference backend's callable is the QuantizedModel itself."""
    return qm
