"""The public steps: prepare, calibrate, convert, and ``quantize`` that does them all."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from stepq.artifact.quantized_model import QuantizedModel
from stepq.artifact.report import layer_reports
from stepq.compiler.capture import capture
from stepq.compiler.errors import CalibrationError, PreconditionError, RecipeError
from stepq.compiler.pass_manager import run_passes
from stepq.compiler.pipeline import build_calibration_pipeline, build_convert_pipeline, build_pipeline
from stepq.compiler.program import Program
from stepq.methods.qat import train_qat
from stepq.methods.tdq.fit import fit_scale_source
from stepq.passes.materialize_quantizers import observer_nodes
from stepq.recipe.presets import get_preset
from stepq.recipe.specs import Recipe

__all__ = ["calibrate", "convert", "prepare", "quantize", "resolve_recipe"]

log = logging.getLogger(__name__)


def resolve_recipe(recipe: str | Recipe | Mapping[str, Any]) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str):
        return get_preset(recipe)
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(recipe)
    raise RecipeError(f"recipe must be a preset name, a Recipe or a dict, got {type(recipe).__name__}")


def _copy_program(prog: Program) -> Program:
    return prog.replace(gm=copy.deepcopy(prog.gm), history=list(prog.history), state=prog.state.copy())


def _require(prog: Program, stages: Sequence[str], action: str) -> None:
    if not isinstance(prog, Program):
        raise PreconditionError(f"{action} takes a Program (from stepq.capture), got {type(prog).__name__}")
    if prog.stage not in stages:
        raise PreconditionError(f"{action} needs a program at stage {' or '.join(stages)}, got {prog.stage!r}")


def prepare(prog: Program, recipe: str | Recipe | Mapping[str, Any], *, inplace: bool = False) -> Program:
    """Annotate the program with ``recipe`` and insert quantizers and observers."""
    _require(prog, ("captured",), "prepare")
    recipe = resolve_recipe(recipe)
    if not inplace:
        prog = _copy_program(prog)
    prog.recipe = recipe
    run_passes(prog, build_pipeline(recipe))
    prog.advance("prepared")
    return prog


def _as_call(item: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(item, Mapping):
        return (), dict(item)
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    raise CalibrationError(f"a calibration item must be a dict of keyword arguments or a tuple, got {type(item).__name__}")


@torch.no_grad()
def calibrate(prog: Program, data: Iterable[Any], *, max_batches: int | None = None, progress: bool = True) -> Program:
    """Run the calibration data through the prepared program, then freeze the observed scales.

    ``data`` is an iterable of input dicts (or argument tuples), e.g. what
    ``stepq.calibration.collect`` returns. The program is updated in place and returned.
    """
    _require(prog, ("prepared",), "calibrate")
    if data is None:
        raise CalibrationError("calibration data is None; pass an iterable of input dicts")
    observers = observer_nodes(prog.gm)
    recipe = prog.recipe
    fit_tdq = recipe.tdq is not None and recipe.qat is None and recipe.tdq.fit_steps > 0
    kept: list[Any] = []
    n = 0
    total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    first = None
    for item in tqdm(data, total=total, desc="calibrate", disable=not progress or not observers, leave=False):
        if max_batches is not None and n >= max_batches:
            break
        args, kwargs = _as_call(item)
        if first is None:
            first = prog.bind(args, kwargs)
        if observers:
            prog(*args, **kwargs)
        if fit_tdq:
            kept.append(prog.bind(args, kwargs))
        n += 1
    if n == 0:
        raise CalibrationError("calibration data is empty: it yielded no batches")
    prog.state.report_batch = first
    run_passes(prog, build_calibration_pipeline(recipe))
    if fit_tdq:
        cfg = recipe.tdq
        prog.state.fit_curve = fit_scale_source(
            prog, kept, steps=cfg.fit_steps, lr=cfg.fit_lr, batch=cfg.fit_batch, rows=cfg.fit_rows, seed=cfg.seed,
            time_budget_s=cfg.time_budget_s, objective=cfg.fit_objective, progress=progress)
    prog.advance("calibrated")
    return prog


def convert(prog: Program, *, inplace: bool = False, report: bool = True) -> QuantizedModel:
    """Freeze the program: integer weights, frozen scales, the per-layer report."""
    _require(prog, ("calibrated", "prepared"), "convert")
    if prog.stage == "prepared" and observer_nodes(prog.gm):
        raise PreconditionError("convert: the program has observers that saw no data; run stepq.calibrate first")
    if not inplace:
        prog = _copy_program(prog)
    batch = prog.state.report_batch
    prog.state.report = layer_reports(prog, batch if report else None)
    run_passes(prog, build_convert_pipeline(prog.recipe))
    prog.state.report_batch = None
    prog.advance("converted")
    return QuantizedModel(prog)


def quantize(
    model: torch.nn.Module,
    example_inputs: Mapping[str, Any] | Sequence[Any],
    recipe: str | Recipe | Mapping[str, Any] = "w8a8",
    calibration: Iterable[Any] | None = None,
    *,
    timestep_arg: str | None = None,
    sample_arg: str | None = None,
    dynamic_batch: bool = True,
    timestep_scale: float = 1.0,
    train_data: Iterator[tuple[Mapping[str, Any], torch.Tensor]] | None = None,
    ptqd_data: Iterable[Any] | None = None,
    ptqd_scheduler: Any = None,
    progress: bool = True,
) -> QuantizedModel:
    """capture → prepare → calibrate → (QAT) → convert → (PTQD) in one call. The model is not modified.

    QAT recipes (``recipe.qat``) also need ``train_data``: an endless iterator of (inputs, target ε),
    e.g. ``stepq.methods.qat.denoising_batches(x0, scheduler, make_inputs, batch_size=...)``.
    PTQD recipes (``recipe.ptqd``) measure their statistics with ``stepq.methods.ptqd.apply`` on ``ptqd_data``
    (default: the calibration data, which must then be re-iterable) against ``model``;
    ``ptqd_scheduler`` gives SNR^F for mixed precision (default: DDPM's linear schedule).
    """
    recipe = resolve_recipe(recipe)
    if recipe.qat is not None and train_data is None:
        raise RecipeError(f"recipe {recipe.name!r} trains (QAT); pass train_data=denoising_batches(...)")
    prog = capture(model, example_inputs, timestep_arg=timestep_arg, sample_arg=sample_arg,
                   dynamic_batch=dynamic_batch, timestep_scale=timestep_scale)
    prog = prepare(prog, recipe, inplace=True)
    if calibration is None:
        if observer_nodes(prog.gm):
            raise CalibrationError(f"recipe {recipe.name!r} quantizes activations, so it needs calibration data "
                                   "(calibration=stepq.calibration.collect(...) or a list of input dicts)")
        calibration = [example_inputs]
    calibrate(prog, calibration, progress=progress)
    if recipe.qat is not None and train_data is not None:
        cfg = recipe.qat
        prog.state.qat_curve = train_qat(prog, train_data, steps=cfg.steps, lr=cfg.lr, scale_lr=cfg.scale_lr,
                                                batch_size=cfg.batch_size, progress=progress)
    qm = convert(prog, inplace=True)
    if recipe.ptqd is not None:
        from stepq.methods.ptqd import apply as ptqd_apply

        qm = ptqd_apply(qm, model, ptqd_data if ptqd_data is not None else calibration, scheduler=ptqd_scheduler)
    return qm
