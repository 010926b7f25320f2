"""The ONNX backend as one ``Backend``: partition → lower → export (single width or the PTQD If) → load.

    stepq.backends.onnx.export(qm, "model.onnx")   ==  qm.export("onnx", "model.onnx")  ==  qm.export_onnx(...)

``export`` writes the graph as it is (``export.py``: ``export_graph``) unless the graph switches
activation widths per step (PTQD mixed precision, ``is_mixed``): then each width is specialised and
exported, and the branches are merged under an If on the step's width (``mixed.py``). The options
are the same for both (``export_graph``'s keywords).
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Any

from stepq.backends.base import Lowered, PartitionResult
from stepq.backends.onnx.export import ExportResult, export_graph, lowered_copy
from stepq.backends.onnx.mixed import export_mixed, is_mixed
from stepq.backends.onnx.partition import BACKEND as NAME
from stepq.backends.onnx.partition import TABLE, OnnxPartitioner
from stepq.backends.onnx.runtime import OnnxModel
from stepq.backends.onnx.runtime import load as load_model

if TYPE_CHECKING:
    from stepq.artifact.quantized_model import QuantizedModel

__all__ = ["BACKEND", "OnnxBackend", "export"]


def export(qm: QuantizedModel, path: str | os.PathLike[str], **options: Any) -> ExportResult:
    """Write ``qm`` as quantized ONNX: one graph, or an If over the widths of a mixed-precision model
    (a ``MixedExportResult``). ``options``: ``export_graph``'s (opset, strict, translator, ...)."""
    if is_mixed(qm):
        return export_mixed(qm, path, **options)
    return export_graph(qm, path, **options)


class OnnxBackend:
    name = NAME
    table = TABLE

    def partition(self, qm: QuantizedModel, *, strict: bool = False) -> PartitionResult:
        """Tag a copy of ``qm``'s graph from the placement table (``partition.py``)."""
        return OnnxPartitioner().partition(copy.deepcopy(qm.gm), strict=strict)

    def lower(self, qm: QuantizedModel, *, strict: bool = False) -> Lowered:
        """A copy of ``qm``'s graph in the backend's ops (``stepq_onnx::*``); it shares ``qm``'s tensors,
        which the lowering never writes, and runs in PyTorch."""
        gm, partition, result = lowered_copy(qm, strict=strict)
        return Lowered(self.name, gm, partition, dict(result.counts))

    def export(self, qm: QuantizedModel, path: str | os.PathLike[str], **options: Any) -> ExportResult:
        return export(qm, path, **options)

    def load(self, path: str | os.PathLike[str], **options: Any) -> OnnxModel:
        """An ONNX Runtime session called like ``qm`` (``runtime.load``: providers, threads, ...)."""
        return load_model(path, **options)


BACKEND = OnnxBackend()
