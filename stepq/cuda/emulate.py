"""The CUDA kernels' arithmetic on the CPU, step for step (torch / numpy), so they can be checked
without a GPU.

Each function takes the kernel's operands in the kernel's layout and computes what the kernel
computes, in the same order where the order changes the rounding:

* integer accumulation (``w8a8_*``) is exact, so any order gives the kernel's int32;
* every fp32 operation a kernel writes with an ``_rn`` intrinsic is one IEEE-rounded torch / numpy
  float32 operation here (neither contracts ``a*b + c`` into an FMA), in the kernel's order: the
  weight-only GEMV's lanes, chunks and butterfly included;
* fp16 results are rounded to nearest even, as PTX ``cvt.rn.f16.f32``.

What is not mirrored is cuBLAS's order inside the large-M weight-only path (``gemm_weight_only``:
dequantise, then cuBLAS): it is computed here in fp32 and compared with a bound (docs/CUDA.md).
``linear_*`` / ``conv2d_w8a8`` are the launchers' CPU twins: the same steps ``stepq.cuda.runtime``
launches on a device, so the backend's ops run on the CPU with this module.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CHUNK",
    "FORMATS",
    "GEMV_MAX_ROWS",
    "K_ALIGN",
    "N_ALIGN",
    "conv2d_w8a8",
    "decode",
    "dequantize_weight",
    "gemm_weight_only",
    "im2col",
    "linear_w8a8",
    "linear_weight_only",
    "pad_to",
    "quantize_act",
    "w8a8_gemm",
    "weight_only_gemv",
]

#: quantize_act pads activation rows (and the W8A8 weight rows) to a multiple of this many bytes
K_ALIGN = 16
#: the W8A8 weight's rows are padded to a multiple of this (torch._int_mm wants N % 8 == 0)
N_ALIGN = 8
#: consecutive k a lane of the weight-only GEMV adds in order
CHUNK = 8
#: up to this many activation rows the GEMV kernels run; beyond, the GEMM path
GEMV_MAX_ROWS = 16
#: the packed formats of weight_only.cu: name → (bits per code, signed)
FORMATS = {"s8": (8, True), "u8": (8, False), "s4": (4, True), "u4": (4, False), "s2": (2, True),
           "u2": (2, False), "base3": (3, True)}


def pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _row(index: Tensor | None) -> int:
    return int(index.reshape(-1)[0]) if index is not None else 0


# -- quantize_act.cu -----------------------------------------------------------------------------------
def quantize_act(x: Tensor, scale: Tensor, zero_point: Tensor, index: Tensor | None, qmin: int, qmax: int,
                 shift: int, kp: int) -> Tensor:
    """x [rows, K] → int8 [rows, kp]: clamp(rint(x / s[t]) + rint(z[t]), qmin, qmax) − shift, zero padded."""
    t = _row(index)
    s = scale.reshape(-1)[t].float()
    z = torch.round(zero_point.reshape(-1)[t].float())
    f = torch.clamp(torch.round(x.float() / s) + z, qmin, qmax)
    q = (f.to(torch.int32) - shift).to(torch.int8)
    return F.pad(q, (0, kp - x.shape[-1]))


# -- w8a8.cu ---------------------------------------------------------------------------------------------
def w8a8_gemm(a: Tensor, b: Tensor, n: int) -> Tensor:
    """The int32 product Σ_k A[m, k]·B[n, k] (exact; int64 here, the kernel's int32 never overflows for
    K ≤ the partition's limit)."""
    return a.to(torch.int64) @ b[:n].to(torch.int64).T


def w8a8_epilogue(acc: Tensor, rowsum: Tensor, w_scale: Tensor, bias: Tensor | None, a_scale: Tensor,
                  a_zero_point: Tensor, index: Tensor | None, shift: int, out_dtype: torch.dtype) -> Tensor:
    """y = float(acc + (shift − rint(z[t]))·rowsum) · (s_x[t]·s_w) (+ bias), each fp32 op rounded once."""
    t = _row(index)
    zc = shift - int(torch.round(a_zero_point.reshape(-1)[t].float()))
    accz = (acc + zc * rowsum.to(torch.int64)).to(torch.int32)
    sxw = a_scale.reshape(-1)[t].float() * w_scale.float()
    v = accz.to(torch.float32) * sxw
    if bias is not None:
        v = v + bias.float()
    return v.to(out_dtype)


# -- im2col.cu -------------------------------------------------------------------------------------------
def im2col(xq: Tensor, kh: int, kw: int, stride: tuple[int, int], padding: tuple[int, int],
           dilation: tuple[int, int], kp: int, zero_point: Tensor, index: Tensor | None, shift: int) -> Tensor:
    """int8 [B, C, H, W] → [B·OH·OW, kp]: rows (b, oh, ow), columns (c, i, j), taps outside the image
    = rint(z[t]) − shift."""
    zq = int(torch.round(zero_point.reshape(-1)[_row(index)].float())) - shift
    x = F.pad(xq.float(), (padding[1], padding[1], padding[0], padding[0]), value=float(zq))
    cols = F.unfold(x, (kh, kw), dilation=dilation, stride=stride)  # [B, K, L], K in (c, i, j) order
    cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return F.pad(cols.to(torch.int8), (0, kp - cols.shape[1]))


# -- weight_only.cu --------------------------------------------------------------------------------------
def decode(packed: Tensor, fmt: str, n: int, k: int) -> np.ndarray:
    """code_at() for every element i = row·K + col of the flat stream: int32 [n, k]."""
    bits, signed = FORMATS[fmt]
    p = packed.reshape(-1).numpy().astype(np.int32)
    i = np.arange(n * k, dtype=np.int64)
    if bits == 8:
        c = p[i]
        c = np.where(c >= 128, c - 256, c) if signed else c
    elif bits in (4, 2):
        per = 8 // bits
        c = (p[i // per] >> ((i % per) * bits)) & ((1 << bits) - 1)
        if signed:
            c = c - ((c & (1 << (bits - 1))) << 1)
    else:  # base-3: d = (((s·3^n) & 255)·3) >> 8
        pow3 = np.array([1, 3, 9, 27, 81], dtype=np.int32)
        c = ((((p[i // 5] * pow3[i % 5]) & 255) * 3) >> 8) - 1
    return c.astype(np.int32).reshape(n, k)


def _qparam_index(n: int, k: int, sn: int, gs: int) -> np.ndarray:
    rows = np.arange(n, dtype=np.int64)[:, None] * sn
    cols = np.arange(k, dtype=np.int64)[None, :] // gs if gs else np.zeros((1, k), dtype=np.int64)
    return rows + cols


def dequantize_weight(packed: Tensor, scale: Tensor, zero_point: Tensor, fmt: str, n: int, k: int, sn: int,
                      gs: int, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """w[n, k] = (code − rint(z[g]))·s[g], g = n·sn + k // gs (0 when gs = 0), fp32, then ``out_dtype``."""
    g = _qparam_index(n, k, sn, gs)
    s = scale.reshape(-1).float().numpy()[g]
    z = np.rint(zero_point.reshape(-1).float().numpy())[g].astype(np.float32)
    w = (decode(packed, fmt, n, k).astype(np.float32) - z) * s
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(out_dtype)


def weight_only_gemv(x: Tensor, w: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """The GEMV kernel's sum for x [M, K] (values as loaded: fp16 → fp32 exactly) and the dequantised
    w [N, K] (fp32): lane l adds the chunks l, l+32, … of CHUNK consecutive k in order, then the
    butterfly over the 32 lanes, then the bias."""
    xs = x.float().numpy()
    ws = w.float().numpy()
    m, k = xs.shape
    n = ws.shape[0]
    acc = np.zeros((m, n, 32), dtype=np.float32)
    lanes = np.arange(32)
    for it in range(math.ceil(k / (32 * CHUNK))):
        for j in range(CHUNK):
            kk = (it * 32 + lanes) * CHUNK + j
            valid = kk < k
            kc = np.where(valid, kk, 0)
            prod = xs[:, kc][:, None, :] * ws[:, kc][None, :, :]
            acc = np.where(valid, acc + prod, acc)
    for off in (16, 8, 4, 2, 1):
        acc = acc + acc[..., lanes ^ off]
    y = acc[..., 0]
    if bias is not None:
        y = y + bias.float().numpy()
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)).to(out_dtype)


def gemm_weight_only(x: Tensor, w: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """The large-M path: the weight dequantised in the activation's type (as dequantize_weight_* writes
    it), then a float GEMM (cuBLAS on a device; fp32 here, so the two agree within a bound)."""
    w = w.to(x.dtype).float()
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# -- the launchers' CPU twins ----------------------------------------------------------------------------
def linear_w8a8(x: Tensor, w: Tensor, rowsum: Tensor, w_scale: Tensor, bias: Tensor | None, a_scale: Tensor,
                a_zero_point: Tensor, index: Tensor | None, qmin: int, qmax: int, shift: int) -> Tensor:
    """y[..., N] for x[..., K]: quantize_act, then the int8 GEMM and its epilogue."""
    k, n = x.shape[-1], w_scale.numel()
    rows = x.reshape(-1, k)
    a = quantize_act(rows, a_scale, a_zero_point, index, qmin, qmax, shift, w.shape[1])
    y = w8a8_epilogue(w8a8_gemm(a, w, n), rowsum, w_scale, bias, a_scale, a_zero_point, index, shift, x.dtype)
    return y.reshape(*x.shape[:-1], n)


def conv2d_w8a8(x: Tensor, w: Tensor, rowsum: Tensor, w_scale: Tensor, bias: Tensor | None, a_scale: Tensor,
                a_zero_point: Tensor, index: Tensor | None, qmin: int, qmax: int, shift: int, kh: int, kw: int,
                stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """y [B, O, OH, OW]: quantize_act over the whole input, im2col, the W8A8 GEMM, NCHW."""
    b, _, h, wd = x.shape
    n = w_scale.numel()
    xq = quantize_act(x.reshape(1, -1), a_scale, a_zero_point, index, qmin, qmax, shift, x.numel()).reshape(x.shape)
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = im2col(xq, kh, kw, stride, padding, dilation, w.shape[1], a_zero_point, index, shift)
    y = w8a8_epilogue(w8a8_gemm(cols, w, n), rowsum, w_scale, bias, a_scale, a_zero_point, index, shift, x.dtype)
    return y.reshape(b, oh, ow, n).permute(0, 3, 1, 2).contiguous()


def linear_weight_only(x: Tensor, packed: Tensor, scale: Tensor, zero_point: Tensor, bias: Tensor | None,
                       fmt: str, n: int, k: int, sn: int, gs: int) -> Tensor:
    """y[..., N]: the GEMV for at most GEMV_MAX_ROWS rows, else dequantise + GEMM."""
    rows = x.reshape(-1, k)
    w = dequantize_weight(packed, scale, zero_point, fmt, n, k, sn, gs)
    if rows.shape[0] <= GEMV_MAX_ROWS:
        y = weight_only_gemv(rows, w, bias, x.dtype)
    else:
        y = gemm_weight_only(rows, w, bias, x.dtype)
    return y.reshape(*x.shape[:-1], n)
