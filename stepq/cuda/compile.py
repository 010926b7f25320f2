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

import io
import re
from dataclasses import dataclass

from stepq.compiler.errors import KernelCompileError, KernelError
from stepq.cuda import KERNELS, source

__all__ = ["KernelResources", "compile_all", "compile_cubin", "compile_source", "nvrtc_version", "resources"]

_ARCH = re.compile(r"^sm_\d{2,3}[a-z]?$")


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library cuda-core finds."""
    from cuda.bindings import nvrtc

    _, major, minor = nvrtc.nvrtcVersion()
    return int(major), int(minor)


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reports for one entry point."""

    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int


def compile_source(text: str, arch: str, name: str = "kernel.cu", *, log: io.StringIO | None = None) -> bytes:
    """A cubin for ``arch`` (``sm_80``, ``sm_90``, ...) from CUDA C++ ``text``."""
    if not _ARCH.match(arch):
        raise ValueError(f"arch {arch!r} is not a real architecture such as 'sm_80' (a cubin needs one)")
    try:
        from cuda.core import Program, ProgramOptions
    except ImportError as e:  # pragma: no cover - the dev extra installs it
        raise KernelError("compiling the CUDA kernels needs cuda-core and the nvidia-cuda-nvrtc wheel "
                          "(pip install 'stepq[cuda-compile]')") from e
    try:
        options = ProgramOptions(arch=arch, name=name, ptxas_options="-v" if log is not None else None)
        obj = Program(text, "c++", options).compile("cubin", logs=log)
    except Exception as e:  # cuda-core's NVRTCError: its message carries the compilation log
        if type(e).__name__ != "NVRTCError":
            raise
        nvrtc_log = str(e).replace("\x00", "").split("compilation log:", 1)[-1].strip()
        raise KernelCompileError(name, arch, nvrtc_log) from e
    code = obj.code
    return bytes(code) if not isinstance(code, bytes) else code


def compile_cubin(name: str, arch: str) -> bytes:
    """The cubin of kernel file ``name`` (a key of ``stepq.cuda.KERNELS``) for ``arch``."""
    return compile_source(source(name), arch, name)


def compile_all(arch: str) -> dict[str, bytes]:
    """Every kernel file's cubin for ``arch``."""
    return {name: compile_cubin(name, arch) for name in KERNELS}


_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def resources(name: str, arch: str) -> dict[str, KernelResources]:
    """ptxas's report (``-v``) for every entry point of kernel file ``name``: registers, stack, spills."""
    log = io.StringIO()
    compile_source(source(name), arch, name, log=log)
    out: dict[str, KernelResources] = {}
    entry, frame = None, None
    for line in log.getvalue().splitlines():
        if m := _ENTRY.search(line):
            entry, frame = m.group(1), None
        elif (m := _FRAME.search(line)) and entry:
            frame = tuple(int(g) for g in m.groups())
        elif (m := _REGS.search(line)) and entry and frame is not None:
            out[entry] = KernelResources(int(m.group(1)), *frame)
            entry = None
    return out
