"""The public steps: prepare, calibrate, train, convert, and ``quantize`` that does them all.

Each runs its phase of the one pipeline (``stepq.compiler.pipeline.build_pipeline``). Every call
takes ``passes=[stepq.At(...)]`` (a user's passes at named points) and ``dump=`` (a folder that
receives the graph after every pass as text; ``$STEPQ_DUMP_DIR`` when not given).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from stepq.artifact.quantized_model import QuantizedModel
from stepq.calibration.collect import Sampling, collect_samplings, sampler_timesteps, sampling_of
from stepq.calibration.observers import observer_nodes
from stepq.compiler.borrow import own_all
from stepq.compiler.capture import capture
from stepq.compiler.errors import CalibrationError, PreconditionError, RecipeError
from stepq.compiler.pass_manager import CompileInputs
from stepq.compiler.pipeline import PTQD_REWRITES, At, run_phase
from stepq.compiler.program import Program
from stepq.recipe.presets import get_preset
from stepq.recipe.specs import PTQDConfig, Recipe

__all__ = ["apply_ptqd", "calibrate", "convert", "prepare", "ptqd_with_config", "quantize", "resolve_recipe", "train"]

log = logging.getLogger(__name__)


def resolve_recipe(recipe: str | Recipe | Mapping[str, Any]) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str):
        return get_preset(recipe)
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(recipe)
    raise RecipeError(f"recipe must be a preset name, a Recipe or a dict, got {type(recipe).__name__}")


def _require(prog: Program, stages: Sequence[str], action: str) -> None:
    if not isinstance(prog, Program):
        raise PreconditionError(f"{action} takes a Program (from stepq.capture), got {type(prog).__name__}")
    if prog.stage not in stages:
        raise PreconditionError(f"{action} needs a program at stage {' or '.join(stages)}, got {prog.stage!r}")


def prepare(prog: Program, recipe: str | Recipe | Mapping[str, Any], *, inplace: bool = False,
            passes: Sequence[At] = (), dump: str | os.PathLike[str] | None = None) -> Program:
    """Annotate the program with ``recipe`` and insert quantizers and observers.

    Args:
        prog: a captured program (``stepq.capture``).
        recipe: a preset name, a ``Recipe`` or its ``to_dict()`` form.
        inplace: rewrite ``prog`` itself instead of a copy.
        passes: a user's passes put into the pipeline (``stepq.At``).
        dump: a folder that receives the graph after every pass (default ``$STEPQ_DUMP_DIR``, or none).
    """
    _require(prog, ("captured",), "prepare")
    recipe = resolve_recipe(recipe)
    if not inplace:
        prog = prog.copy()
    prog.recipe = recipe
    run_phase(prog, "prepare", passes=passes, dump=dump)
    prog.advance("prepared")
    return prog


def calibrate(prog: Program, data: Iterable[Any], *, max_batches: int | None = None, progress: bool = True,
              passes: Sequence[At] = (), dump: str | os.PathLike[str] | None = None) -> Program:
    """Run the calibration data through the prepared program, then freeze the observed scales (and,
    for a TDQ recipe in PTQ, fit its scale source).

    ``data`` is an iterable of input dicts (or argument tuples), e.g. what
    ``stepq.calibration.collect`` returns. The program is updated in place and returned.

    Args:
        prog: a prepared program (``stepq.prepare``).
        data: the calibration inputs; every batch runs once through the observers.
        max_batches: use at most this many batches of ``data``.
        progress: show tqdm bars.
        passes, dump: as in ``prepare``.

    Cost: one forward per batch, then the observers' range search (an MSE observer tries
    ``num_candidates`` ranges per quantizer); a TDQ recipe then runs ``recipe.tdq.fit_steps`` Adam
    steps (forward + backward of the quantized model on ``fit_batch × fit_rows`` samples each).
    """
    _require(prog, ("prepared",), "calibrate")
    if data is None:
        raise CalibrationError("calibration data is None; pass an iterable of input dicts")
    inputs = CompileInputs(calibration=data, max_batches=max_batches, progress=progress)
    run_phase(prog, "calibrate", inputs, passes=passes, dump=dump)
    prog.advance("calibrated")
    return prog


def train(prog: Program, train_data: Iterator[tuple[Mapping[str, Any], torch.Tensor]] | None = None, *,
          fp_model: Any = None, sampling: Sampling | None = None, progress: bool = True,
          passes: Sequence[At] = (), dump: str | os.PathLike[str] | None = None) -> Program:
    """Train a calibrated program (in place), as its recipe says.

    ``recipe.qat`` (LSQ QAT): ``train_data`` is an endless iterator of (inputs, target ε), e.g.
    ``stepq.methods.qat.denoising_batches(x0, scheduler, make_inputs, batch_size=...)``.
    ``recipe.qalora`` (EfficientDM): data-free distillation from ``fp_model`` (the teacher, not
    modified) along its own trajectories, drawn as ``sampling`` says (``stepq.Sampling``; what
    ``stepq.calibration.collect`` ran is in its result's ``.sampling``).

    Args:
        prog: a calibrated program whose recipe has a ``qat`` or ``qalora`` section.
        train_data: (QAT) the endless (inputs, ε) iterator.
        fp_model: (QALoRA) the floating-point teacher.
        sampling: (QALoRA) how the teacher's trajectories are drawn.
        progress: show tqdm bars.
        passes, dump: as in ``prepare``.

    Cost: ``qat.steps`` (LSQ, ternary) or ``qalora.steps`` (EfficientDM) forward + backward passes.
    """
    _require(prog, ("calibrated",), "train")
    r = prog.recipe
    if r.qat is None and r.qalora is None:
        raise RecipeError(f"recipe {r.name!r} has no QAT or QALoRA section; nothing to train")
    if r.qat is not None and train_data is None:
        raise RecipeError(f"recipe {r.name!r} trains (QAT); pass train_data=denoising_batches(...)")
    if r.qalora is not None and (fp_model is None or sampling is None):
        raise RecipeError(f"recipe {r.name!r} distills QALoRA adapters from the FP model along its trajectories; "
                          "pass fp_model= (the floating-point model) and sampling= (stepq.Sampling, or the "
                          "calibration data's .sampling when it came from stepq.calibration.collect)")
    inputs = CompileInputs(train_data=train_data, fp_model=fp_model, sampling=sampling, progress=progress)
    run_phase(prog, "train", inputs, passes=passes, dump=dump)
    return prog


def convert(prog: Program, *, inplace: bool = False, report: bool = True, passes: Sequence[At] = (),
            dump: str | os.PathLike[str] | None = None) -> QuantizedModel:
    """Freeze the program: the per-layer report, frozen scales and tables, integer weights.

    Args:
        prog: a calibrated (or, for weight-only recipes, prepared) program.
        inplace: convert ``prog`` itself instead of a copy (the copy leaves ``prog`` usable: it
            can be trained or fitted further and converted again).
        report: measure the per-layer SQNR on the kept calibration batch (two forwards).
        passes, dump: as in ``prepare``.

    Returns a ``QuantizedModel``.
    """
    _require(prog, ("calibrated", "prepared"), "convert")
    if prog.stage == "prepared" and observer_nodes(prog.gm):
        raise PreconditionError("convert: the program has observers that saw no data; run stepq.calibrate first")
    if not inplace:
        prog = prog.copy()
    run_phase(prog, "convert", CompileInputs(report=report), passes=passes, dump=dump)
    # what is still borrowed from the user's model (float-kept layers, biases: the quantized weights
    # are integer tensors of the program's own by now) is copied, so a QuantizedModel owns its tensors
    own_all(prog.borrowed, prog.gm)
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
    sampling: Sampling | None = None,
    samplers: Sequence[Any] | None = None,
    progress: bool = True,
    passes: Sequence[At] = (),
    dump: str | os.PathLike[str] | None = None,
) -> QuantizedModel:
    """capture → prepare → calibrate → (train) → convert → (ptqd): every phase of the pipeline in one
    call. The model is not modified.

    Args:
        model: the floating-point denoiser (any ``nn.Module``; diffusers UNets and DiTs included).
        example_inputs: one call's keyword arguments (a dict) or positional arguments (a tuple).
        recipe: a preset name (``stepq presets``), a ``Recipe`` or its ``to_dict()`` form.
        calibration: an iterable of input dicts, e.g. ``stepq.calibration.collect(...)``.
        timestep_arg: the name of the timestep input (default: found by name).
        sample_arg: the name of the sample input (default: found by name).
        dynamic_batch: capture with a symbolic batch dimension.
        timestep_scale: multiplies a call's timestep to give the integer training timestep
            (1000 for flow-matching models called with t in [0, 1]).
        train_data, ptqd_data, ptqd_scheduler, sampling, samplers: see below.
        progress: show tqdm bars.
        passes: a user's passes (``stepq.At``); dump: a folder for the graph after every pass.

    What a recipe costs beyond calibration (one forward per calibration batch plus the
    observers' range search):

    * TDQ in PTQ (``wXaY-tdq``, ``-steptable``): ``recipe.tdq.fit_steps`` Adam steps (300 in the
      presets), each a forward and backward pass on ``fit_batch x fit_rows`` = 32 samples (digits
      DiT: the 300-step fit is most of the 195 s ``build_s`` of ``stepq w4a4-tdq`` in
      docs/results/quality_dit.json, against 38 s for static W4A4). Set ``fit_steps`` lower to
      trade quality for time (examples/demo.py: 100 steps); ``time_budget_s`` caps the wall time,
      but then the result depends on the machine's speed.
    * QAT (``w4a4-qat``, ``w4a4-tdq-qat``): ``recipe.qat.steps`` (500) steps on batches of 64 real
      images (digits DiT and UNet: 280-300 s on 2 CPU cores, ``build_s`` in docs/results/quality_*.json).
    * QALoRA (``wXaY-qalora``, EfficientDM): ``recipe.qalora.steps`` (400) distillation steps, each
      a quantized forward + backward and an FP forward along the FP model's own trajectories.
    * ternary (``ternary-dit``, TerDiT): ``recipe.qat.steps`` (1000) QAT steps of 64 real images.
    * PTQD (``-ptqd``): one more pass over the calibration data (statistics), no training.

    QAT recipes (``recipe.qat``) also need ``train_data``: an endless iterator of (inputs, target ε),
    e.g. ``stepq.methods.qat.denoising_batches(x0, scheduler, make_inputs, batch_size=...)``.
    PTQD recipes (``recipe.ptqd``) measure their statistics against ``model`` on ``ptqd_data``
    (default: the calibration data, which must then be re-iterable), or, with ``samplers`` (a list
    of ``stepq.Sampling`` or of diffusers schedulers after ``set_timesteps(n)``, whose sample shape
    and conditions come from the calibration data's ``.sampling``), on ``PTQDConfig.sampler_samples``
    FP trajectories of each of the samplers the model will be sampled with (``ptqd_data`` built by
    ``stepq.calibration.collect_samplings``; seeded by ``PTQDConfig.seed``; both given: ``ptqd_data``
    must visit exactly the samplers' timesteps, else ``RecipeError``); ``ptqd_scheduler`` gives SNR^F
    for mixed precision (default: DDPM's linear schedule). QALoRA recipes (``recipe.qalora``,
    EfficientDM) distill from ``model`` along trajectories drawn as ``sampling`` says (default: the
    sampling that recorded ``calibration``, when it came from ``stepq.calibration.collect``). ``passes`` puts a user's passes into the
    pipeline (``stepq.At``); ``dump`` writes the graph after every pass, file by file.
    """
    recipe = resolve_recipe(recipe)
    if recipe.qat is not None and train_data is None:
        raise RecipeError(f"recipe {recipe.name!r} trains (QAT); pass train_data=denoising_batches(...)")
    if recipe.qalora is not None:
        sampling = sampling if sampling is not None else getattr(calibration, "sampling", None)
        if sampling is None:
            raise RecipeError(f"recipe {recipe.name!r} distills along the FP model's own trajectories: pass "
                              "calibration=stepq.calibration.collect(...) (it records its sampling) or sampling="
                              "stepq.Sampling(scheduler, num_inference_steps, sample_shape, ...)")
    if samplers is not None:
        ptqd_data = _sampler_data(model, recipe, samplers, ptqd_data, calibration, progress)
    prog = capture(model, example_inputs, timestep_arg=timestep_arg, sample_arg=sample_arg,
                   dynamic_batch=dynamic_batch, timestep_scale=timestep_scale)
    prog = prepare(prog, recipe, inplace=True, passes=passes, dump=dump)
    if calibration is None:
        if observer_nodes(prog.gm):
            raise CalibrationError(f"recipe {recipe.name!r} quantizes activations, so it needs calibration data "
                                   "(calibration=stepq.calibration.collect(...) or a list of input dicts)")
        calibration = [example_inputs]
    calibrate(prog, calibration, progress=progress, passes=passes, dump=dump)
    if recipe.qat is not None or recipe.qalora is not None:
        train(prog, train_data, fp_model=model, sampling=sampling, progress=progress, passes=passes, dump=dump)
    qm = convert(prog, inplace=True, passes=passes, dump=dump)
    if recipe.ptqd is not None:
        apply_ptqd(qm, model, ptqd_data if ptqd_data is not None else calibration, scheduler=ptqd_scheduler,
                   passes=passes, dump=dump)
    return qm


def _sampler_data(model: Any, recipe: Recipe, samplers: Sequence[Any], ptqd_data: Iterable[Any] | None,
                  calibration: Iterable[Any] | None, progress: bool) -> Iterable[Any]:
    """PTQD's measuring data for ``quantize(..., samplers=...)``: FP trajectories of those samplers."""
    cfg = recipe.ptqd
    if cfg is None:
        raise RecipeError(f"samplers= chooses PTQD's measuring data, but recipe {recipe.name!r} has no ptqd section")
    if isinstance(samplers, (str, bytes)) or not isinstance(samplers, Sequence) or not samplers:
        raise RecipeError("samplers must be a non-empty list of stepq.Sampling or diffusers schedulers")
    try:
        base = getattr(calibration, "sampling", None)
        samplings = [sampling_of(s, base) for s in samplers]
    except CalibrationError as e:
        raise RecipeError(f"samplers: {e}") from None
    for s in samplings:
        if s.guidance_scale != cfg.guidance_scale:
            raise RecipeError(f"samplers: a sampler guides at {s.guidance_scale}, PTQDConfig.guidance_scale is "
                              f"{cfg.guidance_scale}; the statistics are taken at the config's scale")
    wanted = {t for s in samplings for t in sampler_timesteps(s)}
    if ptqd_data is not None:  # both: only if they agree
        have = getattr(ptqd_data, "timesteps", None)
        if have is None or set(float(t) for t in have) != wanted:
            raise RecipeError("both ptqd_data and samplers were given, and ptqd_data "
                              + ("does not record its timesteps" if have is None else
                                 f"visits {len(set(have))} timesteps other than the samplers' {len(wanted)}")
                              + "; pass one of them (samplers= builds ptqd_data from the samplers' FP trajectories)")
        return ptqd_data
    data = collect_samplings(model, samplings, num_samples=cfg.sampler_samples, seed=cfg.seed + 9176,
                             progress=progress)
    log.info("PTQD data: %d trajectories of each of %d samplers, %d timesteps", cfg.sampler_samples, len(samplings),
             len(wanted))
    return data


def apply_ptqd(qm: QuantizedModel, fp_model: Any, data: Iterable[Mapping[str, Any]], *,
               config: PTQDConfig | None = None, scheduler: Any = None, passes: Sequence[At] = (),
               dump: str | os.PathLike[str] | None = None) -> QuantizedModel:
    """PTQD on a converted model, in place: convert's PTQD rewrites (the correction and, for mixed
    precision, the bit switch; already there for a PTQD recipe), then the pipeline's "ptqd" phase
    (the bits chosen and the correction's tables filled from statistics of ``qm`` against
    ``fp_model`` on ``data``).

    Args:
        qm: a converted model (any recipe; ``config`` or the recipe's ``ptqd`` section says what to do).
        fp_model: the floating-point model ``qm`` was compiled from.
        data: denoiser input dicts recorded along FP trajectories (``stepq.calibration.collect``), at
            ``config.guidance_scale`` when the model is guided (the dicts are then [cond; uncond] calls).
        config: overrides ``qm.recipe.ptqd`` (and is recorded in the recipe); default ``PTQDConfig()``.
        scheduler: the diffusers scheduler whose ᾱ_t gives SNR^F for mixed precision (default: DDPM's).
        passes, dump: as in ``prepare``.
    """
    if not isinstance(qm, QuantizedModel):
        raise PreconditionError(f"stepq.ptqd.apply takes a QuantizedModel, got {type(qm).__name__}")
    prog = qm.program
    prog.recipe = prog.recipe.replace(ptqd=config or prog.recipe.ptqd or PTQDConfig())
    prog.state.ptqd = None  # measure the uncorrected model: the correction is the identity
    prog.state.ptqd_bits = None  # and start from every step at the top width, all-step scales
    inputs = CompileInputs(ptqd_data=data, fp_model=fp_model, ptqd_scheduler=scheduler)
    # convert's PTQD rewrites (nothing to do when convert ran them), then the ptqd phase
    run_phase(prog, "convert", only=PTQD_REWRITES, passes=passes, dump=dump)
    run_phase(prog, "ptqd", inputs, passes=passes, dump=dump)
    return qm


def ptqd_with_config(qm: QuantizedModel, config: PTQDConfig) -> QuantizedModel:
    """A copy of ``qm`` with its measured PTQD statistics applied under other flags (an ablation):
    the ptqd phase's refresh_tables re-fills the correction from the same statistics. ``config``
    is the ``PTQDConfig`` to apply (its ``mixed_bits`` must be the measured ones)."""
    prog = qm.program
    if not prog.state.has("ptqd"):
        raise PreconditionError("with_config needs a model with PTQD statistics (run stepq.ptqd.apply)")
    old = prog.recipe.ptqd
    if old is not None and tuple(old.mixed_bits) != tuple(config.mixed_bits):
        raise PreconditionError("with_config cannot change mixed_bits: the statistics were measured on the other "
                                "bit schedule")
    fields = ("shrinkage", "bandwidth", "bias_shrinkage", "gate_z")
    if old is not None and any(getattr(old, f) != getattr(config, f) for f in fields):
        raise PreconditionError(f"with_config cannot change the estimator ({', '.join(fields)}): the tables were "
                                "formed with the measured config's; re-run stepq.ptqd.apply with the new one")
    out = QuantizedModel(prog.copy())
    out.program.recipe = prog.recipe.replace(ptqd=config)
    run_phase(out.program, "ptqd", only=frozenset({"refresh_tables"}))
    return out
