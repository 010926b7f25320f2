"""stepq's quantizer ops, defined with ``torch.library`` so they are real nodes in the graph.

All ops follow ONNX QuantizeLinear / DequantizeLinear semantics, so the ONNX backend translates
them one to one:

    quantize:    q = clamp(round(x / s) + z, qmin, qmax)          (round half to even)
    dequantize:  y = (q - z) · s
    fake_quant:  y = dequantize(quantize(x))

``scale`` and ``zero_point`` are tensors (never Python numbers), so a pass can feed them from a
buffer, a learned parameter, or a timestep-indexed table (``timestep_index`` maps the model's
timestep input to the integer row of such a table, see ``stepq.compiler.timesteps``). Their layout
is ONNX's:

* ``axis`` is None: per tensor, ``scale.numel() == 1``;
* ``axis`` given, ``group_size == 0``: one value per slice along ``axis``, shape ``[x.shape[axis]]``;
* ``axis`` given, ``group_size > 0``: blocked, shape of ``x`` with ``x.shape[axis]`` replaced by
  ``ceil(x.shape[axis] / group_size)``.

The zero point is stored as a float tensor (a learned zero point stays differentiable) and is
rounded inside the op. ``fake_quant`` has an autograd formula: the straight-through estimator
for ``x`` (gradient 1 inside the clipping range, 0 outside) and the LSQ gradients for the step
size (``round(v) − v`` inside the range, the clipped level otherwise) and the zero point.

Bits: the grid is given as ``quant_min`` / ``quant_max`` (2 to 8 bits: signed
[−2^(b−1), 2^(b−1)−1] or unsigned [0, 2^b−1]). Integer tensors below 8 bits are stored packed
(``pack`` here, ``stepq::unpack`` in the graph), two's complement in ``b`` bits, least significant
bits first, so packed 4-bit signed data has ONNX's INT4 layout.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
from torch import Tensor

from stepq.compiler.errors import FallbackWarning, TimestepRangeError

__all__ = [
    "check_grid",
    "dequantize",
    "expand_qparam",
    "fake_quant",
    "pack",
    "quantize",
    "timestep_index",
    "unpack",
]

log = logging.getLogger(__name__)

_LIB = torch.library.Library("stepq", "DEF")

_LIB.define(
    "fake_quant(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
    "int? axis=None, int group_size=0) -> Tensor"
)
_LIB.define(
    "quantize(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
    "int? axis=None, int group_size=0, ScalarType dtype=int8) -> Tensor"
)
_LIB.define(
    "dequantize(Tensor q, Tensor scale, Tensor zero_point, int? axis=None, int group_size=0, "
    "ScalarType out_dtype=float) -> Tensor"
)
_LIB.define("unpack(Tensor packed, int bits, bool signed, SymInt[] shape) -> Tensor")
_LIB.define("timestep_index(Tensor t, int num_train_timesteps, float scale, bool clamp) -> Tensor")


def check_grid(quant_min: int, quant_max: int) -> None:
    if quant_min >= quant_max:
        raise ValueError(f"quant_min ({quant_min}) must be below quant_max ({quant_max})")
    if quant_min < -128 or quant_max > 255:
        raise ValueError(f"grid [{quant_min}, {quant_max}] does not fit in 8 bits")


def expand_qparam(p: Tensor, x_shape: torch.Size | tuple[int, ...], axis: int | None, group_size: int) -> Tensor:
    """Reshape a scale / zero point of ONNX layout so that it broadcasts against ``x``."""
    ndim = len(x_shape)
    if axis is None:
        return p.reshape(())
    ax = axis % ndim
    if group_size <= 0:
        shape = [1] * ndim
        shape[ax] = -1
        return p.reshape(shape)
    return p.repeat_interleave(group_size, dim=ax).narrow(ax, 0, x_shape[ax])


def _reduce_to(grad: Tensor, p: Tensor, axis: int | None, group_size: int) -> Tensor:
    """Sum a gradient of x's shape back to the layout of a scale / zero point."""
    if axis is None:
        return grad.sum().reshape(p.shape)
    ax = axis % grad.ndim
    if group_size <= 0:
        dims = [d for d in range(grad.ndim) if d != ax]
        return grad.sum(dim=dims).reshape(p.shape)
    n = grad.shape[ax]
    groups = math.ceil(n / group_size)
    pad = groups * group_size - n
    if pad:
        pad_shape = list(grad.shape)
        pad_shape[ax] = pad
        grad = torch.cat([grad, grad.new_zeros(pad_shape)], dim=ax)
    shape = list(grad.shape)
    shape[ax : ax + 1] = [groups, group_size]
    return grad.reshape(shape).sum(dim=ax + 1).reshape(p.shape)


