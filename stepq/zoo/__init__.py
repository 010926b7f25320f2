"""Real models stepq is evaluated on, trained once by ``examples/train_digits.py`` and shipped here.

    model = stepq.zoo.load("digits-dit")          # eval mode, offline, one call
    spec = stepq.zoo.entry("digits-dit")          # scheduler, shape, CFG settings, conditions
    images, labels = stepq.zoo.generate(model, spec, 100, num_inference_steps=20, scheduler="ddim")

Models (all on scikit-learn's digits, 16×16, values in [−1, 1], see :mod:`stepq.data`):

- ``digits-ddpm``: a diffusers ``UNet2DModel`` predicting ε, unconditional;
- ``digits-dit``: a diffusers ``DiTTransformer2DModel`` with adaLN-Zero, predicting ε, conditioned on
  the class (label ``NULL_CLASS`` = 10 is the unconditional label of classifier-free guidance);
- ``digits-classifier``: :class:`~stepq.zoo.classifier.DigitClassifier`, whose features and
  predictions score samples (:mod:`stepq.metrics`);
- ``digits-dit-ternary``: the digits DiT after TerDiT's ternary QAT (preset ``ternary-dit``, weights
  packed base-3), a stepq artefact: ``load`` returns the ``QuantizedModel`` (docs/TERDIT.md).

Each model is two files in ``checkpoints/``: ``<name>.safetensors`` (the weights, EMA weights for
the diffusion models) and ``<name>.json`` (the architecture config, the training scheduler's config,
the sampling settings and ``info``: parameter count, training settings and measured metrics).
Nothing is fetched from a model hub.

The DiT is returned with the label dropout inside diffusers' ``LabelEmbedding`` switched off
(``dropout_prob = 0``): diffusers draws it independently in every block's embedder, so a sample
would be conditional in some blocks and unconditional in others. Training replaced the label by
``NULL_CLASS`` once per sample instead; any fine-tuning should do the same.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stepq.compiler.errors import ArtifactError, StepqError
from stepq.zoo.classifier import DigitClassifier

__all__ = [
    "CHECKPOINT_DIR",
    "FORMAT_VERSION",
    "MODELS",
    "NULL_CLASS",
    "NUM_CLASSES",
    "CheckpointError",
    "UnknownModelError",
    "ZooEntry",
    "available",
    "build_model",
    "checkpoint_paths",
    "class_conditions",
    "disable_label_dropout",
    "entry",
    "generate",
    "info",
    "load",
    "null_conditions",
    "read_config",
]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
MODELS = ("digits-ddpm", "digits-dit", "digits-classifier")
#: compiled models shipped as stepq artefacts (a directory ``checkpoints/<name>/``), with the FP model they came from
ARTEFACTS = {"digits-dit-ternary": "digits-dit"}
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES
FORMAT_VERSION = 1
_DENOISERS = ("digits-ddpm", "digits-dit")


class UnknownModelError(StepqError, KeyError):
    """A model name that the zoo does not have."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class CheckpointError(ArtifactError):
    """A shipped checkpoint file is missing, unreadable or does not match its config."""


def available() -> tuple[str, ...]:
    """Names of the models the zoo knows."""
    return MODELS + tuple(ARTEFACTS)


def _check_name(name: str) -> None:
    if name not in MODELS and name not in ARTEFACTS:
        raise UnknownModelError(f"unknown zoo model {name!r}; available: {', '.join(available())}")


def checkpoint_paths(name: str, directory: str | Path | None = None) -> tuple[Path, Path]:
    """``(weights .safetensors, config .json)`` of ``name`` in ``directory`` (default: the shipped ones)."""
    _check_name(name)
    d = Path(directory) if directory is not None else CHECKPOINT_DIR
    return d / f"{name}.safetensors", d / f"{name}.json"


def read_config(name: str, directory: str | Path | None = None) -> dict[str, Any]:
    """The parsed JSON of ``name``'s checkpoint."""
    _, cfg_path = checkpoint_paths(name, directory)
    if not cfg_path.is_file():
        raise CheckpointError(f"checkpoint config {cfg_path} is missing; retrain with "
                              f"`python examples/train_digits.py --models {name.removeprefix('digits-')}`")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read checkpoint config {cfg_path}: {e}") from e
    if not isinstance(cfg, dict) or cfg.get("format_version") != FORMAT_VERSION or "config" not in cfg:
        raise CheckpointError(f"checkpoint config {cfg_path} is not a stepq zoo config of format version "
                              f"{FORMAT_VERSION}")
    return cfg


