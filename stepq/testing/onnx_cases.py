"""The models the ONNX backend is checked on, shared by its tests and benchmarks.

``CASES``: the six tiny diffusers families (``stepq.testing.families``) and the trained digits
models of the zoo (``digits-ddpm``, ``digits-dit``) when their checkpoints are present.
``quantized_case(name, recipe)`` quantizes one with calibration data recorded along real sampler
trajectories; ``recipe="w8a8-tdq"`` uses the TDQ preset, and ``recipe="w8a8+tables"`` attaches
synthetic per-timestep tables (the graph form TDQ produces, with scales that vary by ±25 % around
the static ones), which exercises the Gather path without fitting anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CASES", "Case", "attach_synthetic_tables", "available_cases", "get_case", "quantized_case", "rel_l2"]

FAMILY_NAMES = ("unet", "unet_cond", "dit", "pixart", "sd3", "flux")
ZOO_NAMES = ("digits-ddpm", "digits-dit")
CASES = FAMILY_NAMES + ZOO_NAMES


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


@dataclass
class Case:
    name: str
    model: torch.nn.Module
    inputs: Callable[[int, float, int], dict[str, Any]]  # (batch, t, seed) -> kwargs
    calibration: Callable[[int, int], list[dict[str, Any]]]  # (num_samples, steps) -> denoiser inputs
    timestep_scale: float = 1.0


def available_cases() -> tuple[str, ...]:
    from stepq import zoo

    return FAMILY_NAMES + tuple(n for n in ZOO_NAMES if all(p.exists() for p in zoo.checkpoint_paths(n)))


def _family_case(name: str) -> Case:
    from stepq.calibration import collect
    from stepq.testing.families import FAMILIES

    f = FAMILIES[name]
    m = f.model()

    def calib(n: int, steps: int) -> list[dict[str, Any]]:
        data = collect(m, f.scheduler(), num_samples=n, num_inference_steps=steps,
                       make_inputs=f.make_inputs,  # type: ignore[arg-type]
                       conditions=f.conditions, sample_shape=f.sample_shape, channels=f.channels, progress=False)
        return list(data)

    def inputs(batch: int, t: float, seed: int) -> dict[str, Any]:
        return f.example_inputs(batch, t, seed=seed)  # the family maps t in [0, 1000] to its own scale

    return Case(name, m, inputs, calib, f.timestep_scale)


def _zoo_case(name: str) -> Case:
    from stepq import zoo
    from stepq.calibration import collect

    m = zoo.load(name)
    spec = zoo.entry(name)

    def calib(n: int, steps: int) -> list[dict[str, Any]]:
        data = collect(m, spec.scheduler, num_samples=n, num_inference_steps=steps, sample_shape=spec.sample_shape,
                       conditions=spec.conditions, uncond=spec.uncond, guidance_scale=spec.guidance_scale,
                       channels=spec.sample_shape[0], progress=False)
        return list(data)

    def inputs(batch: int, t: float, seed: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((batch, *spec.sample_shape), generator=g)
        kw: dict[str, Any] = {"sample" if name == "digits-ddpm" else "hidden_states": x,
                              "timestep": torch.full((batch,), int(t), dtype=torch.int64), "return_dict": False}
        if spec.conditions is not None:
            kw.update(spec.conditions(batch, g))
        return kw

    return Case(name, m, inputs, calib)


def get_case(name: str) -> Case:
    if name in FAMILY_NAMES:
        return _family_case(name)
    if name in ZOO_NAMES:
        return _zoo_case(name)
    raise KeyError(f"unknown case {name!r}; cases: {', '.join(CASES)}")


def attach_synthetic_tables(prog: Any, *, seed: int = 0, spread: float = 0.25) -> int:
    """Per-timestep tables for every activation quantizer of a calibrated program: the static scale
    times a smooth factor in [1 − spread, 1 + spread] over t, the static zero point ± a few levels."""
    from stepq.compiler import meta
    from stepq.compiler.state import TimestepTable

    g = torch.Generator().manual_seed(seed)
    T = prog.recipe.num_train_timesteps
    t = torch.arange(T, dtype=torch.float32) / T
    tables = {}
    for node in prog.gm.graph.nodes:
        if node.meta.get(meta.QUANTIZER_ROLE) != "activation" or node.target is not torch.ops.stepq.fake_quant.default:
            continue
        s = prog.gm.get_buffer(str(node.args[1].target)).float().reshape(())
        z = prog.gm.get_buffer(str(node.args[2].target)).float().reshape(())
        phase, freq = float(torch.rand((), generator=g)) * 6.28, 1 + float(torch.rand((), generator=g)) * 3
        factor = 1 + spread * torch.sin(freq * 6.28 * t + phase)
        qmin, qmax = node.args[3], node.args[4]
        zt = torch.clamp(z + torch.round(2 * torch.cos(freq * 6.28 * t + phase)), qmin, qmax)
        tables[node.meta[meta.ACT_QUANTIZER]] = TimestepTable(s * factor, zt)
    prog.state.timestep_tables = tables
    return len(tables)


def quantized_case(case: Case, recipe: str, calibration: list[dict[str, Any]]) -> Any:
    """A QuantizedModel of ``case``: a preset, or ``"<preset>+tables"`` for synthetic timestep tables."""
    import stepq

    base, _, extra = recipe.partition("+")
    prog = stepq.capture(case.model, calibration[0], timestep_scale=case.timestep_scale)
    prog = stepq.prepare(prog, base, inplace=True)
    stepq.calibrate(prog, calibration, progress=False)
    if extra == "tables":
        attach_synthetic_tables(prog)
    elif extra:
        raise ValueError(f"unknown recipe suffix {extra!r}")
    return stepq.convert(prog, inplace=True)