def _quantize_float(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
                    axis: int | None, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``clamp(round(x / s) + z, qmin, qmax)`` (as float) with ``s`` and ``z`` broadcast to ``x``.

    One buffer of x's shape is allocated (``x / s``, or ``x / s`` broadcast when ``s`` is wider) and
    every later step works in it in place: the same IEEE operations in the same order as the
    out-of-place expression, so the same bits, at a sixth of the memory traffic."""
    s = expand_qparam(scale, x.shape, axis, group_size).to(x.dtype)
    z = torch.round(expand_qparam(zero_point, x.shape, axis, group_size)).to(x.dtype)
    q = torch.div(x, s)
    if q.shape != torch.broadcast_shapes(q.shape, z.shape):  # a zero point wider than x / s: out of place
        return torch.clamp(torch.round(q) + z, quant_min, quant_max), s, z
    q.round_().add_(z).clamp_(quant_min, quant_max)
    return q, s, z


@torch.library.impl(_LIB, "fake_quant", "CompositeExplicitAutograd")
def _fake_quant_impl(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
                     axis: int | None = None, group_size: int = 0) -> Tensor:
    q, s, z = _quantize_float(x, scale, zero_point, quant_min, quant_max, axis, group_size)
    if q.shape != torch.broadcast_shapes(q.shape, z.shape, s.shape):
        return (q - z) * s
    return q.sub_(z).mul_(s)  # (q − z)·s in q's own buffer


@torch.library.register_fake("stepq::fake_quant")
def _fake_quant_fake(x, scale, zero_point, quant_min, quant_max, axis=None, group_size=0):
    return torch.empty_like(x)


def _fake_quant_setup(ctx, inputs, output):
    x, scale, zero_point, quant_min, quant_max, axis, group_size = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.grid = (quant_min, quant_max, axis, group_size)


def _fake_quant_backward(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    quant_min, quant_max, axis, group_size = ctx.grid
    need_x, need_s, need_z = ctx.needs_input_grad[:3]
    s = expand_qparam(scale, x.shape, axis, group_size).to(x.dtype)
    z = torch.round(expand_qparam(zero_point, x.shape, axis, group_size)).to(x.dtype)
    v = x / s
    r = torch.round(v)
    q = r + z
    below, above = q < quant_min, q > quant_max
    outside = below | above
    grad_x = grad_s = grad_z = None
    if need_x:
        grad_x = grad.masked_fill(outside, 0.0)
    if need_s:
        level = torch.where(below, quant_min - z, torch.where(above, quant_max - z, r - v))
        grad_s = _reduce_to(grad * level, scale, axis, group_size).to(scale.dtype)
    if need_z:
        grad_z = _reduce_to((grad * -s).masked_fill(~outside, 0.0), zero_point, axis, group_size).to(zero_point.dtype)
    return grad_x, grad_s, grad_z, None, None, None, None


torch.library.register_autograd("stepq::fake_quant", _fake_quant_backward, setup_context=_fake_quant_setup)


@torch.library.impl(_LIB, "quantize", "CompositeExplicitAutograd")
def _quantize_impl(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
                   axis: int | None = None, group_size: int = 0, dtype: torch.dtype = torch.int8) -> Tensor:
    q, _, _ = _quantize_float(x, scale, zero_point, quant_min, quant_max, axis, group_size)
    return q.to(dtype)


@torch.library.register_fake("stepq::quantize")
def _quantize_fake(x, scale, zero_point, quant_min, quant_max, axis=None, group_size=0, dtype=torch.int8):
    return torch.empty_like(x, dtype=dtype)


@torch.library.impl(_LIB, "dequantize", "CompositeExplicitAutograd")
def _dequantize_impl(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None = None,
                     group_size: int = 0, out_dtype: torch.dtype = torch.float32) -> Tensor:
    s = expand_qparam(scale, q.shape, axis, group_size).to(out_dtype)
    z = torch.round(expand_qparam(zero_point, q.shape, axis, group_size)).to(out_dtype)
    if q.shape != torch.broadcast_shapes(q.shape, z.shape, s.shape):
        return (q.to(out_dtype) - z) * s
    out = q.to(out_dtype, copy=True)  # the one new buffer; (q − z)·s is then computed in it
    return out.sub_(z).mul_(s)


@torch.library.register_fake("stepq::dequantize")
def _dequantize_fake(q, scale, zero_point, axis=None, group_size=0, out_dtype=torch.float32):
    return torch.empty_like(q, dtype=out_dtype)


def _per_byte(bits: int) -> int:
    if bits not in (1, 2, 4, 8):
        # 3, 5, 6 and 7 bits are stored in a plain bit stream.
        return 0
    return 8 // bits


def pack(q: Tensor, bits: int, signed: bool) -> Tensor:
    """Pack integers of a ``bits``-bit grid into a flat uint8 tensor (LSB first, two's complement)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit values")
    flat = q.reshape(-1).to(torch.int16)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if flat.numel() and (int(flat.min()) < lo or int(flat.max()) > hi):
        raise ValueError(f"values outside the {'signed' if signed else 'unsigned'} {bits}-bit grid")
    codes = (flat & ((1 << bits) - 1)).to(torch.uint8)
    if bits == 8:
        return codes
    per = _per_byte(bits)
    if per:
        n = math.ceil(codes.numel() / per) * per
        codes = torch.cat([codes, codes.new_zeros(n - codes.numel())]).reshape(-1, per).to(torch.int32)
        shifts = torch.arange(per, dtype=torch.int32) * bits
        return (codes << shifts).sum(dim=1).to(torch.uint8)
    # generic bit stream
    bit_idx = torch.arange(bits, dtype=torch.uint8)
    stream = ((codes.unsqueeze(1) >> bit_idx) & 1).reshape(-1)
    n = math.ceil(stream.numel() / 8) * 8
    stream = torch.cat([stream, stream.new_zeros(n - stream.numel())]).reshape(-1, 8).to(torch.int32)
    return (stream << torch.arange(8, dtype=torch.int32)).sum(dim=1).to(torch.uint8)


def _unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    if bits == 8:
        return packed.reshape(-1)[:numel].to(torch.int16)
    per = _per_byte(bits)
    data = packed.reshape(-1).to(torch.int16)
    if per:
        shifts = torch.arange(per, dtype=torch.int16) * bits
        codes = (data.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(-1)[:numel]
    stream = ((data.unsqueeze(1) >> torch.arange(8, dtype=torch.int16)) & 1).reshape(-1)[: numel * bits]
    weights = torch.tensor([1 << i for i in range(bits)], dtype=torch.int16)
    return (stream.reshape(numel, bits) * weights).sum(dim=1)


@torch.library.impl(_LIB, "unpack", "CompositeExplicitAutograd")
def _unpack_impl(packed: Tensor, bits: int, signed: bool, shape: list[int]) -> Tensor:
    numel = math.prod(shape)
    codes = _unpack_codes(packed, bits, numel)
    if signed:
        codes = torch.where(codes >= (1 << (bits - 1)), codes - (1 << bits), codes)
        return codes.to(torch.int8).reshape(shape)
    return codes.to(torch.uint8).reshape(shape)


@torch.library.register_fake("stepq::unpack")
def _unpack_fake(packed, bits, signed, shape):
    return packed.new_empty(shape, dtype=torch.int8 if signed else torch.uint8)


def timestep_index(t: Tensor, *, scale: float = 1.0, num_train_timesteps: int = 1000,
                   policy: str = "error", where: str = "") -> Tensor:
    """int64 indices into a length-T table for the timestep tensor ``t`` (any shape)."""
    v = t.detach()
    if v.dtype.is_floating_point or scale != 1.0:
        v = torch.round(v.double() * scale)
        if bool(torch.isnan(v).any()):
            raise TimestepRangeError(f"timestep is NaN{' in ' + where if where else ''}; a timestep must be a "
                                     f"finite number in [0, {num_train_timesteps}], and NaN is never clamped")
        # ±inf (and huge values) would wrap around in the int64 cast; keep them far outside the range
        v = v.clamp(-(2.0 ** 62), 2.0 ** 62)
    idx = v.to(torch.int64)
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if hi == num_train_timesteps and lo >= 0:
            return idx.clamp_max(num_train_timesteps - 1)
        if lo < 0 or hi > num_train_timesteps:
            msg = (f"timestep {lo if lo < 0 else hi} is outside the table range [0, {num_train_timesteps}]"
                   f"{' in ' + where if where else ''}")
            if policy == "error":
                raise TimestepRangeError(msg + "; set the recipe's timestep_policy='clamp' to clamp instead")
            warnings.warn(FallbackWarning(f"{msg}; clamping"), stacklevel=2)
            idx = idx.clamp(0, num_train_timesteps - 1)
    return idx


@torch.library.impl(_LIB, "timestep_index", "CompositeExplicitAutograd")
def _timestep_index_impl(t: Tensor, num_train_timesteps: int, scale: float, clamp: bool) -> Tensor:
    return timestep_index(t, scale=scale, num_train_timesteps=num_train_timesteps, policy="clamp" if clamp else "error")


@torch.library.register_fake("stepq::timestep_index")
def _timestep_index_fake(t, num_train_timesteps, scale, clamp):
    return torch.empty_like(t, dtype=torch.int64)


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
               axis: int | None = None, group_size: int = 0) -> Tensor:
    return torch.ops.stepq.fake_quant(x, scale, zero_point, quant_min, quant_max, axis, group_size)


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
             axis: int | None = None, group_size: int = 0, dtype: torch.dtype = torch.int8) -> Tensor:
    return torch.ops.stepq.quantize(x, scale, zero_point, quant_min, quant_max, axis, group_size, dtype)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None = None, group_size: int = 0,
               out_dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.ops.stepq.dequantize(q, scale, zero_point, axis, group_size, out_dtype)


def unpack(packed: Tensor, bits: int, signed: bool, shape: list[int]) -> Tensor:
    return torch.ops.stepq.unpack(packed, bits, signed, list(shape))


#: the ops that quantize an activation or a weight in the graph (used by passes and backends).
FAKE_QUANT = torch.ops.stepq.fake_quant.default
QUANTIZE = torch.ops.stepq.quantize.default
DEQUANTIZE = torch.ops.stepq.dequantize.default
UNPACK = torch.ops.stepq.unpack.default
TIMESTEP_INDEX = torch.ops.stepq.timestep_index.default

# TerDiT's ternary quantizer and base-3 storage (registered in the same stepq namespace)
from stepq.compiler.ternary_ops import TERNARY, UNPACK_BASE3  # noqa: E402, F401
