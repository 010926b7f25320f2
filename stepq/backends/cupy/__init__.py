"""The CuPy kernel backend: stepq/cuda's kernels for the Linear / Conv2d layers they take.

    qm.export("cupy", path);  stepq.backends.get_backend("cupy").load(path)   # on a CUDA device
    stepq.backends.get_backend("cupy").model(qm, device="cpu")                # the emulation, anywhere

``partition.py`` (the placement table), ``ops.py`` (the ``stepq_cupy`` torch.library ops: kernels on
CUDA, their emulation on CPU), ``lower.py`` (the rewrite), ``backend.py`` (export / load). Only
``stepq.cuda.runtime`` imports cupy, and only when a kernel runs.
"""

from __future__ import annotations

from stepq.backends.cupy.backend import BACKEND, CupyBackend, CupyExport, CupyModel
from stepq.backends.cupy.partition import TABLE, CupyPartitioner

__all__ = ["BACKEND", "TABLE", "CupyBackend", "CupyExport", "CupyModel", "CupyPartitioner"]
