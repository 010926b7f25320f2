"""Typed errors. Every error stepq raises on bad input or a failed step is a ``StepqError``.

The hierarchy follows onnx_ir's: a pass that breaks is wrapped in ``PassError`` that names the pass
and the passes that ran before it, with the original exception chained.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "BorrowError",
    "CalibrationError",
    "CaptureError",
    "DumpError",
    "FallbackWarning",
    "InputSignatureError",
    "InvariantError",
    "KernelCompileError",
    "KernelError",
    "NoDeviceError",
    "PassError",
    "PostconditionError",
    "PreconditionError",
    "RecipeError",
    "StepqError",
    "StepqWarning",
    "TimestepClampWarning",
    "TimestepRangeError",
    "UnsupportedConversionError",
]


class StepqError(Exception):
    """Base class of every error stepq raises."""


class CaptureError(StepqError):
    """torch.export could not capture the model, or the example inputs do not fit it."""


class RecipeError(StepqError, ValueError):
    """An invalid recipe, spec or preset name."""


class CalibrationError(StepqError):
    """Calibration data is empty, malformed, or produced non-finite activations."""


class InputSignatureError(StepqError, TypeError):
    """A compiled model was called with arguments that do not match the captured signature."""


class TimestepRangeError(StepqError, ValueError):
    """A timestep is not finite, or ``t · timestep_scale`` falls outside [0, T] (T = the recipe's
    ``num_train_timesteps``), and the recipe's ``timestep_policy`` is ``"error"``."""


class UnsupportedConversionError(StepqError, TypeError):
    """A compiled model was asked to change its dtype (``.half()``, ``.to(torch.bfloat16)``): its
    quantizer ops, scales and dequantized weights compute in float32 only."""


class StepqWarning(UserWarning):
    """Base class of the warnings stepq gives with ``warnings.warn`` (shown to the user by default)."""


class FallbackWarning(StepqWarning):
    """Something fell back to a slower or less exact path than asked for: an ONNX node left as a
    float kernel, a translator that failed and was replaced by another, a clamped timestep."""


class TimestepClampWarning(FallbackWarning):
    """A timestep outside [0, T] was clamped into it (the recipe's ``timestep_policy="clamp"``)."""


class ArtifactError(StepqError):
    """A saved artefact is missing, corrupt, or of an unknown version."""


class DumpError(StepqError, OSError):
    """The graph dump folder (``dump=`` / ``$STEPQ_DUMP_DIR``) cannot be written; names the path."""


class KernelError(StepqError):
    """A CUDA kernel of stepq.cuda cannot be built, loaded or launched."""


class KernelCompileError(KernelError):
    """NVRTC rejected a kernel source; the message names the file and the architecture and carries NVRTC's log."""

    def __init__(self, source: str, arch: str, log: str):
        super().__init__(f"NVRTC could not compile {source} for {arch}:\n{log}")
        self.source = source
        self.arch = arch
        self.log = log


class NoDeviceError(KernelError):
    """The CUDA kernels were asked to run where there is no CUDA device (or no CuPy / driver)."""


class InvariantError(StepqError):
    """A graph invariant does not hold."""


class PreconditionError(InvariantError):
    """A pass was given a program it cannot work on."""


class PostconditionError(InvariantError):
    """A pass left the graph in a state that breaks an invariant (lint, shapes)."""


class BorrowError(InvariantError):
    """A tensor the program borrows from the user's model (shared read-only since capture) was
    written in place: by a pass (named), or by the caller between capture and convert."""


class PassError(StepqError):
    """A pass raised; names the pass and those that ran before it."""

    def __init__(self, pass_name: str, previous: list[str], cause: BaseException):
        before = ", ".join(previous) if previous else "none"
        super().__init__(
            f"pass {pass_name!r} failed: {type(cause).__name__}: {cause} "
            f"(after the following passes: {before})"
        )
        self.pass_name = pass_name
        self.previous = list(previous)
