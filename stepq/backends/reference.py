"""The reference backend: the converted graph run by PyTorch (simulated quantization).

Every stepq op has a PyTorch implementation, so the reference backend takes every node and its
lowering rewrites nothing: the QuantizedModel itself is the compiled model, and other backends are
tested against it. Its artefact is the QuantizedModel's own: ``export`` writes ``qm.save(path)``
(``model.safetensors`` + ``manifest.json``) and ``load`` reads it back as a QuantizedModel that
computes bit for bit what ``qm`` computes.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepq.artifact.quantized_model import QuantizedModel
from stepq.artifact.quantized_model import load as load_artifact
from stepq.backends.base import Lowered, Partitioner, PartitionResult, Placement
from stepq.compiler import ops

__all__ = ["BACKEND", "TABLE", "ReferenceBackend", "ReferenceExport", "load", "partition"]

TABLE = (
    Placement("pytorch", frozenset({ops.FAKE_QUANT, ops.QUANTIZE, ops.DEQUANTIZE, ops.UNPACK, ops.TIMESTEP_INDEX}),
              lambda node: None, kernel="torch.library implementation", integer=False,
              description="every stepq op runs as its PyTorch implementation"),
)


@dataclass
class ReferenceExport:
    """A written reference artefact: the directory, what the partition took, its size."""

    path: Path
    partition: PartitionResult
    file_bytes: int
    seconds: float

    def summary(self) -> str:
        return f"{self.path} ({self.file_bytes / 2**20:.1f} MiB) in {self.seconds:.1f}s: {self.partition.summary()}"


class ReferenceBackend:
    name = "reference"
    table = TABLE

    def partition(self, qm: QuantizedModel, *, strict: bool = False) -> PartitionResult:
        """Tag a copy of ``qm``'s graph (everything is supported)."""
        return Partitioner(self.name, self.table).partition(copy.deepcopy(qm.gm), strict=strict)

    def lower(self, qm: QuantizedModel, *, strict: bool = False) -> Lowered:
        """A tagged copy of ``qm``'s graph, otherwise unchanged: the stepq ops are the reference's own."""
        gm = copy.deepcopy(qm.gm)
        return Lowered(self.name, gm, Partitioner(self.name, self.table).partition(gm, strict=strict))

    def export(self, qm: QuantizedModel, path: str | os.PathLike[str], **options: Any) -> ReferenceExport:
        """Write ``qm``'s artefact (``qm.save(path)``: safetensors + manifest.json) at ``path``."""
        if options:
            raise TypeError(f"the reference backend takes no export options, got {sorted(options)}")
        t0 = time.perf_counter()
        partition = self.partition(qm, strict=True)
        qm.save(str(path))
        path = Path(path)
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        return ReferenceExport(path, partition, size, time.perf_counter() - t0)

    def load(self, path: str | os.PathLike[str], **options: Any) -> QuantizedModel:
        """The artefact at ``path`` as a QuantizedModel (checked against its manifest)."""
        if options:
            raise TypeError(f"the reference backend takes no load options, got {sorted(options)}")
        return load_artifact(str(path))


BACKEND = ReferenceBackend()


def partition(qm: QuantizedModel, *, strict: bool = False) -> PartitionResult:
    """Tag a copy of ``qm``'s graph (everything is supported)."""
    return BACKEND.partition(qm, strict=strict)


def load(path: str | os.PathLike[str]) -> QuantizedModel:
    """The reference artefact at ``path`` (written by ``export`` or ``QuantizedModel.save``)."""
    return BACKEND.load(path)
