"""The table of backends: each by name, the module that implements it, and what it needs.

    stepq.backends.get_backend("onnx").export(qm, "model.onnx")   # what qm.export("onnx", ...) does
    stepq.backends.available()                                    # ("reference", "onnx") here
    print(stepq.backends.describe())                              # every row, with its status

A row names its module as a string and the distributions it needs: looking a backend up imports
that module then (``<module>.BACKEND``, a ``Backend``), and nothing before. Importing ``stepq`` or
``stepq.backends`` therefore never imports onnxruntime or onnxscript, and whether a backend is
available is answered from ``importlib.util.find_spec`` without importing its dependencies.

A row with ``module=None`` is a slot for a backend that is not written yet: it is listed, it is
never available, and looking it up raises ``BackendNotImplementedError`` (a
``BackendUnavailableError``) saying so.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from stepq.backends.base import Backend
from stepq.compiler.errors import StepqError

__all__ = ["BACKENDS", "BackendEntry", "BackendNotImplementedError", "BackendUnavailableError", "UnknownBackendError", "available", "describe",
           "entry", "get_backend"]


class UnknownBackendError(StepqError):
    """No backend of that name in the table; the message lists the table."""


class BackendUnavailableError(StepqError):
    """The backend is in the table but cannot be used here: not implemented yet, or a dependency is missing."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"backend {name!r} is not available: {reason} (available backends: "
                         f"{', '.join(available()) or 'none'})")
        self.name = name
        self.reason = reason


class BackendNotImplementedError(BackendUnavailableError):
    """The table has a slot for this backend, but it is not written yet."""


@dataclass(frozen=True)
class BackendEntry:
    """One row: ``module`` holds ``BACKEND`` (None: a slot, not implemented yet); ``requires`` are
    the top-level modules it imports that stepq does not install for everyone."""

    name: str
    module: str | None
    description: str
    requires: tuple[str, ...] = ()
    #: for a slot: what will fill it
    planned: str = ""

    def missing(self) -> tuple[str, ...]:
        return tuple(m for m in self.requires if importlib.util.find_spec(m) is None)

    def unavailable_reason(self) -> str | None:
        """None when the backend can be used here, else why not."""
        if self.module is None:
            return f"not implemented yet: {self.planned}" if self.planned else "not implemented yet"
        missing = self.missing()
        if missing:
            return f"needs {', '.join(missing)}, not installed"
        return None


BACKENDS: tuple[BackendEntry, ...] = (
    BackendEntry("reference", "stepq.backends.reference",
                 "the converted graph in PyTorch (simulated quantization); writes the safetensors + JSON artefact"),
    BackendEntry("onnx", "stepq.backends.onnx",
                 "quantized ONNX for ONNX Runtime with integer kernels (docs/ONNX.md)",
                 requires=("onnx", "onnx_ir", "onnxscript", "onnxruntime")),
    BackendEntry("cupy", "stepq.backends.cupy",
                 "CuPy low-bit CUDA kernels (docs/CUDA.md); partition, lower and export anywhere, run on a CUDA "
                 "device (cupy) or as the kernels' CPU emulation"),
)

_BY_NAME = {e.name: e for e in BACKENDS}


def entry(name: str) -> BackendEntry:
    """The table row of ``name``; ``UnknownBackendError`` lists the table for any other name."""
    try:
        return _BY_NAME[name]
    except KeyError:
        slots = [e.name for e in BACKENDS if e.name not in available()]
        more = f" (listed, not available: {', '.join(slots)})" if slots else ""
        raise UnknownBackendError(f"unknown backend {name!r}; available backends: "
                                  f"{', '.join(available()) or 'none'}{more}") from None


def get_backend(name: str) -> Backend:
    """The backend called ``name``, its module imported now."""
    row = entry(name)
    reason = row.unavailable_reason()
    if row.module is None:
        raise BackendNotImplementedError(name, reason or "not implemented yet")
    if reason is not None:
        raise BackendUnavailableError(name, reason)
    backend: Backend = importlib.import_module(row.module).BACKEND
    return backend


def available() -> tuple[str, ...]:
    """Names of the backends usable here, in table order (imports none of them)."""
    return tuple(e.name for e in BACKENDS if e.unavailable_reason() is None)


def describe() -> str:
    """The table, one line per backend: name, status, description."""
    width = max(len(e.name) for e in BACKENDS)
    lines = []
    for e in BACKENDS:
        reason = e.unavailable_reason()
        status = "available" if reason is None else f"not available ({reason})"
        lines.append(f"{e.name:<{width}}  {e.description}; {status}")
    return "\n".join(lines)
