"""The compiler's behaviour is locked: every preset on both shipped digits models reproduces, bit for
bit, the reference-backend outputs recorded before the compiler was reshaped (tests/behaviour.py,
scripts/record_behaviour.py). A change that moves a number must say so and re-record."""

from __future__ import annotations

import functools

import behaviour
import pytest
import torch
from safetensors.torch import load_file

import stepq

CASES = [(m, p) for m in behaviour.MODELS for p in behaviour.LOCKED_PRESETS]


@functools.cache
def _ctx(name: str):
    return behaviour.setup(name)


@functools.cache
def _recorded(name: str, platform: str | None = None) -> dict[str, torch.Tensor]:
    p = behaviour.path(name, platform)
    if not p.exists():
        pytest.skip(f"no behaviour recording for this platform ({behaviour.platform_key()}; recorded: "
                    f"{behaviour.recorded_platforms()}): bit-identical floats hold on one kind of CPU only; "
                    "record with scripts/record_behaviour.py on a known-good tree")
    return load_file(p)


def test_every_preset_was_recorded():
    platforms = behaviour.recorded_platforms()
    assert "AuthenticAMD-AVX512" in platforms
    for platform in platforms:
        for name in behaviour.MODELS:
            assert sorted(_recorded(name, platform)) == sorted(behaviour.LOCKED_PRESETS), (name, platform)
    assert set(behaviour.LOCKED_PRESETS) <= set(stepq.preset_names())  # none of them was removed or renamed


@pytest.mark.slow
@pytest.mark.parametrize(("name", "preset"), CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_outputs_are_bit_identical_to_the_recording(name, preset):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the recording's reduction order
    try:
        out = behaviour.run_preset(_ctx(name), preset)
    finally:
        torch.set_num_threads(threads)
    ref = _recorded(name)[preset]
    assert out.shape == ref.shape
    diff = (out.double() - ref.double()).abs().max().item()
    assert torch.equal(out, ref), f"{name} {preset}: max |Δ| = {diff:.3g}"
