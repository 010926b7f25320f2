"""Compile stepq's kernels to cubins with NVRTC, on a machine with or without a GPU.

    cubin = compile_cubin("weight_only.cu", "sm_90")     # bytes of an ELF cubin

cuda-core's ``Program`` over the ``nvidia-cuda-nvrtc`` wheel (the ``dev`` / ``cuda-compile`` extras)
compiles straight to SASS for a named architecture: that step never loads the CUDA driver, so it
runs on CPU-only CI. Asking NVRTC for PTX, or leaving the architecture unset, loads the driver and
fails there; so does CuPy's public ``compile_using_nvrtc`` (it queries the device). The sources
include no header (``common.cuh``), so any NVRTC version builds them without a CUDA toolkit.

A compile error raises ``KernelCompileError`` with NVRTC's log.
"""

from __future__ import annotations

import re

from stepq.compiler.errors import KernelCompileError, KernelError
from stepq.cuda import KERNELS, source

__all__ = ["compile_all", "compile_cubin", "compile_source", "nvrtc_version"]

_ARCH = re.compile(r"^sm_\d{2,3}[a-z]?$")


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library cuda-core finds."""
    from cuda.bindings import nvrtc

    _, major, minor = nvrtc.nvrtcVersion()
    return int(major), int(minor)


def compile_source(text: str, arch: str, name: str = "kernel.cu") -> bytes:
    """A cubin for ``arch`` (``sm_80``, ``sm_90``, ...) from CUDA C++ ``text``."""
    if not _ARCH.match(arch):
        raise ValueError(f"arch {arch!r} is not a real architecture such as 'sm_80' (a cubin needs one)")
    try:
        from cuda.core import Program, ProgramOptions
    except ImportError as e:  # pragma: no cover - the dev extra installs it
        raise KernelError("compiling the CUDA kernels needs cuda-core and the nvidia-cuda-nvrtc wheel "
                          "(pip install 'stepq[cuda-compile]')") from e
    try:
        obj = Program(text, "c++", ProgramOptions(arch=arch, name=name)).compile("cubin")
    except Exception as e:  # cuda-core's NVRTCError: its message carries the compilation log
        if type(e).__name__ != "NVRTCError":
            raise
        log = str(e).replace("\x00", "").split("compilation log:", 1)[-1].strip()
        raise KernelCompileError(name, arch, log) from e
    code = obj.code
    return bytes(code) if not isinstance(code, bytes) else code


def compile_cubin(name: str, arch: str) -> bytes:
    """The cubin of kernel file ``name`` (a key of ``stepq.cuda.KERNELS``) for ``arch``."""
    return compile_source(source(name), arch, name)


def compile_all(arch: str) -> dict[str, bytes]:
    """Every kernel file's cubin for ``arch``."""
    return {name: compile_cubin(name, arch) for name in KERNELS}
