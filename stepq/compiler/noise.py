"""Third-party log lines and warnings that say nothing to a stepq user, held back during capture and
export; everything else, stepq's own warnings first, still reaches the user.

Each entry names the logger (or warning category) and the message it drops, and why it is noise:
nothing is silenced by level or by whole logger. Measured on the digits models (issue #14): a first
export printed ~17 such lines while stepq's own ONNX fallback warning went to a NullHandler.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

__all__ = ["LOG_NOISE", "WARNING_NOISE", "contained_noise", "drop_noise"]

#: (logger, message regex, why it is noise)
LOG_NOISE: tuple[tuple[str, str, str], ...] = (
    ("torch.onnx._internal.exporter._registration", r"torchvision is not installed",
     "torch.onnx registers torchvision's ops when torchvision exists; stepq's graphs have none"),
    ("torch.onnx._internal.exporter._core", r"nn_module_stack not found for node",
     "nodes stepq inserts have no source module; the ONNX node metadata is only cosmetic"),
    ("torch.utils._pytree", r"is an Enum subclass and is now natively supported",
     "torchao registers enums as pytree constants at import (diffusers imports torchao)"),
    ("torch._export.non_strict_utils", r"0/1 specialized; Dim\.AUTO",
     "capture widens a batch-1 example itself; the remaining size-1 dims are not the batch"),
    ("torchao", r"Failed to load .*\.so", "torchao's CUDA extensions on a CPU-only install"),
    ("diffusers.utils.import_utils", r"Unable to import `torchao`", "the same torchao extensions, via diffusers"),
    ("diffusers.quantizers.torchao.torchao_quantizer", r"Unable to import `torchao`",
     "the same torchao extensions, via diffusers' torchao quantizer probe"),
)

#: (category, message regex, why it is noise)
WARNING_NOISE: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated",
     "torch's own deepcopy of an exported graph's pytree spec"),
    (UserWarning, r"Converting a tensor with requires_grad=True to a scalar",
     "torch.export's non-strict tracing of a diffusers timestep embedding"),
)


class _Drop(logging.Filter):
    def __init__(self, patterns: list[re.Pattern[str]]):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(p.search(msg) for p in self.patterns)


def _install() -> list[tuple[logging.Logger, logging.Filter]]:
    by_logger: dict[str, list[re.Pattern[str]]] = {}
    for name, pattern, _ in LOG_NOISE:
        by_logger.setdefault(name, []).append(re.compile(pattern))
    installed: list[tuple[logging.Logger, logging.Filter]] = []
    for name, patterns in by_logger.items():
        f = _Drop(patterns)
        logger = logging.getLogger(name)
        logger.addFilter(f)
        installed.append((logger, f))
    return installed


def _ignore_warnings() -> None:
    for category, pattern, _ in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=pattern, category=category)


@contextlib.contextmanager
def contained_noise() -> Iterator[None]:
    """Drop the ``LOG_NOISE`` records and ``WARNING_NOISE`` warnings inside the block."""
    installed = _install()
    try:
        with warnings.catch_warnings():
            _ignore_warnings()
            yield
    finally:
        for logger, f in installed:
            logger.removeFilter(f)


_dropped_for_good = False


def drop_noise() -> None:
    """The same filters for the rest of the process (idempotent): for the entry points (the ``stepq``
    command, the demo), whose imports print before any stepq call. Library code never calls it."""
    global _dropped_for_good
    if not _dropped_for_good:
        _install()
        _ignore_warnings()
        _dropped_for_good = True
