"""stepq's CUDA kernels: the ``.cu`` sources, their NVRTC build, a CPU emulation of each, the launchers.

    stepq.cuda.KERNELS                  # source file → the entry points it defines
    stepq.cuda.source("w8a8.cu")        # common.cuh + the file, as NVRTC compiles it
    stepq.cuda.compile.compile_cubin("w8a8.cu", "sm_90")   # no GPU needed (cuda-core + NVRTC wheel)
    stepq.cuda.emulate                  # the kernels' arithmetic on the CPU, bit for bit (numpy / torch)
    stepq.cuda.runtime                  # cupy.RawModule loader and launchers (needs a CUDA device)

The kernels (docs/CUDA.md has the formats and what each supports):

* ``quantize_act.cu``  activation → int8, scale / zero point read on the device from a timestep table;
* ``w8a8.cu``          int8 × int8 → int32 (dp4a, small M) and the fused scale / bias / fp16 epilogue
  (also over cuBLASLt's int8 tensor-core product for large M);
* ``im2col.cu``        int8 im2col, so Conv2d runs as the W8A8 GEMM;
* ``weight_only.cu``   8 / 4 / 2-bit and base-3 ternary weights × fp16 / fp32 activations (GEMV for
  small M; a dequantisation kernel feeding cuBLAS beyond).

This package imports neither cupy nor cuda-core at import time.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["ARCHS", "KERNELS", "source"]

#: the architectures the sources are compiled for in the test suite (A100, H100/H200)
ARCHS = ("sm_80", "sm_90")

_FORMATS = ("s8", "u8", "s4", "u4", "s2", "u2", "base3")
_TYPES = ("f32", "f16")

#: every kernel source and the ``extern "C"`` entry points it defines
KERNELS: dict[str, tuple[str, ...]] = {
    "quantize_act.cu": tuple(f"quantize_act_{t}" for t in _TYPES),
    "w8a8.cu": tuple(f"{k}_{t}" for k in ("w8a8_gemv_dp4a", "w8a8_epilogue") for t in _TYPES),
    "im2col.cu": ("im2col_s8",),
    "weight_only.cu": tuple(f"{k}_{f}_{t}" for k in ("weight_only_gemv", "dequantize_weight")
                            for f in _FORMATS for t in _TYPES),
}


def _read(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text()


def source(name: str) -> str:
    """The text NVRTC compiles for kernel file ``name``: ``common.cuh`` followed by the file."""
    if name not in KERNELS:
        raise KeyError(f"no kernel source {name!r}; the sources are {', '.join(KERNELS)}")
    return f"{_read('common.cuh')}\n#line 1 \"{name}\"\n{_read(name)}"
