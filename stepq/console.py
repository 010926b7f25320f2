"""What the command-line tools (``stepq`` and ``examples/demo.py``) show: stepq's own warnings, not
third-party import noise.

``quiet_third_party()`` raises the log level of the few third-party loggers that print at import or
capture time for reasons that do not concern a stepq user (torchao's optional CUDA extensions, torch's
pytree deprecation notes when torchao registers its enums, diffusers' torchao quantizer probe), filters
one torch FutureWarning by its exact message (``isinstance(treespec, LeafSpec)``, raised when a
program's treespecs are copied), and
gives the ``stepq`` logger a stderr handler at WARNING, so that stepq's own warnings (an ONNX
fallback, a clamped timestep) are seen. Every other Python warning is left alone: a
``warnings.warn`` from stepq reaches the user unfiltered. Library code never calls this; it is for the entry points.
"""

from __future__ import annotations

import logging
import sys
import warnings

__all__ = ["THIRD_PARTY_LOGGERS", "quiet_third_party"]

#: loggers that print at import time, each with what it prints
THIRD_PARTY_LOGGERS = {
    "torchao": "Failed to load .../_C_mxfp8 ... (optional CUDA extensions, absent on a CPU build)",
    "torch.utils._pytree": "<enum ...> is an Enum subclass and is now natively supported ... (torchao's enums)",
    "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects ...",
    "torch.onnx._internal.exporter._registration": "torchvision is not installed. Skipping torchvision::nms (x4)",
    "torch.onnx._internal.exporter._core": "nn_module_stack not found for node '_to_copy'. Skip adding metadata...",
}


def quiet_third_party() -> None:
    """Silence ``THIRD_PARTY_LOGGERS`` below ERROR and show stepq's warnings on stderr (idempotent)."""
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # torch's own pytree deprecation note, printed when a Program is copied (its treespecs are deep-copied)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    log = logging.getLogger("stepq")
    if not any(getattr(h, "_stepq_console", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("stepq: %(levelname)s: %(message)s"))
        handler.setLevel(logging.WARNING)
        handler._stepq_console = True  # type: ignore[attr-defined]
        log.addHandler(handler)
