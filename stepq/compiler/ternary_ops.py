"""Ternary weights (TerDiT): the quantizer op and the base-3 packing, as ``torch.library`` ops.

The quantizer (TerDiT's ``ternary`` autograd function, with the learned scale multiplied in):

    γ    = mean |W|                     per tensor (axis None) or per output channel (axis 0)
    W_t  = clip(round(W / (γ + ε)), −1, 1)                                    (round half to even)
    W_q  = α · W_t                      α learned, one value per tensor or per output channel

``stepq::ternary(W, α, axis, eps)`` computes W_q. Its gradient is the identity straight-through
estimator for W (∂L/∂W = α·∂L/∂W_q, as the authors' code: their function returns W_t with
``grad_output`` passed through, and α multiplies outside) and ∂L/∂α = Σ ∂L/∂W_q · W_t.

Storage at convert time (``stepq.passes.quantize_weights``): the codes W_t ∈ {−1, 0, +1} as

* **base-3**, 5 trits per byte (1.6 bits/weight; the floor is log2 3 = 1.585). The trits t_0…t_4 of
  5 consecutive weights (row-major, the last group padded with −1) give the digit value
  c = Σ_n (t_n + 1)·3^(4−n) ∈ [0, 242]; the byte stored is s = ceil(c·256/243) ∈ [0, 255]. Decoding
  needs no division (llama.cpp TQ1_0's Vulkan shader): d_n = (((s·3^n) mod 256)·3) >> 8, t_n = d_n − 1.
  s/256 is c/243 rounded up to a multiple of 1/256, so (s·3^n mod 256)/256 approximates the fractional
  part of c·3^n/243 from above, and its leading base-3 digit is d_n; the error stays below one digit
  for n ≤ 4, which ``tests/test_terdit_packing.py`` checks on all 243 codes.
* **2-bit**, 4 codes per byte: the signed 2-bit integers of ``stepq.compiler.ops.pack`` (two's
  complement, least significant bits first, ONNX's INT2 layout), read back by ``stepq::unpack``.

and the graph reads them as ``dequantize(unpack_base3(P, shape) | unpack(P, 2, True, shape), α, 0)``,
which is α·W_t bit for bit (``(W_t − 0)·α``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "TERNARY",
    "UNPACK_BASE3",
    "base3_decode_byte",
    "pack_base3",
    "ternary",
    "ternary_codes",
    "ternary_gamma",
    "unpack_base3",
]

_LIB = torch.library.Library("stepq", "FRAGMENT")
_LIB.define("ternary(Tensor w, Tensor alpha, int? axis=None, float eps=1e-06) -> Tensor")
_LIB.define("unpack_base3(Tensor packed, SymInt[] shape) -> Tensor")

#: trits per byte of the base-3 format
TRITS_PER_BYTE = 5
_POW3 = (81, 27, 9, 3, 1)


def ternary_gamma(w: Tensor, axis: int | None) -> Tensor:
    """γ = mean |W|: a 0-d tensor (axis None) or one value per slice along ``axis`` (shape [w.shape[axis]])."""
    a = w.detach().abs() if not w.requires_grad else w.abs()
    if axis is None:
        return a.mean()
    ax = axis % w.dim()
    dims = [d for d in range(w.dim()) if d != ax]
    return a.mean(dim=dims) if dims else a


def _expand(p: Tensor, w: Tensor, axis: int | None) -> Tensor:
    if axis is None:
        return p.reshape(())
    shape = [1] * w.dim()
    shape[axis % w.dim()] = -1
    return p.reshape(shape)


def _codes_float(w: Tensor, axis: int | None, eps: float) -> Tensor:
    gamma = _expand(ternary_gamma(w.detach(), axis), w, axis)
    # + 0.0 turns round()'s −0 into +0, so W_t·α equals the stored code's (0 − 0)·α bit for bit
    return torch.clamp(torch.round(w.detach() / (gamma + eps)), -1.0, 1.0) + 0.0


def ternary_codes(w: Tensor, axis: int | None = None, eps: float = 1e-6) -> Tensor:
    """W_t ∈ {−1, 0, +1} as int8 (the same arithmetic as the op's forward)."""
    return _codes_float(w, axis, eps).to(torch.int8)


@torch.library.impl(_LIB, "ternary", "CompositeExplicitAutograd")
def _ternary_impl(w: Tensor, alpha: Tensor, axis: int | None = None, eps: float = 1e-6) -> Tensor:
    wt = _codes_float(w, axis, eps)
    return wt * _expand(alpha, w, axis).to(w.dtype)


@torch.library.register_fake("stepq::ternary")
def _ternary_fake(w, alpha, axis=None, eps=1e-6):
    return torch.empty_like(w)


def _ternary_setup(ctx, inputs, output):
    w, alpha, axis, eps = inputs
    ctx.save_for_backward(w, alpha)
    ctx.cfg = (axis, eps)


def _ternary_backward(ctx, grad):
    w, alpha = ctx.saved_tensors
    axis, eps = ctx.cfg
    grad_w = grad_a = None
    if ctx.needs_input_grad[0]:
        grad_w = grad * _expand(alpha, w, axis).to(grad.dtype)  # identity STE through round / clip
    if ctx.needs_input_grad[1]:
        g = grad * _codes_float(w, axis, eps)
        if axis is None:
            grad_a = g.sum().reshape(alpha.shape)
        else:
            ax = axis % w.dim()
            dims = [d for d in range(w.dim()) if d != ax]
            grad_a = (g.sum(dim=dims) if dims else g).reshape(alpha.shape)
        grad_a = grad_a.to(alpha.dtype)
    return grad_w, grad_a, None, None


torch.library.register_autograd("stepq::ternary", _ternary_backward, setup_context=_ternary_setup)


def ternary(w: Tensor, alpha: Tensor, axis: int | None = None, eps: float = 1e-6) -> Tensor:
    return torch.ops.stepq.ternary(w, alpha, axis, eps)


# -- base-3 packing ------------------------------------------------------------------------------------
def pack_base3(codes: Tensor) -> Tensor:
    """Ternary codes (any shape, values in {−1, 0, 1}) → flat uint8, 5 trits per byte (module docstring)."""
    flat = codes.reshape(-1).to(torch.int16)
    if flat.numel() and (int(flat.min()) < -1 or int(flat.max()) > 1):
        raise ValueError("pack_base3 takes values in {-1, 0, 1}")
    n = math.ceil(flat.numel() / TRITS_PER_BYTE) * TRITS_PER_BYTE
    digits = torch.cat([flat + 1, flat.new_zeros(n - flat.numel())]).reshape(-1, TRITS_PER_BYTE)
    c = (digits * torch.tensor(_POW3, dtype=torch.int16)).sum(dim=1)
    return ((c.to(torch.int32) * 256 + 242) // 243).to(torch.uint8)


def base3_decode_byte(s: Tensor) -> Tensor:
    """uint8 bytes [m] → their trit digits d_n ∈ {0, 1, 2}, shape [m, 5], without division:
    d_n = (((s·3^n) mod 256)·3) >> 8."""
    s = s.to(torch.int32)
    pows = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)
    return ((((s.unsqueeze(1) * pows) & 0xFF) * 3) >> 8).to(torch.int16)


@torch.library.impl(_LIB, "unpack_base3", "CompositeExplicitAutograd")
def _unpack_base3_impl(packed: Tensor, shape: list[int]) -> Tensor:
    numel = math.prod(shape)
    digits = base3_decode_byte(packed.reshape(-1)).reshape(-1)[:numel]
    return (digits - 1).to(torch.int8).reshape(shape)


@torch.library.register_fake("stepq::unpack_base3")
def _unpack_base3_fake(packed, shape):
    return packed.new_empty(shape, dtype=torch.int8)


def unpack_base3(packed: Tensor, shape: list[int] | tuple[int, ...]) -> Tensor:
    return torch.ops.stepq.unpack_base3(packed, list(shape))


TERNARY = torch.ops.stepq.ternary.default
UNPACK_BASE3 = torch.ops.stepq.unpack_base3.default
