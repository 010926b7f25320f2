"""What the command-line tools (``stepq`` and ``examples/demo.py``) show: stepq's own warnings, not
third-party import noise.

``quiet_third_party()`` drops, for the rest of the process, the third-party lines listed in
``stepq.compiler.noise`` (by logger and message, each with its reason: torchao's optional CUDA
extensions, torch's pytree notes on torchao's enums, diffusers' torchao probe, torch.onnx's
torchvision and nn_module_stack notes, one torch FutureWarning) -- nothing by level or whole logger --
and gives the ``stepq`` logger a stderr handler at WARNING, so that stepq's own warnings (an ONNX
fallback, a clamped timestep) are seen. Every other Python warning is left alone: a
``warnings.warn`` from stepq reaches the user unfiltered. Library code never calls this; it is for the entry points.
"""

from __future__ import annotations

import logging
import sys

from stepq.compiler.noise import drop_noise

__all__ = ["quiet_third_party"]


def quiet_third_party() -> None:
    """Drop the listed third-party lines (``stepq.compiler.noise``) and show stepq's warnings on stderr
    (idempotent)."""
    drop_noise()
    log = logging.getLogger("stepq")
    if not any(getattr(h, "_stepq_console", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("stepq: %(levelname)s: %(message)s"))
        handler.setLevel(logging.WARNING)
        handler._stepq_console = True  # type: ignore[attr-defined]
        log.addHandler(handler)