def info(name: str, directory: str | Path | None = None) -> dict[str, Any]:
    """The ``info`` block of ``name``'s checkpoint: parameters, training settings, measured metrics."""
    return dict(read_config(name, directory).get("info", {}))


def disable_label_dropout(model: nn.Module) -> int:
    """Set ``dropout_prob = 0`` on every diffusers ``LabelEmbedding`` in ``model`` (the null-class row
    of the table stays); returns how many were changed."""
    count = 0
    for m in model.modules():
        if type(m).__name__ == "LabelEmbedding" and getattr(m, "dropout_prob", 0.0) != 0.0:
            m.dropout_prob = 0.0  # type: ignore[assignment]
            count += 1
    return count


def build_model(model_class: str, config: Mapping[str, Any]) -> nn.Module:
    """An untrained model of ``model_class`` from its config (float32)."""
    if model_class == "DigitClassifier":
        return DigitClassifier(**config)
    if model_class == "UNet2DModel":
        from diffusers import UNet2DModel

        return UNet2DModel.from_config(dict(config))
    if model_class == "DiTTransformer2DModel":
        from diffusers import DiTTransformer2DModel

        model = DiTTransformer2DModel.from_config(dict(config))
        disable_label_dropout(model)
        return model
    raise CheckpointError(f"unknown model class {model_class!r} in a zoo config")


def load(name: str, directory: str | Path | None = None) -> nn.Module:
    """The trained model ``name`` in eval mode (CPU, float32); reads only the local checkpoint. A compiled
    model (``ARTEFACTS``: ``digits-dit-ternary``) is returned as the ``stepq.QuantizedModel`` it was saved as."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if name in ARTEFACTS:
        _check_name(name)
        path = Path(directory) / name if directory is not None else CHECKPOINT_DIR / name
        if not (path / "manifest.json").is_file():
            raise CheckpointError(f"compiled model {path} is missing; rebuild it with "
                                  "`python benchmarks/terdit.py ship`")
        # the one upward import of the zoo (tests/test_layering.py): a shipped artefact is a QuantizedModel
        from stepq.artifact.quantized_model import load as load_artefact

        return load_artefact(str(path))
    cfg = read_config(name, directory)
    weights, _ = checkpoint_paths(name, directory)
    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights {weights} are missing; retrain with "
                              f"`python examples/train_digits.py --models {name.removeprefix('digits-')}`")
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint weights {weights}: {e}") from e
    model = build_model(cfg["class"], cfg["config"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights {weights} do not match the config {name}.json: {e}") from e
    return model.eval()


def class_conditions(n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Class labels for ``n`` DiT samples: every class equally often (±1), in a random order."""
    perm = torch.randperm(n, generator=generator)
    return {"class_labels": perm % NUM_CLASSES}


def null_conditions(cond: Mapping[str, Any]) -> dict[str, Tensor]:
    """The unconditional inputs of classifier-free guidance: every label replaced by ``NULL_CLASS``."""
    return {"class_labels": torch.full_like(torch.as_tensor(cond["class_labels"]), NULL_CLASS)}


