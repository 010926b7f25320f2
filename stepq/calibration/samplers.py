"""Sampling loops over real diffusers schedulers, shared by calibration, training and benchmarks.

A *denoiser function* maps ``(x_t, t) -> model_output`` in the scheduler's prediction space (ε for
DDPM/DDIM, velocity for flow matching). ``make_denoiser`` builds one from a model (the FP model, a
QuantizedModel or an ONNX runner): it builds the model's keyword arguments, applies classifier-free
guidance when asked (one batched call on [cond; uncond]), and drops learned-variance channels.

``sample`` runs the scheduler loop. The scheduler passed in is never mutated: a fresh copy is
made from its config. Stochastic samplers draw their noise from a seeded generator, so the same
seed gives the same trajectory for the FP and the quantized model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["DenoiseFn", "default_make_inputs", "fresh_scheduler", "make_denoiser", "model_output",
           "sample"]

DenoiseFn = Callable[[Tensor, Tensor], Tensor]
MakeInputs = Callable[[Tensor, Tensor, Mapping[str, Any]], dict[str, Any]]


def fresh_scheduler(scheduler: Any) -> Any:
    """A new scheduler of the same class and config (schedulers keep per-run state). A wrapper that
    carries more than a config (``PTQDScheduler``) makes its own copy with ``fresh()``."""
    if callable(getattr(type(scheduler), "fresh", None)):
        return scheduler.fresh()
    return type(scheduler).from_config(scheduler.config)


def model_output(out: Any) -> Tensor:
    """The first tensor of a model's output (tuple, diffusers output dataclass or tensor)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, Mapping):
        return next(iter(out.values()))
    raise TypeError(f"cannot find the prediction in a model output of type {type(out).__name__}")


def default_make_inputs(model: Any) -> MakeInputs:
    """Keyword arguments for a diffusers-style denoiser: the sample under its parameter name
    (``sample`` for UNets, ``hidden_states`` for transformers), ``timestep`` expanded to the batch,
    the conditioning dict, and ``return_dict=False`` when the model takes it."""
    params: Mapping[str, Any]
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        params = {}
    if hasattr(model, "signature") and hasattr(model.signature, "params"):
        names = [n for n, _ in model.signature.params]
    else:
        names = list(params)
    sample_name = next((n for n in ("sample", "hidden_states", "x") if n in names), names[0] if names else "sample")
    t_name = next((n for n in ("timestep", "timesteps", "t") if n in names), "timestep")
    return_dict = "return_dict" in names

    def make(x: Tensor, t: Tensor, cond: Mapping[str, Any]) -> dict[str, Any]:
        t = torch.as_tensor(t)
        kw = {sample_name: x, t_name: t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t, **cond}
        if return_dict:
            kw["return_dict"] = False
        return kw

    return make


def _cat_cond(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in a.items():
        out[k] = torch.cat([v, b[k]]) if isinstance(v, Tensor) else v
    return out


def make_denoiser(
    model: Callable[..., Any],
    *,
    make_inputs: MakeInputs | None = None,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    channels: int | None = None,
    on_call: Callable[[dict[str, Any], Tensor], None] | None = None,
) -> DenoiseFn:
    """A ``(x_t, t) -> prediction`` function around ``model``.

    With ``guidance_scale != 1`` and ``uncond`` given, the model runs once on the batch
    [cond; uncond] and the prediction is ``uncond + s·(cond − uncond)``. ``channels`` keeps the first
    channels of the output (DiT predicts ε and a variance). ``on_call(inputs, output)`` sees every
    model call (the calibration recorder uses it).
    """
    make = make_inputs or default_make_inputs(model)
    cond = dict(cond or {})
    guided = guidance_scale != 1.0 and uncond is not None

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        if guided and uncond is not None:
            t2 = torch.as_tensor(t)
            t2 = torch.cat([t2.reshape(-1), t2.reshape(-1)]) if t2.numel() > 1 else t2  # one timestep per sample
            kw = make(torch.cat([x, x]), t2, _cat_cond(cond, uncond))
        else:
            kw = make(x, t, cond)
        out = model_output(model(**kw))
        if on_call is not None:
            on_call(kw, out)
        if channels is not None and out.shape[1] != channels:
            out = out[:, :channels]
        if guided:
            c, u = out.chunk(2)
            out = u + guidance_scale * (c - u)
        return out

    return denoise


def _step_kwargs(scheduler: Any, generator: torch.Generator, eta: float | None) -> dict[str, Any]:
    params = inspect.signature(scheduler.step).parameters
    kw: dict[str, Any] = {}
    if "generator" in params:
        kw["generator"] = generator
    if eta is not None and "eta" in params:
        kw["eta"] = eta
    if "return_dict" in params:
        kw["return_dict"] = True
    return kw


@torch.no_grad()
def sample(
    denoise: DenoiseFn,
    scheduler: Any,
    noise: Tensor,
    num_inference_steps: int,
    *,
    seed: int = 0,
    eta: float | None = None,
    progress: bool = False,
    on_step: Callable[[int, Tensor, Tensor, Tensor], None] | None = None,
    scheduler_hook: Callable[[Any], Any] | None = None,
) -> Tensor:
    """Run ``scheduler`` from ``noise`` for ``num_inference_steps`` steps; returns x_0.

    ``on_step(i, t, x_t, prediction)`` is called at every step. ``scheduler_hook`` may wrap the fresh
    scheduler (PTQD's variance correction does).
    """
    sched = fresh_scheduler(scheduler)
    if scheduler_hook is not None:
        sched = scheduler_hook(sched)
    sched.set_timesteps(num_inference_steps)
    generator = torch.Generator().manual_seed(seed)
    x = noise * getattr(sched, "init_noise_sigma", 1.0)
    kw = _step_kwargs(sched, generator, eta)
    for i, t in enumerate(tqdm(sched.timesteps, desc="sample", disable=not progress, leave=False)):
        x_in = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        pred = denoise(x_in, t)
        if on_step is not None:
            on_step(i, t, x, pred)
        x = sched.step(pred, t, x, **kw).prev_sample
    return x
