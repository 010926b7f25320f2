"""contained_noise drops the listed third-party lines by logger and message, and nothing else."""

from __future__ import annotations

import logging
import warnings

import pytest

from stepq.compiler.errors import FallbackWarning
from stepq.compiler.noise import LOG_NOISE, WARNING_NOISE, contained_noise

REGISTRATION = "torch.onnx._internal.exporter._registration"


def test_listed_lines_are_dropped_and_the_rest_passes(caplog):
    before = list(logging.getLogger(REGISTRATION).filters)
    with caplog.at_level(logging.WARNING), contained_noise():
        logging.getLogger(REGISTRATION).warning("torchvision is not installed. Skipping torchvision::nms")
        logging.getLogger("torch.onnx._internal.exporter._core").warning(
            "nn_module_stack not found for node '_to_copy'. Skip adding metadata...")
        logging.getLogger(REGISTRATION).warning("some other registration problem")  # not listed: passes
        logging.getLogger("stepq.backends.onnx.export").warning("stepq's own line")
    text = caplog.text
    assert "torchvision" not in text and "nn_module_stack" not in text
    assert "some other registration problem" in text and "stepq's own line" in text
    assert logging.getLogger(REGISTRATION).filters == before  # removed on exit
    if not before:  # (an entry point run earlier in this process may have dropped it for good)
        with caplog.at_level(logging.WARNING):
            logging.getLogger(REGISTRATION).warning("torchvision is not installed. Skipping torchvision::nms")
        assert "torchvision" in caplog.text  # outside the block nothing is filtered


def test_stepq_warnings_pass_and_listed_warnings_do_not():
    with pytest.warns(FallbackWarning, match="falls back") as rec, contained_noise():
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn(FallbackWarning("a stepq fallback falls back"), stacklevel=1)
    assert [type(w.message) for w in rec] == [FallbackWarning]


def test_every_entry_gives_its_reason():
    assert all(len(why) > 20 for *_, why in LOG_NOISE + WARNING_NOISE)