@dataclass(frozen=True)
class ZooEntry:
    """What a benchmark needs to sample from a zoo denoiser.

    ``scheduler`` is a fresh ``DDPMScheduler`` with the exact training config (1000 steps, ε
    prediction); ``make_scheduler("ddim")`` gives a ``DDIMScheduler`` over the same noise schedule.
    ``conditions(n, generator)`` draws the conditioning of n samples and ``uncond(cond)`` its
    unconditional counterpart (both None for an unconditional model).
    """

    name: str
    scheduler: Any
    sample_shape: tuple[int, int, int]
    num_classes: int | None = None
    null_class: int | None = None
    guidance_scale: float = 1.0
    conditions: Callable[[int, torch.Generator | None], dict[str, Tensor]] | None = None
    uncond: Callable[[Mapping[str, Any]], dict[str, Tensor]] | None = None

    def make_scheduler(self, kind: str = "ddpm") -> Any:
        """A fresh scheduler of ``kind`` built from the training config: ``"ddpm"``, ``"ddim"``,
        ``"dpmsolver++"`` (``DPMSolverMultistepScheduler``, second order, deterministic) or ``"euler_a"``
        (``EulerAncestralDiscreteScheduler``: Euler steps in σ, float timesteps, fresh noise every step)."""
        from diffusers import (
            DDIMScheduler,
            DDPMScheduler,
            DPMSolverMultistepScheduler,
            EulerAncestralDiscreteScheduler,
        )

        classes: dict[str, tuple[Any, dict[str, Any]]] = {
            "ddpm": (DDPMScheduler, {}), "ddim": (DDIMScheduler, {}),
            "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
            "euler_a": (EulerAncestralDiscreteScheduler, {}),
        }
        if kind not in classes:
            raise ValueError(f"scheduler kind must be one of {sorted(classes)}, got {kind!r}")
        cls, extra = classes[kind]
        return cls.from_config(self.scheduler.config, **extra)


def entry(name: str, directory: str | Path | None = None) -> ZooEntry:
    """Sampling settings of the denoiser ``name`` (``digits-ddpm`` or ``digits-dit``)."""
    from diffusers import DDPMScheduler

    _check_name(name)
    if name in ARTEFACTS:  # a compiled model samples like the model it came from
        return dataclasses.replace(entry(ARTEFACTS[name], directory), name=name)
    if name not in _DENOISERS:
        raise ValueError(f"{name!r} is not a diffusion model; entries exist for {', '.join(_DENOISERS)}")
    cfg = read_config(name, directory)
    scheduler = DDPMScheduler.from_config(cfg["scheduler"])
    shape = tuple(int(s) for s in cfg["sample_shape"])
    if name == "digits-dit":
        return ZooEntry(name, scheduler, shape, num_classes=int(cfg["num_classes"]),  # type: ignore[arg-type]
                        null_class=int(cfg["null_class"]), guidance_scale=float(cfg["guidance_scale"]),
                        conditions=class_conditions, uncond=null_conditions)
    return ZooEntry(name, scheduler, shape)  # type: ignore[arg-type]


def generate(model: Callable[..., Any], spec: ZooEntry, n: int, *, num_inference_steps: int,
             scheduler: str | Any = "ddpm", seed: int = 0, eta: float | None = None,
             guidance_scale: float | None = None, labels: Tensor | None = None,
             batch_size: int = 250) -> tuple[Tensor, Tensor | None]:
    """``n`` samples of ``model`` (the FP model or a compiled one) with ``spec``'s settings.

    The initial noise and the labels come from one generator seeded with ``seed``; batch ``b`` runs
    the sampler with seed ``seed·1000 + b``. The same (seed, batch_size) gives the same samples for
    every model, so FP and quantized samples can be compared pixel by pixel.

    Returns ``(images [n, *sample_shape] clamped to [−1, 1], class labels or None)``.
    """
    from stepq.calibration.samplers import make_denoiser, sample

    if n <= 0 or batch_size <= 0:
        raise ValueError(f"n and batch_size must be positive, got {n} and {batch_size}")
    sched = spec.make_scheduler(scheduler) if isinstance(scheduler, str) else scheduler
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *spec.sample_shape), generator=gen)
    cond: dict[str, Tensor] = {}
    if labels is not None and torch.as_tensor(labels).numel() != n:
        raise ValueError(f"got {torch.as_tensor(labels).numel()} labels for {n} samples")
    if spec.conditions is not None:
        cond = {"class_labels": torch.as_tensor(labels).long()} if labels is not None else spec.conditions(n, gen)
    scale = spec.guidance_scale if guidance_scale is None else guidance_scale
    out = []
    for b, start in enumerate(range(0, n, batch_size)):
        part = {k: v[start:start + batch_size] for k, v in cond.items()}
        un = spec.uncond(part) if spec.uncond is not None and part else None
        denoise = make_denoiser(model, cond=part, uncond=un, guidance_scale=scale, channels=spec.sample_shape[0])
        out.append(sample(denoise, sched, noise[start:start + batch_size], num_inference_steps,
                          seed=seed * 1000 + b, eta=eta))
    return torch.cat(out).clamp(-1.0, 1.0), cond.get("class_labels")
