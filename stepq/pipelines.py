"""Quantize the denoiser of a diffusers pipeline, calibrated by running the pipeline itself.

    qpipe = stepq.quantize_pipeline(pipe, "w8a8", prompts=["a cat"] * 4, guidance_scale=7.5,
                                    num_inference_steps=20)
    images = qpipe("a dog").images          # pipe.unet (or pipe.transformer) is now a QuantizedModel

``quantize_pipeline`` puts a forward pre-hook on the pipeline's denoiser (``unet`` or
``transformer``), runs the pipeline with its own scheduler, prompts or class labels and guidance (so
the recorded calls are exactly the ones it makes: with classifier-free guidance, the batched
[uncond; cond] call), removes the hook and quantizes on what it recorded (a
``stepq.calibration.CalibrationData``, the format ``stepq.calibration.collect`` returns). A
ModelOpt-style ``forward_loop(model)`` callable can drive the model instead. The result is a copy of
the pipeline whose denoiser is the compiled ``QuantizedModel``; the pipeline passed in and its
denoiser are left as they were (docs/DIFFUSERS.md).
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from stepq.artifact.quantized_model import QuantizedModel
from stepq.calibration.collect import CalibrationData
from stepq.compiler.api import quantize
from stepq.compiler.capture import TIMESTEP_NAMES
from stepq.compiler.errors import CalibrationError, CaptureError
from stepq.recipe.specs import Recipe

__all__ = ["DENOISER_COMPONENTS", "denoiser_of", "quantize_pipeline", "record_calls"]

log = logging.getLogger(__name__)

#: pipeline components tried, in order, for the denoiser
DENOISER_COMPONENTS = ("unet", "transformer")


def denoiser_of(pipe: Any, component: str | None = None) -> tuple[str, torch.nn.Module]:
    """``(name, module)`` of the pipeline's denoiser: ``component`` or the first of
    ``DENOISER_COMPONENTS`` the pipeline has."""
    names = (component,) if component is not None else DENOISER_COMPONENTS
    for name in names:
        model = getattr(pipe, name, None)
        if isinstance(model, torch.nn.Module):
            if isinstance(model, QuantizedModel):
                raise CaptureError(f"pipe.{name} is already a stepq QuantizedModel; pass the floating-point pipeline")
            return name, model
    raise CaptureError(f"{type(pipe).__name__} has no denoiser component {' or '.join(names)!r} that is an "
                       "nn.Module; pass component='<name>'")


def _keep(v: Any) -> bool:
    if v is None:
        return False
    if isinstance(v, Mapping):
        return bool(v)
    return True


def _detach(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, Mapping):
        return {k: _detach(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_detach(x) for x in v)
    return v


class record_calls:
    """Record every call of ``model`` as an input dict while the context is open.

    The call's arguments are bound to ``model.forward``'s parameters (positional ones get their
    names); arguments that are None or empty dicts are left out (diffusers passes
    ``cross_attention_kwargs=None`` and the like). ``.data`` is the ``CalibrationData``."""

    def __init__(self, model: torch.nn.Module, timestep_arg: str | None = None):
        self.model = model
        self.signature = inspect.signature(model.forward)
        names = list(self.signature.parameters)
        found = timestep_arg or next((n for n in TIMESTEP_NAMES if n in names), None)
        if found is None:
            raise CaptureError(f"{type(model).__name__}.forward has none of the timestep arguments "
                               f"{list(TIMESTEP_NAMES)}; pass timestep_arg='<name>'")
        self.timestep_arg: str = found
        self.data = CalibrationData(timestep_arg=self.timestep_arg)
        self._handle: Any = None

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        item: dict[str, Any] = {}
        for name, value in bound.items():
            kind = self.signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                item.update({k: _detach(v) for k, v in value.items() if _keep(v)})
            elif kind is not inspect.Parameter.VAR_POSITIONAL and _keep(value):
                item[name] = _detach(value)
        t = item.get(self.timestep_arg)
        if t is None:
            raise CalibrationError(f"a call of {type(module).__name__} had no {self.timestep_arg!r} argument")
        self.data.items.append(item)
        self.data.timesteps.append(float(torch.as_tensor(t).reshape(-1)[0]))

    def __enter__(self) -> record_calls:
        self._handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _call_kwargs(pipe: Any, *, num_samples: int | None, prompts: Sequence[str] | str | None,
                 class_labels: Sequence[int] | None, guidance_scale: float | None, num_inference_steps: int,
                 seed: int, pipeline_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    params = inspect.signature(pipe.__call__).parameters
    call = dict(pipeline_kwargs or {})

    def put(name: str, value: Any) -> None:
        if value is None:
            return
        if name not in params:
            raise TypeError(f"{type(pipe).__name__}.__call__ takes no {name!r} (its arguments: "
                            f"{', '.join(p for p in params if p not in ('self', 'kwargs'))})")
        call.setdefault(name, value)

    put("prompt", list(prompts) if isinstance(prompts, (list, tuple)) else prompts)
    put("class_labels", list(class_labels) if class_labels is not None else None)
    put("guidance_scale", guidance_scale)
    put("num_inference_steps", num_inference_steps)
    if num_samples is not None:
        size = next((n for n in ("batch_size", "num_images_per_prompt") if n in params), None)
        if size is None:
            raise TypeError(f"{type(pipe).__name__}.__call__ takes neither batch_size nor num_images_per_prompt; "
                            "give prompts= or class_labels= instead of num_samples=")
        call.setdefault(size, num_samples)
    if "generator" in params:
        call.setdefault("generator", torch.Generator().manual_seed(seed))
    if "output_type" in params:  # the decoded images are not needed: skip the VAE when there is one
        call.setdefault("output_type", "latent" if getattr(pipe, "vae", None) is not None else "np")
    return call


def _timestep_scale(pipe: Any, data: CalibrationData) -> float:
    """1 when the denoiser saw training timesteps; T when it saw t/T in [0, 1] (Flux: ``timestep / 1000``)."""
    if data.timesteps and max(data.timesteps) <= 1.0 + 1e-6 and max(data.timesteps) > 0:
        cfg = getattr(getattr(pipe, "scheduler", None), "config", None) or {}
        return float(cfg.get("num_train_timesteps", 1000))
    return 1.0


def quantize_pipeline(
    pipe: Any,
    recipe: str | Recipe | Mapping[str, Any] = "w8a8",
    *,
    num_samples: int | None = None,
    prompts: Sequence[str] | str | None = None,
    class_labels: Sequence[int] | None = None,
    guidance_scale: float | None = None,
    num_inference_steps: int = 20,
    forward_loop: Callable[[torch.nn.Module], Any] | None = None,
    seed: int = 0,
    component: str | None = None,
    timestep_scale: float | None = None,
    pipeline_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
    **quantize_kwargs: Any,
) -> Any:
    """Calibrate the pipeline's denoiser on the pipeline's own calls, quantize it, put it back.

    Args:
        pipe: a diffusers pipeline (DDPMPipeline, DDIMPipeline, DiTPipeline, StableDiffusionPipeline,
            StableDiffusion3Pipeline, FluxPipeline, ...) in float32. Not modified.
        recipe: a preset name, a ``stepq.Recipe`` or its dict (as ``stepq.quantize``). Training recipes
            need their data in ``quantize_kwargs`` (``train_data=``); their cost is the recipe's.
        num_samples: images to generate for calibration (the pipeline's ``batch_size`` or
            ``num_images_per_prompt``).
        prompts: prompts of a text-to-image pipeline; class_labels: labels of a class-conditional one.
        guidance_scale: the pipeline's ``guidance_scale`` (the calls are then the batched CFG calls).
        num_inference_steps: steps of the calibration run; every step is recorded, so calibration
            costs one pipeline run of this many steps plus the compile.
        forward_loop: ``forward_loop(model)`` runs the calibration instead of the pipeline call
            (ModelOpt's convention): every call of ``model`` in it is recorded.
        seed: seeds the pipeline's generator.
        component: the denoiser's name in the pipeline (default: ``unet``, else ``transformer``).
        timestep_scale: ``stepq.quantize``'s; default 1, or T when the recorded timesteps are t/T.
        pipeline_kwargs: more arguments for the pipeline call (``prompt_embeds=``, ``height=`` ...).
        progress: show the pipeline's and the compile's progress bars.
        quantize_kwargs: passed to ``stepq.quantize`` (``passes=``, ``dump=``, ``train_data=`` ...).

    Returns a shallow copy of ``pipe`` whose denoiser is the ``QuantizedModel`` (``qpipe.unet`` or
    ``qpipe.transformer``). The recorded calls are not kept (they can be large): to keep them, record
    with ``record_calls`` and call ``stepq.quantize`` yourself.
    """
    name, model = denoiser_of(pipe, component)
    with record_calls(model) as rec:
        if forward_loop is not None:
            if any(v is not None for v in (num_samples, prompts, class_labels, guidance_scale, pipeline_kwargs)):
                raise TypeError("quantize_pipeline: forward_loop= replaces the pipeline call; do not also give "
                                "num_samples / prompts / class_labels / guidance_scale / pipeline_kwargs")
            with torch.no_grad():
                forward_loop(model)
        else:
            call = _call_kwargs(pipe, num_samples=num_samples, prompts=prompts, class_labels=class_labels,
                                guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, seed=seed,
                                pipeline_kwargs=pipeline_kwargs)
            saved = copy.copy(getattr(pipe, "_progress_bar_config", None))
            pipe.set_progress_bar_config(disable=not progress)
            try:
                pipe(**call)
            finally:
                if saved is None:
                    del pipe._progress_bar_config
                else:
                    pipe._progress_bar_config = saved
    data = rec.data
    if not data.items:
        raise CalibrationError(f"the calibration run never called pipe.{name}; check forward_loop / the pipeline "
                               "arguments")
    scale = timestep_scale if timestep_scale is not None else _timestep_scale(pipe, data)
    log.info("quantize_pipeline: %d calls of pipe.%s recorded (timesteps %.4g..%.4g), timestep_scale %g",
             len(data), name, min(data.timesteps), max(data.timesteps), scale)
    qm = quantize(model, data[0], recipe, data, timestep_arg=rec.timestep_arg, timestep_scale=scale,
                  progress=progress, **quantize_kwargs)
    out = copy.copy(pipe)
    setattr(out, name, qm)
    return out
