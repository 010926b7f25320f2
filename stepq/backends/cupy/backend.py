"""The CuPy backend as one ``Backend``: partition → lower → export → load.

    qm.export("cupy", "model.cupy")            # the artefact (safetensors + JSON, no pickle)
    model = stepq.backends.get_backend("cupy").load("model.cupy")          # on the CUDA device
    model(sample=x, timestep=t)                # called like qm; kernels from stepq/cuda

The artefact is the QuantizedModel's own (``qm.save``: ``model.safetensors`` + ``manifest.json``)
plus ``cupy.json`` with the partition it was exported with; ``load`` reads the QuantizedModel back
and lowers it again (deterministic, a fraction of a second), so no lowered graph is serialised.
``load(path, device="cpu")`` runs the same lowered graph with the kernels' CPU emulation; a CUDA
device needs CuPy, a driver and a CUDA build of PyTorch, else ``NoDeviceError``.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stepq.backends.base import Lowered, PartitionResult
from stepq.backends.cupy.lower import lower_graph
from stepq.backends.cupy.partition import BACKEND as NAME
from stepq.backends.cupy.partition import TABLE, CupyPartitioner
from stepq.compiler.errors import ArtifactError

if TYPE_CHECKING:
    from stepq.artifact.quantized_model import QuantizedModel
    from stepq.compiler.program import Program

__all__ = ["BACKEND", "CupyBackend", "CupyExport", "CupyModel"]

MANIFEST = "cupy.json"


@dataclass
class CupyExport:
    path: Path
    partition: PartitionResult
    seconds: float

    def summary(self) -> str:
        return f"{self.path} in {self.seconds:.1f}s: {self.partition.summary()}"


class CupyModel(torch.nn.Module):
    """A lowered graph called like the QuantizedModel it came from; tensors go to its device."""

    def __init__(self, lowered: Lowered, program: Program, device: torch.device):
        super().__init__()
        self.gm = lowered.gm
        self.partition = lowered.partition
        self.counts = lowered.counts
        self._program = program
        self.device = device
        self.gm.to(device)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = self._program.bind(args, kwargs)
        bound = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in bound.items()}
        return self.gm(**bound)


def _device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        from stepq.cuda.runtime import require_device

        require_device()
    elif dev.type != "cpu":
        raise ValueError(f"the cupy backend runs on 'cuda' (the kernels) or 'cpu' (their emulation), not {device!r}")
    return dev


class CupyBackend:
    name = NAME
    table = TABLE

    def partition(self, qm: QuantizedModel, *, strict: bool = False) -> PartitionResult:
        """Tag a copy of ``qm``'s graph from the placement table (``partition.py``)."""
        return CupyPartitioner().partition(copy.deepcopy(qm.gm), strict=strict)

    def lower(self, qm: QuantizedModel, *, strict: bool = False) -> Lowered:
        """A copy of ``qm``'s graph with the tagged nodes as ``stepq_cupy`` ops; runs on CPU (emulation) or CUDA."""
        gm = copy.deepcopy(qm.gm)
        part = CupyPartitioner().partition(gm, strict=strict)
        counts = lower_graph(gm)
        return Lowered(self.name, gm, part, counts)

    def export(self, qm: QuantizedModel, path: str | os.PathLike[str], **options: Any) -> CupyExport:
        """Write ``qm``'s artefact and the partition; ``strict=True`` raises on any quantized layer left in PyTorch."""
        strict = bool(options.pop("strict", False))
        if options:
            raise TypeError(f"the cupy backend's export takes only 'strict', got {sorted(options)}")
        t0 = time.perf_counter()
        part = self.partition(qm, strict=strict)
        qm.save(str(path))
        out = Path(path)
        (out / MANIFEST).write_text(json.dumps({
            "backend": self.name, "tags": part.tags, "counts": part.counts(),
            "rejections": [str(r) for r in part.rejections]}, indent=1))
        return CupyExport(out, part, time.perf_counter() - t0)

    def load(self, path: str | os.PathLike[str], **options: Any) -> CupyModel:
        """The artefact at ``path`` lowered again and placed on ``device`` ('cuda' by default, or 'cpu')."""
        device = _device(options.pop("device", "cuda"))
        if options:
            raise TypeError(f"the cupy backend's load takes only 'device', got {sorted(options)}")
        if not (Path(path) / MANIFEST).is_file():
            raise ArtifactError(f"{path} is not a cupy export: no {MANIFEST}")
        from stepq.artifact.quantized_model import load as load_artifact

        qm = load_artifact(str(path))
        return CupyModel(self.lower(qm), qm.program, device)

    def model(self, qm: QuantizedModel, device: str | torch.device = "cuda") -> CupyModel:
        """``qm`` lowered and placed on ``device``, without writing an artefact."""
        dev = _device(device)
        return CupyModel(self.lower(qm), qm.program, dev)


BACKEND = CupyBackend()
