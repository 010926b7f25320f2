"""The behaviour lock: reference-backend outputs of both shipped digits models for every preset.

``compute(name)`` compiles the digits model ``name`` with every registered preset (TDQ fits and QAT
shortened to a few steps, no wall-clock budget, so the result does not depend on the machine's load)
on a fixed calibration set, and returns each compiled model's outputs at fixed inputs. The outputs
were recorded before the compiler was reshaped (``scripts/record_behaviour.py`` writes
``tests/data/behaviour_<name>.safetensors``); ``tests/test_behaviour.py`` asserts that today's code
reproduces them bit for bit.

Bit-identical float results hold on one kind of CPU only: the same code gives other last bits on
another vendor's CPU (MKL / oneDNN take other kernels), which 4-bit rounding then amplifies. So a
recording is kept per platform (``platform_key()``: CPU vendor, torch's CPU capability, AMX), each
made from the same code (the tree before the reshape for AMD; for Intel + AMX, commit 1cfa81f, the
last tree whose AMD recording passed, re-run on that machine).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

import stepq
from stepq import zoo
from stepq.calibration import collect
from stepq.calibration.samplers import default_make_inputs
from stepq.data import load_digits_images

DATA = Path(__file__).parent / "data"
MODELS = ("digits-ddpm", "digits-dit")
#: the presets recorded before the reshape; presets added since are tested by their own method's tests
LOCKED_PRESETS = (
    "mixed-ptqd", "mixed-tdq-ptqd", "w4a4", "w4a4-ptqd", "w4a4-qat", "w4a4-steptable", "w4a4-tdq", "w4a4-tdq-ptqd",
    "w4a4-tdq-qat", "w4a8", "w4a8-ptqd", "w4a8-steptable", "w4a8-tdq", "w4a8-tdq-ptqd", "w8a4", "w8a4-steptable",
    "w8a4-tdq", "w8a8", "w8a8-steptable", "w8a8-tdq",
)


def platform_key() -> str:
    """``<CPU vendor>-<torch CPU capability>[-amx]``, e.g. ``AuthenticAMD-AVX512``, ``GenuineIntel-AVX512-amx``."""
    vendor, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id":
                    vendor = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    key = f"{vendor}-{torch.backends.cpu.get_cpu_capability()}"
    return key + ("-amx" if "amx_tile" in flags else "")


def path(name: str, platform: str | None = None) -> Path:
    return DATA / f"behaviour_{name}.{platform or platform_key()}.safetensors"


def recorded_platforms() -> list[str]:
    names = {p.name.removeprefix(f"behaviour_{MODELS[0]}.").removesuffix(".safetensors")
             for p in DATA.glob(f"behaviour_{MODELS[0]}.*.safetensors")}
    return sorted(names)


def _short(recipe: stepq.Recipe) -> stepq.Recipe:
    if recipe.tdq is not None:
        recipe = recipe.replace(tdq=recipe.tdq.replace(fit_steps=3, time_budget_s=None))
    if recipe.qat is not None:
        recipe = recipe.replace(qat=dataclasses.replace(recipe.qat, steps=2, batch_size=8))
    return recipe


def _train(model, entry, batch_size: int, seed: int):
    try:
        from stepq.methods.qat import denoising_batches
    except ImportError:  # the layout before the reshape (when the outputs were recorded)
        from stepq.methods.qat import denoising_batches  # type: ignore[no-redef]

    x0, y = load_digits_images("train")
    cond = {"class_labels": y} if entry.conditions is not None else None
    drop = ("class_labels", entry.null_class, 0.1) if cond else None
    return denoising_batches(x0, entry.scheduler, default_make_inputs(model), batch_size=batch_size, cond=cond,
                             cond_dropout=drop, seed=seed)


@torch.no_grad()
def _outputs(qm, probes) -> torch.Tensor:
    return torch.cat([qm(**p)[0] for p in probes])


def setup(name: str) -> tuple:
    """(model, zoo entry, calibration set, probe inputs) of the digits model ``name``."""
    torch.manual_seed(0)
    model = zoo.load(name)
    entry = zoo.entry(name)
    calib = collect(model, entry.make_scheduler("ddim"), num_samples=4, num_inference_steps=8, seed=1234, eta=0.0,
                    conditions=entry.conditions, uncond=entry.uncond, guidance_scale=entry.guidance_scale,
                    progress=False)
    probes = [calib[i] for i in (0, len(calib) // 2, len(calib) - 1)]
    return model, entry, calib, probes


def run_preset(ctx: tuple, preset: str) -> torch.Tensor:
    """The outputs at the probe inputs of the digits model compiled with ``preset`` (shortened)."""
    model, entry, calib, probes = ctx
    recipe = _short(stepq.get_preset(preset))
    if recipe.ptqd is not None and entry.conditions is not None:
        recipe = recipe.replace(ptqd=dataclasses.replace(recipe.ptqd, guidance_scale=entry.guidance_scale))
    train = _train(model, entry, recipe.qat.batch_size, recipe.qat.seed) if recipe.qat is not None else None
    torch.manual_seed(0)
    qm = stepq.quantize(model, calib[0], recipe, calibration=calib, train_data=train, progress=False)
    return _outputs(qm, probes)


def compute(name: str, presets: list[str] | None = None) -> dict[str, torch.Tensor]:
    ctx = setup(name)
    return {p: run_preset(ctx, p) for p in (presets if presets is not None else LOCKED_PRESETS)}
