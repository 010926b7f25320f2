"""Every CUDA kernel compiles to a cubin for sm_80 and sm_90 with NVRTC, with no GPU and no toolkit.

Not skipped when cuda-core is missing: the dev extra installs it, so a missing build tool fails.

cuda-core's Program over the nvidia-cuda-nvrtc wheel (the dev extra). A compile error fails here
with NVRTC's log (``KernelCompileError``).
"""

from __future__ import annotations

import pytest

from stepq.compiler.errors import KernelCompileError
from stepq.cuda import ARCHS, KERNELS, source
from stepq.cuda import compile as compile_mod


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_compiles_to_a_cubin_with_every_entry_point(name, arch):
    cubin = compile_mod.compile_cubin(name, arch)
    assert cubin[:4] == b"\x7fELF"  # SASS for the architecture, not PTX
    missing = [k for k in KERNELS[name] if k.encode() not in cubin]
    assert not missing, f"{name} for {arch} lacks the entry points {missing}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["w8a8.cu", "weight_only.cu"])
def test_gemv_accumulators_stay_in_registers(name, arch):
    # the per-row accumulators are register arrays indexed in unrolled loops: a stack frame or a
    # spill would mean local memory in the inner loop
    res = compile_mod.resources(name, arch)
    assert set(res) == set(KERNELS[name])
    for entry, r in res.items():
        assert (r.stack_bytes, r.spill_store_bytes, r.spill_load_bytes) == (0, 0, 0), (entry, r)
        assert r.registers <= 64, (entry, r)  # ≤ 64: four 256-thread blocks per SM (half occupancy) at least


def test_sources_include_no_header():
    # the kernels build with any NVRTC, bundled headers or not, and with no CUDA toolkit on the machine
    assert all("#include" not in source(n) for n in KERNELS)


def test_a_compile_error_carries_nvrtcs_log():
    with pytest.raises(KernelCompileError) as e:
        compile_mod.compile_source('extern "C" __global__ void k(int* a) { a[0] = not_declared; }', "sm_80", "bad.cu")
    assert e.value.arch == "sm_80" and "bad.cu" in str(e.value)
    assert 'identifier "not_declared" is undefined' in e.value.log


def test_an_architecture_is_required():
    with pytest.raises(ValueError, match="real architecture"):
        compile_mod.compile_source("", "compute_80")


def test_unknown_source_is_named():
    with pytest.raises(KeyError, match="no kernel source 'nope.cu'"):
        source("nope.cu")
