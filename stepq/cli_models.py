"""What the ``stepq`` command quantizes: a ``stepq.zoo`` name or a diffusers folder, and how to sample it.

``resolve_model(arg)`` returns a ``ModelSource``: the FP denoiser, the scheduler it is calibrated and
sampled with, its sample shape and conditioning. ``arg`` is

* a zoo name (``digits-ddpm``, ``digits-dit``): the shipped model with its training scheduler,
  classifier-free guidance settings, and the digits training images (what QAT recipes train on);
* a diffusers model folder (``save_pretrained`` of a ``UNet2DModel``, ``DiTTransformer2DModel`` or
  ``UNet2DConditionModel``: a ``config.json`` naming its ``_class_name``), calibrated with a default
  ``DDIMScheduler`` (1000 training steps);
* a pipeline folder (a ``model_index.json``): its ``unet`` or ``transformer`` component, calibrated
  with the pipeline's own ``scheduler/``; a ``UNet2DConditionModel`` is conditioned on ``prompt``
  encoded by the pipeline's ``text_encoder`` / ``tokenizer``.

Conditioning: a DiT gets random class labels (guidance against its null class when
``guidance_scale != 1``); a text-conditioned UNet gets the prompt's embedding (guidance against the
empty prompt's). A text-conditioned UNet without a text encoder is refused: there is nothing to
condition it on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stepq.compiler.errors import StepqError

__all__ = ["SUPPORTED_CLASSES", "ModelSource", "ModelSourceError", "resolve_model"]

#: the diffusers denoiser classes the command line knows how to calibrate
SUPPORTED_CLASSES = ("UNet2DModel", "DiTTransformer2DModel", "UNet2DConditionModel")


class ModelSourceError(StepqError):
    """The model argument is not a zoo name or a loadable diffusers folder (the message names it)."""


@dataclass
class ModelSource:
    """A denoiser and the settings to calibrate and sample it (``stepq.calibration.collect``'s arguments)."""

    name: str
    model: nn.Module
    scheduler: Any
    sample_shape: tuple[int, int, int]
    conditions: Callable[[int, torch.Generator | None], dict[str, Tensor]] | None = None
    uncond: Callable[[Mapping[str, Any]], dict[str, Tensor]] | None = None
    guidance_scale: float = 1.0
    #: the real training images ``(x0 [N, C, H, W], labels or None)`` QAT recipes train on (zoo models only)
    train_images: Callable[[], tuple[Tensor, Tensor | None]] | None = None
    null_class: int | None = None

    def scheduler_of(self, sampler: str) -> Any:
        """``"auto"``: the source's own scheduler; ``"ddim"`` / ``"ddpm"``: that class over its config."""
        from diffusers import DDIMScheduler, DDPMScheduler

        if sampler == "auto":
            return type(self.scheduler).from_config(self.scheduler.config)
        cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[sampler]
        return cls.from_config(self.scheduler.config)


def _zoo_source(name: str) -> ModelSource:
    from stepq import zoo
    from stepq.data import load_digits_images

    try:
        entry = zoo.entry(name)
    except ValueError as e:  # the classifier: not a denoiser
        raise ModelSourceError(str(e)) from None
    model = zoo.load(name)

    def images() -> tuple[Tensor, Tensor | None]:
        x0, y = load_digits_images("train")
        return x0, (y if entry.conditions is not None else None)

    return ModelSource(name, model, entry.make_scheduler("ddim"), entry.sample_shape, entry.conditions, entry.uncond,
                       entry.guidance_scale, images, entry.null_class)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelSourceError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ModelSourceError(f"{path} is not a JSON object")
    return data


def _diffusers_class(name: str, where: Path) -> Any:
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ModelSourceError(f"{where} names the class {name!r}, which diffusers {diffusers.__version__} does not have")
    return cls


def _load_denoiser(folder: Path) -> nn.Module:
    cfg = _read_json(folder / "config.json")
    cls_name = str(cfg.get("_class_name", "?"))
    if cls_name not in SUPPORTED_CLASSES:
        raise ModelSourceError(f"{folder}: the command line calibrates {', '.join(SUPPORTED_CLASSES)}, not {cls_name}; "
                               "quantize other denoisers with the Python API (stepq.quantize)")
    try:
        model = _diffusers_class(cls_name, folder / "config.json").from_pretrained(str(folder))
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelSourceError(f"cannot load the {cls_name} in {folder}: {str(e).splitlines()[0]}") from None
    return model.eval()


def _shape(model: nn.Module, folder: Path) -> tuple[int, int, int]:
    cfg: Any = getattr(model, "config", {})
    size = cfg.get("sample_size")
    if size is None:
        raise ModelSourceError(f"{folder}: the model's config has no sample_size")
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return int(cfg["in_channels"]), int(h), int(w)


def _class_conditions(model: nn.Module) -> tuple[Callable[[int, torch.Generator | None], dict[str, Tensor]],
                                                Callable[[Mapping[str, Any]], dict[str, Tensor]], int]:
    cfg: Any = getattr(model, "config", {})
    n_classes = int(cfg["num_embeds_ada_norm"])

    def conditions(n: int, gen: torch.Generator | None) -> dict[str, Tensor]:
        return {"class_labels": torch.randint(0, n_classes, (n,), generator=gen)}

    def uncond(cond: Mapping[str, Any]) -> dict[str, Tensor]:  # diffusers' LabelEmbedding: row n_classes is null
        return {"class_labels": torch.full_like(torch.as_tensor(cond["class_labels"]), n_classes)}

    return conditions, uncond, n_classes


@torch.no_grad()
def _prompt_embedding(folder: Path, index: Mapping[str, Any], prompt: str) -> Tensor:
    import transformers

    if "text_encoder" not in index or "tokenizer" not in index:
        raise ModelSourceError(f"{folder}: a text-conditioned UNet needs the pipeline's text_encoder and tokenizer")
    enc_cls = getattr(transformers, str(index["text_encoder"][1]), None)
    tok_cls = getattr(transformers, str(index["tokenizer"][1]), None)
    if enc_cls is None or tok_cls is None:
        raise ModelSourceError(f"{folder}: transformers has no {index['text_encoder'][1]} / {index['tokenizer'][1]}")
    tok = tok_cls.from_pretrained(str(folder / "tokenizer"))
    enc = enc_cls.from_pretrained(str(folder / "text_encoder")).eval()
    ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return enc(ids)[0]


def _folder_source(folder: Path, prompt: str) -> ModelSource:
    from diffusers import DDIMScheduler

    if (folder / "model_index.json").is_file():
        index = _read_json(folder / "model_index.json")
        key = next((k for k in ("unet", "transformer") if k in index), None)
        if key is None:
            raise ModelSourceError(f"{folder / 'model_index.json'} has no unet or transformer component")
        model = _load_denoiser(folder / key)
        if "scheduler" in index:
            scheduler = _diffusers_class(str(index["scheduler"][1]), folder / "model_index.json").from_pretrained(
                str(folder), subfolder="scheduler")
        else:
            scheduler = DDIMScheduler()
    elif (folder / "config.json").is_file():
        index, model, scheduler = {}, _load_denoiser(folder), DDIMScheduler()
    else:
        raise ModelSourceError(f"{folder} has neither a model_index.json (a pipeline) nor a config.json (a model)")
    shape = _shape(model, folder)
    name = type(model).__name__
    if name == "DiTTransformer2DModel":
        cond, uncond, null = _class_conditions(model)
        return ModelSource(str(folder), model, scheduler, shape, cond, uncond, null_class=null)
    if name == "UNet2DConditionModel":
        if not index:
            raise ModelSourceError(f"{folder}: a UNet2DConditionModel needs text conditioning; pass its pipeline "
                                   "folder (with text_encoder/ and tokenizer/) instead of the model folder")
        emb, empty = _prompt_embedding(folder, index, prompt), _prompt_embedding(folder, index, "")

        def conditions(n: int, gen: torch.Generator | None) -> dict[str, Tensor]:
            return {"encoder_hidden_states": emb.expand(n, -1, -1).clone()}

        def text_uncond(c: Mapping[str, Any]) -> dict[str, Tensor]:
            return {"encoder_hidden_states": empty.expand(c["encoder_hidden_states"].shape[0], -1, -1).clone()}

        return ModelSource(str(folder), model, scheduler, shape, conditions, text_uncond)
    return ModelSource(str(folder), model, scheduler, shape)


def resolve_model(arg: str, *, prompt: str = "a photo", guidance_scale: float | None = None) -> ModelSource:
    """The ``ModelSource`` for a zoo name or a diffusers model / pipeline folder (see the module
    docstring); ``guidance_scale`` overrides the source's classifier-free guidance scale (zoo DiT:
    1.5; folders: 1, no guidance)."""
    from stepq import zoo

    if arg in zoo.available():
        src = _zoo_source(arg)
    elif Path(arg).is_dir():
        src = _folder_source(Path(arg), prompt)
    else:
        raise ModelSourceError(f"{arg!r} is neither a stepq.zoo model ({', '.join(zoo.available())}) nor a folder")
    if guidance_scale is not None:
        src.guidance_scale = float(guidance_scale)
    return src
