"""Call-time checks: a call to a compiled model is held against the signature it was captured with.

``InputSignature.bind`` maps a call onto the captured arguments (names, positions, constants, the
timestep's shape). ``check_call`` then refuses what the graph cannot compute, with an
``InputSignatureError`` that names the argument, before torch raises something unreadable deep
inside the graph:

* dtype: every tensor argument has its captured dtype (the timestep is converted by ``bind``);
* fixed dimensions: the capture's symbolic dimension is the batch (dim 0) only, so every other
  dimension (channels, latent height / width, sequence length) is the captured one;
* batch: a tensor whose dim 0 is the sample's symbolic batch in the captured graph has the call's
  sample batch; a [B] timestep has B or one element (broadcast by ``InputSignature.expand_timestep``).

``TimestepRange`` (given to ``InputSignature.bind``, which applies it to the timestep as the caller
passed it, before the cast to the captured dtype) checks the timestep's values against the table grid, for every model (with
or without timestep tables): ``t · timestep_scale`` must be finite and in [0, T]. Outside, the
recipe's ``timestep_policy`` decides: ``"error"`` raises ``TimestepRangeError``, ``"clamp"`` clamps
t into [0, T / timestep_scale] with a ``TimestepClampWarning``. NaN has no nearest valid value and
raises under both policies. (ONNX cannot raise: the exported graph clamps, docs/ONNX.md.)
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from stepq.compiler.errors import InputSignatureError, TimestepClampWarning, TimestepRangeError

if TYPE_CHECKING:
    from stepq.compiler.program import InputSignature

__all__ = ["TimestepRange", "batched_args", "check_call"]


@dataclass(frozen=True)
class TimestepRange:
    """The valid timesteps of a compiled model: ``t · scale`` in [0, num_train_timesteps]."""

    num_train_timesteps: int
    scale: float = 1.0
    policy: str = "error"

    @property
    def upper(self) -> float:
        """The largest valid raw timestep, T / scale."""
        return self.num_train_timesteps / self.scale

    def check(self, t: torch.Tensor, *, name: str = "timestep") -> torch.Tensor:
        """``t`` itself when every value is valid; clamped (policy ``"clamp"``) or refused otherwise."""
        if t.numel() == 0:
            return t
        v = t.detach()
        if v.dtype.is_floating_point:
            if bool(torch.isnan(v).any()):
                raise TimestepRangeError(
                    f"argument {name!r} is NaN (values {_show(v)}); a timestep must be a finite number in "
                    f"[0, {_num(self.upper)}]; NaN has no nearest valid timestep, so no policy clamps it")
        lo, hi = float(v.min()), float(v.max())
        if lo >= 0 and hi <= self.upper and math.isfinite(hi):
            return t
        bad = lo if lo < 0 else hi
        msg = (f"argument {name!r} has timestep {_num(bad)} outside [0, {_num(self.upper)}] "
               f"(T = {self.num_train_timesteps} training timesteps"
               f"{f', timestep_scale {_num(self.scale)}' if self.scale != 1.0 else ''})")
        if self.policy != "clamp":
            raise TimestepRangeError(msg + "; set the recipe's timestep_policy='clamp' to clamp instead")
        warnings.warn(msg + "; clamping it into the range (recipe timestep_policy='clamp')",
                      TimestepClampWarning, stacklevel=_caller_level())
        upper: float | int = self.upper
        if not t.dtype.is_floating_point:
            upper = math.floor(upper)
        return t.clamp(0, upper)


_LIBRARY_DIRS = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(torch.__file__))


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside stepq and torch: the warning names the user's
    call (``qm(...)``), not the line of stepq that noticed."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def _num(x: float) -> str:
    return str(int(x)) if math.isfinite(x) and abs(x) < 1e12 and float(x).is_integer() else f"{x:g}"


def _show(v: torch.Tensor) -> str:
    flat = v.reshape(-1)
    values = ", ".join(_num(float(x)) for x in flat[:4])
    return f"[{values}{', …' if flat.numel() > 4 else ''}]"


def batched_args(gm: torch.fx.GraphModule, sample_arg: str | None) -> frozenset[str]:
    """The placeholders whose dim 0 is the sample's symbolic batch (``meta['val']`` of a captured
    graph; empty when the graph has no fake values, e.g. loaded from an artefact, or a static batch).
    Shapes equal at capture are not enough: Flux's ``txt_ids`` [L, 3] can have L = the batch."""
    vals = {}
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            break
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            vals[n.name] = v.shape[0]
    batch = vals.get(sample_arg) if sample_arg is not None else None
    if not isinstance(batch, torch.SymInt):
        return frozenset()
    return frozenset(k for k, d in vals.items() if isinstance(d, torch.SymInt) and str(d) == str(batch))


def check_call(signature: InputSignature, bound: dict[str, Any], *, sample_arg: str | None,
               batched: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Check ``bound`` (what ``signature.bind`` returned) against the capture: dtypes, fixed
    dimensions, the batch of the arguments in ``batched`` (``batched_args``) and the timestep's
    count; returns it. Raises ``InputSignatureError`` naming the argument."""
    sample = bound.get(sample_arg) if sample_arg is not None else None
    batch, sample_shape, captured_shape = None, [], []
    if sample_arg is not None and isinstance(sample, torch.Tensor) and sample.dim() >= 1 and sample_arg in signature.tensors:
        batch, sample_shape = int(sample.shape[0]), list(sample.shape)
        captured_shape = list(signature.tensors[sample_arg].shape)
    for name, info in signature.tensors.items():
        value = bound.get(name)
        if not isinstance(value, torch.Tensor):
            continue
        if name == signature.timestep:
            if value.dim() == 1 and batch is not None and value.numel() not in (1, batch):
                raise InputSignatureError(
                    f"argument {name!r} has {value.numel()} timesteps for a batch of {batch} samples "
                    f"({sample_arg!r} has shape {sample_shape}); pass one timestep per sample or one for "
                    f"the whole batch")
            continue
        if value.dtype != info.torch_dtype:
            raise InputSignatureError(
                f"argument {name!r} has dtype {str(value.dtype).removeprefix('torch.')}; the model was captured "
                f"with {info.dtype}, and the graph is specialised on it: pass {name}.to(torch.{info.dtype}), or "
                f"capture again with a {str(value.dtype).removeprefix('torch.')} example")
        shape, want = list(value.shape), list(info.shape)
        if len(shape) == len(want) and shape[1:] != want[1:]:
            dim = next(i for i in range(1, len(want)) if shape[i] != want[i])
            raise InputSignatureError(
                f"argument {name!r} has shape {shape}; the graph was captured with {want} and fixes every "
                f"dimension but the batch (dim {dim} must be {want[dim]}, got {shape[dim]}); capture again "
                f"with an example of the size you call it at")
        if batch is not None and name != sample_arg and name in batched and shape and shape[0] != batch:
            raise InputSignatureError(
                f"argument {name!r} has batch {shape[0]} but {sample_arg!r} has batch {batch} "
                f"(they shared the batch at capture: {want} and {captured_shape})")
    return bound
