"""Calibration data collected along real sampling trajectories.

``collect`` drives the floating-point model with a real diffusers scheduler (DDPM, DDIM,
flow-matching Euler, ...) from seeded Gaussian noise and records the exact keyword arguments the
denoiser receives at every step (with classifier-free guidance, the batched [cond; uncond] call).
The result is an iterable of input dicts that ``stepq.calibrate`` (and the methods that fit
per-timestep parameters) consume.

Under a torch.distributed process group the trajectory batches are dealt round-robin to the ranks
(batch b to rank b mod world size; the default batch size is num_samples / world size, rounded
up). Every rank draws the initial noise and conditions of every batch from the one seeded
generator, and batch b's sampler noise is seeded by b, so each rank's share is reproducible on its
own and the ranks' shares together are exactly the one-process ``collect`` with the same
``batch_size``.

``combine`` joins collections, e.g. the trajectories of several samplers (DDIM-20 and DDPM-100):
a fit on the joined calls sees every timestep either sampler visits (docs/TDQ.md, "Smooth in t").
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from stepq.calibration.samplers import MakeInputs, default_make_inputs, make_denoiser, sample
from stepq.compiler.distributed import rank, world_size
from stepq.compiler.errors import CalibrationError

__all__ = ["CalibrationData", "Sampling", "collect", "collect_samplings", "combine", "sampler_timesteps", "sampling_of"]


def _detach(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, Tensor) else v


@dataclass(frozen=True)
class Sampling:
    """How FP trajectories are drawn: what ``collect`` ran, and what EfficientDM's distillation runs
    again (the teacher's own trajectories). The fields are ``collect``'s arguments: ``scheduler``
    (a diffusers scheduler), ``num_inference_steps``, ``sample_shape`` (C, H, W), ``make_inputs``
    (``(x_t, t, cond) -> kwargs``; None: the diffusers convention), ``conditions`` (``(n, generator)
    -> dict``), ``uncond`` (``cond -> dict`` for classifier-free guidance), ``guidance_scale``,
    ``eta`` (DDIM's η) and ``channels`` (the prediction channels kept)."""

    scheduler: Any
    num_inference_steps: int
    sample_shape: tuple[int, ...]
    make_inputs: MakeInputs | None = None
    conditions: Callable[[int, torch.Generator], Mapping[str, Any]] | None = None
    uncond: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None
    guidance_scale: float = 1.0
    eta: float | None = None
    channels: int | None = None

    def __post_init__(self) -> None:
        if self.num_inference_steps <= 0:
            raise CalibrationError(f"Sampling.num_inference_steps must be positive, got {self.num_inference_steps}")
        if not hasattr(self.scheduler, "set_timesteps") or not hasattr(self.scheduler, "step"):
            raise CalibrationError(f"Sampling.scheduler must be a diffusers scheduler, got {type(self.scheduler).__name__}")
        object.__setattr__(self, "sample_shape", tuple(int(d) for d in self.sample_shape))


@dataclass
class CalibrationData:
    """Recorded denoiser inputs: one dict per model call, with the timestep of each call, and the
    ``Sampling`` that drew them (None for data recorded some other way)."""

    items: list[dict[str, Any]] = field(default_factory=list)
    timesteps: list[float] = field(default_factory=list)
    timestep_arg: str = "timestep"
    sampling: Sampling | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]

    def subset(self, n: int, *, seed: int = 0) -> CalibrationData:
        """``n`` items drawn without replacement, spread over the recorded timesteps."""
        if n >= len(self.items):
            return self
        idx = sorted(random.Random(seed).sample(range(len(self.items)), n))
        return CalibrationData([self.items[i] for i in idx], [self.timesteps[i] for i in idx], self.timestep_arg,
                               self.sampling)

    def at_timesteps(self, keep: Callable[[float], bool]) -> CalibrationData:
        idx = [i for i, t in enumerate(self.timesteps) if keep(t)]
        return CalibrationData([self.items[i] for i in idx], [self.timesteps[i] for i in idx], self.timestep_arg,
                               self.sampling)

    @property
    def num_samples(self) -> int:
        return sum(next(v.shape[0] for v in item.values() if isinstance(v, Tensor) and v.dim() > 0)
                   for item in self.items)


def _infer_shape(model: Any) -> tuple[int, ...]:
    cfg = getattr(model, "config", None)
    if cfg is not None:
        c = cfg.get("in_channels") if hasattr(cfg, "get") else getattr(cfg, "in_channels", None)
        s = cfg.get("sample_size") if hasattr(cfg, "get") else getattr(cfg, "sample_size", None)
        if c is not None and s is not None:
            h, w = (s, s) if isinstance(s, int) else tuple(s)
            return (int(c), int(h), int(w))
    raise CalibrationError("cannot infer the sample shape from the model; pass sample_shape=(C, H, W)")


def collect(
    model: Callable[..., Any],
    scheduler: Any,
    *,
    num_samples: int,
    num_inference_steps: int,
    make_inputs: MakeInputs | None = None,
    seed: int = 0,
    sample_shape: Sequence[int] | None = None,
    batch_size: int | None = None,
    conditions: Callable[[int, torch.Generator], Mapping[str, Any]] | None = None,
    uncond: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    guidance_scale: float = 1.0,
    eta: float | None = None,
    channels: int | None = None,
    progress: bool = True,
) -> CalibrationData:
    """Record the denoiser's inputs along ``num_samples`` FP trajectories of ``scheduler``.

    Args:
        model: the floating-point denoiser.
        scheduler: a diffusers scheduler (DDPMScheduler, DDIMScheduler, FlowMatchEulerDiscreteScheduler, ...);
            it is copied, never mutated.
        num_samples: trajectories to run. Every step of every trajectory is recorded.
        num_inference_steps: steps per trajectory.
        make_inputs: ``(x_t, t, cond) -> kwargs`` for the model; defaults to the diffusers convention.
        seed: seeds the initial noise, the conditions and the sampler's noise.
        sample_shape: (C, H, W) of one sample; read from ``model.config`` when not given.
        batch_size: trajectories run together (default: all of them; under a process group, this
            rank's share: ``ceil(num_samples / world_size)``). A rank with no batch records nothing.
        conditions: ``(n, generator) -> dict`` drawing the conditioning of n samples (class labels...).
        uncond: ``cond -> dict`` giving the unconditional inputs for classifier-free guidance.
        guidance_scale: CFG scale; with ``uncond`` and a scale != 1 the model is called on [cond; uncond].
        eta: DDIM's η (ignored by schedulers that do not take it).
        channels: keep the first ``channels`` of the prediction (learned-variance models); defaults to C.
    """
    if num_samples <= 0 or num_inference_steps <= 0:
        raise CalibrationError(f"num_samples and num_inference_steps must be positive, got {num_samples} and "
                               f"{num_inference_steps}")
    shape = tuple(sample_shape) if sample_shape is not None else _infer_shape(model)
    make = make_inputs or default_make_inputs(model)
    world, me = world_size(), rank()
    bs = batch_size or math.ceil(num_samples / world)
    data = CalibrationData(sampling=Sampling(scheduler, num_inference_steps, shape, make_inputs, conditions, uncond,
                                             guidance_scale, eta, channels))
    gen = torch.Generator().manual_seed(seed)
    n_batches = math.ceil(num_samples / bs)
    mine = len(range(me, n_batches, world))
    bar = tqdm(total=mine * num_inference_steps, desc="collect", disable=not progress, leave=False)

    def record(kw: dict[str, Any], out: Tensor) -> None:
        data.items.append({k: _detach(v) for k, v in kw.items()})
        bar.update(1)

    for b in range(n_batches):
        n = min(bs, num_samples - b * bs)
        noise = torch.randn((n, *shape), generator=gen)
        cond = dict(conditions(n, gen)) if conditions is not None else {}
        un = dict(uncond(cond)) if uncond is not None else None
        if b % world != me:  # another rank's batch: its noise and conditions were drawn, not sampled
            continue
        fn = make_denoiser(model, make_inputs=make, cond=cond, uncond=un, guidance_scale=guidance_scale,
                           channels=channels if channels is not None else shape[0], on_call=record)
        sample(fn, scheduler, noise, num_inference_steps, seed=seed * 1_000_003 + b, eta=eta,
               on_step=lambda i, t, x, p: data.timesteps.append(float(t)))
    bar.close()
    return data


def combine(*collections: CalibrationData) -> CalibrationData:
    """One ``CalibrationData`` holding the calls of ``collections`` in order (each collection's
    calls and timesteps as recorded), e.g. ``combine(collect(m, ddim, num_inference_steps=20, ...),
    collect(m, ddpm, num_inference_steps=100, ...))`` to calibrate and fit on the trajectories of
    both samplers. The first collection's ``sampling`` is kept (what EfficientDM's distillation
    reruns); every collection must name the same timestep input."""
    if not collections:
        raise CalibrationError("combine: no calibration data given")
    args = {c.timestep_arg for c in collections}
    if len(args) > 1:
        raise CalibrationError(f"combine: the collections name different timestep inputs: {sorted(args)}")
    out = CalibrationData(timestep_arg=collections[0].timestep_arg, sampling=collections[0].sampling)
    for c in collections:
        out.items.extend(c.items)
        out.timesteps.extend(c.timesteps)
    return out


def sampling_of(sampler: Sampling | Any, base: Sampling | None = None) -> Sampling:
    """``sampler`` as a ``Sampling``: a ``Sampling`` as it is, or a diffusers scheduler on which
    ``set_timesteps(n)`` was called (its ``num_inference_steps``), with everything else (sample
    shape, conditions, guidance, η, channels) taken from ``base`` (e.g. the calibration data's
    ``.sampling``). Give a ``Sampling`` to choose η or conditions per sampler."""
    if isinstance(sampler, Sampling):
        return sampler
    if not hasattr(sampler, "set_timesteps") or not hasattr(sampler, "step"):
        raise CalibrationError(f"a sampler must be a stepq.Sampling or a diffusers scheduler, got "
                               f"{type(sampler).__name__}")
    n = getattr(sampler, "num_inference_steps", None)
    if not isinstance(n, int) or n <= 0:
        raise CalibrationError(f"the scheduler {type(sampler).__name__} has no step count: call "
                               "set_timesteps(num_inference_steps) on it first, or pass stepq.Sampling(scheduler, "
                               "num_inference_steps, sample_shape, ...)")
    if base is None:
        raise CalibrationError(f"a bare scheduler ({type(sampler).__name__}) says nothing of the sample shape or "
                               "conditions: pass stepq.Sampling(scheduler, num_inference_steps, sample_shape, ...), or "
                               "calibration data recorded by stepq.calibration.collect (its .sampling fills them in)")
    return dataclasses.replace(base, scheduler=sampler, num_inference_steps=n)


def sampler_timesteps(sampling: Sampling) -> list[float]:
    """The timesteps ``sampling`` visits (its scheduler's, after ``set_timesteps``), in order."""
    sched = copy.deepcopy(sampling.scheduler)
    sched.set_timesteps(sampling.num_inference_steps)
    return [float(t) for t in sched.timesteps]


def collect_samplings(model: Callable[..., Any], samplings: Sequence[Sampling], *, num_samples: int, seed: int = 0,
                      progress: bool = True) -> CalibrationData:
    """``collect`` along ``num_samples`` FP trajectories of each ``Sampling`` (sampler j seeded with
    ``seed + j``), the records of all of them in one ``CalibrationData`` (its ``.sampling`` the
    single sampling, or None for several)."""
    if not samplings:
        raise CalibrationError("collect_samplings needs at least one sampling")
    out = CalibrationData(sampling=samplings[0] if len(samplings) == 1 else None)
    for j, s in enumerate(samplings):
        d = collect(model, s.scheduler, num_samples=num_samples, num_inference_steps=s.num_inference_steps,
                    make_inputs=s.make_inputs, seed=seed + j, sample_shape=s.sample_shape, conditions=s.conditions,
                    uncond=s.uncond, guidance_scale=s.guidance_scale, eta=s.eta, channels=s.channels,
                    progress=progress)
        out.items += d.items
        out.timesteps += d.timesteps
        out.timestep_arg = d.timestep_arg
    return out
