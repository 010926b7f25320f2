"""The whole pipeline: every stage of every recipe, in order, in one function.

    capture → prepare → calibrate → train → convert → ptqd → lower (a backend)

``build_pipeline(recipe)`` lists the stages; a stage is a graph pass (``Pass``: a rewrite), a
``Step`` (maths on data: calibration, a fit, training, statistics) or a ``Skip`` that says why a
recipe leaves it out. ``stepq.prepare`` / ``calibrate`` / ``train`` / ``convert`` and
``stepq.ptqd.apply`` each run the stages of their phase (``run_phase``); nothing else lists passes.
A user's pass goes in at a named point with ``At`` (``passes=[At(MyPass(), after="insert_quantizers")]``
on any of those calls, docs/PASSES.md).

This module and ``stepq.compiler.api`` are the drivers: the only compiler modules that import
passes, methods and the artefact (tests/test_layering.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stepq.artifact.report import Report
from stepq.calibration.observe import Observe
from stepq.compiler.errors import RecipeError
from stepq.compiler.pass_manager import CompileInputs, Pass, PassRecord, Skip, Step, resolve_dump, run_passes
from stepq.compiler.program import Program
from stepq.methods.efficientdm import DistillQALoRA, LoRADelta, make_temporal_steps
from stepq.methods.ptqd.mixed import CalibrateWidths
from stepq.methods.ptqd.steps import ChooseBits, MeasureNoise
from stepq.methods.qat import TrainQAT
from stepq.methods.tdq import FitScaleSource
from stepq.methods.tdq.sources import make_scale_source
from stepq.methods.terdit import TrainTernary
from stepq.passes import (
    AnnotateLayers,
    AttachTimestepTables,
    CanonicalizeExport,
    CorrectNoise,
    FoldLoRA,
    FoldUserLoRA,
    FreezeScaleSource,
    InsertLoRA,
    InsertQuantizers,
    InsertRMSNorm,
    InsertScaleSource,
    MaterializeQuantizers,
    QuantizeWeights,
    RefreshTables,
    SelectBits,
)
from stepq.recipe.presets import get_preset
from stepq.recipe.specs import Recipe

__all__ = ["PHASES", "PTQD_REWRITES", "At", "Stage", "build_pipeline", "run_phase"]

#: the phases, in order; each public step of the API runs one.
PHASES = ("prepare", "calibrate", "train", "convert", "ptqd")
#: convert's PTQD stages, which ``stepq.ptqd.apply`` also runs on a model converted without them
PTQD_REWRITES = frozenset({"calibrate_widths", "select_bits", "correct_noise"})


@dataclass(frozen=True)
class Stage:
    """One line of the pipeline: the phase it belongs to and what runs."""

    phase: str
    item: Pass | Step | Skip

    @property
    def name(self) -> str:
        return self.item.name


@dataclass(frozen=True)
class At:
    """A user's pass (or step) put into the pipeline right ``after`` or ``before`` the stage of that
    name; it runs in that stage's phase. ``At(MyPass(), after="annotate_layers")``.

    ``item``: a ``Pass`` or ``Step`` (a callable with a string ``name``); give exactly one of
    ``after`` and ``before``."""

    item: Pass | Step
    after: str | None = None
    before: str | None = None

    def __post_init__(self) -> None:
        if (self.after is None) == (self.before is None):
            raise RecipeError(f"At({self.item!r}): give exactly one of after= or before=")
        if not callable(self.item) or not isinstance(getattr(self.item, "name", None), str):
            raise RecipeError(f"At: {self.item!r} is not a pass (a callable with a string `name`)")

    @property
    def anchor(self) -> str:
        return self.after if self.after is not None else self.before  # type: ignore[return-value]


def build_pipeline(recipe: Recipe | str, passes: Sequence[At] = ()) -> list[Stage]:
    """Every stage for ``recipe`` (a Recipe or a preset name), in order, with the user's passes spliced in."""
    if isinstance(recipe, str):
        recipe = get_preset(recipe)
    tdq, qat, ptqd, qalora = recipe.tdq, recipe.qat, recipe.ptqd, recipe.qalora
    talsq = qalora is not None and qalora.talsq
    mixed = ptqd is not None and bool(ptqd.mixed_bits)
    fit = tdq is not None and qat is None and tdq.fit_steps > 0
    no_tdq, no_ptqd = "the recipe has no TDQ section", "the recipe has no PTQD section"
    no_mixed = "the recipe has no PTQD mixed precision"
    no_qalora = "the recipe has no QALoRA section"
    stages = [
        # prepare: canonical form, policy (the recipe annotates every quantizable op), mechanism
        Stage("prepare", CanonicalizeExport()),
        # a user's LoRA (PEFT, diffusers load_lora_weights) folded into the base weights before anything quantizes
        Stage("prepare", FoldUserLoRA()),
        Stage("prepare", AnnotateLayers(recipe)),
        Stage("prepare", InsertQuantizers() if recipe.quantizes_anything
              else Skip("insert_quantizers", "the recipe keeps every layer in floating point")),
        # TerDiT: an RMSNorm after every block's adaLN modulation linear, found by dataflow
        Stage("prepare", InsertRMSNorm(recipe.terdit.rmsnorm_eps) if recipe.terdit is not None and recipe.terdit.rmsnorm
              else Skip("insert_rmsnorm", "the recipe has no TerDiT section with rmsnorm")),
        # calibrate: the observers see FP-trajectory data, then become fake-quant ops with frozen scales
        Stage("calibrate", Observe(keep_calls=fit)),
        Stage("calibrate", MaterializeQuantizers()),
        # TDQ: step sizes from a scale source of t (generators, or a free per-step table), fitted in PTQ
        # EfficientDM's TALSQ: a free step and zero point per timestep, learned in the distillation
        Stage("calibrate", InsertScaleSource(make_scale_source) if tdq is not None
              else InsertScaleSource(make_temporal_steps) if talsq
              else Skip("insert_scale_source", no_tdq if qalora is None else "QALoRAConfig.talsq is False")),
        Stage("calibrate", FitScaleSource() if fit else Skip(
            "fit_scale_source", no_tdq if tdq is None else "the recipe trains (QAT)" if qat is not None
            else "TDQConfig.fit_steps is 0")),
        # EfficientDM: a LoRA adapter per selected layer, trained through its weight quantizer
        Stage("calibrate", InsertLoRA(LoRADelta) if qalora is not None else Skip("insert_lora", no_qalora)),
        # train: LSQ quantization-aware training on the denoising loss
        Stage("train", TrainQAT() if qat is not None and recipe.terdit is None
              else Skip("train_qat", "the recipe has no QAT section" if qat is None else "TerDiT trains its own loop")),
        # TerDiT: ternary QAT on the denoising loss (the recipe's qat section gives steps and rates)
        Stage("train", TrainTernary() if qat is not None and recipe.terdit is not None
              else Skip("train_ternary", "the recipe has no TerDiT section with QAT")),
        # EfficientDM: distillation from the FP model along its own trajectories
        Stage("train", DistillQALoRA() if qalora is not None else Skip("distill_qalora", no_qalora)),
        # convert: the adapters merged into the weights, the per-layer report, frozen tables, integer weights
        Stage("convert", FoldLoRA() if qalora is not None else Skip("fold_lora", no_qalora)),
        Stage("convert", Report()),
        Stage("convert", FreezeScaleSource() if tdq is not None or talsq else Skip("freeze_scale_source", no_tdq)),
        Stage("convert", AttachTimestepTables()),
        # PTQD: the bit switch (a branch per activation width, picked by a bits table gathered by t) and
        # the correction (ε̂ − b_t)/(1 + k_t), both the identity until the ptqd phase fills their tables
        Stage("convert", CalibrateWidths() if mixed else Skip("calibrate_widths", no_mixed)),
        Stage("convert", SelectBits() if mixed else Skip("select_bits", no_mixed)),
        Stage("convert", CorrectNoise() if ptqd is not None else Skip("correct_noise", no_ptqd)),
        Stage("convert", QuantizeWeights()),
        # ptqd: statistics against the FP model choose the bits and fill the correction tables
        Stage("ptqd", RefreshTables() if ptqd is not None else Skip("refresh_tables", no_ptqd)),
        # step-aware mixed precision: SNR^Q per width vs SNR^F chooses the bits; each lower width is
        # recalibrated on the steps that run at it
        Stage("ptqd", ChooseBits() if mixed else Skip("choose_bits", no_mixed)),
        Stage("ptqd", CalibrateWidths() if mixed else Skip("calibrate_widths", no_mixed)),
        Stage("ptqd", RefreshTables() if mixed else Skip("refresh_tables", no_mixed)),
        # the noise correction: k_t, b_t, σ_q(t) of the (mixed) model fill the correction tables
        Stage("ptqd", MeasureNoise() if ptqd is not None else Skip("measure_noise", no_ptqd)),
        Stage("ptqd", RefreshTables() if ptqd is not None else Skip("refresh_tables", no_ptqd)),
    ]
    return _splice(stages, passes)


def _splice(stages: list[Stage], passes: Sequence[At]) -> list[Stage]:
    out = list(stages)
    for at in passes:
        if not isinstance(at, At):
            raise RecipeError(f"passes= takes stepq.At(...) entries, got {type(at).__name__}")
        hits = [i for i, s in enumerate(out) if s.name == at.anchor]
        if not hits:
            names = ", ".join(dict.fromkeys(s.name for s in out))
            raise RecipeError(f"At({at.item!r}): no stage {at.anchor!r} in the pipeline; the stages are {names}")
        i = hits[-1] + 1 if at.after is not None else hits[0]
        out.insert(i, Stage(out[hits[0]].phase, at.item))
    return out


def run_phase(prog: Program, phase: str, inputs: CompileInputs | None = None, *, passes: Sequence[At] = (),
              only: frozenset[str] | None = None, dump: str | os.PathLike[str] | None = None) -> list[PassRecord]:
    """Run the stages of ``phase`` of ``prog``'s recipe on ``prog`` (in place); ``only``: just the
    stages of those names (in the pipeline's order), e.g. refresh_tables to re-fill tables."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; the phases are {', '.join(PHASES)}")
    items = [s.item for s in build_pipeline(prog.recipe, passes) if s.phase == phase
             and (only is None or s.name in only)]
    records = run_passes(prog, items, inputs=inputs, dump=dump, phase=phase)
    folder = resolve_dump(dump)
    if folder is not None:
        _index(folder, phase, items, records)
    return records


def _index(folder: Path, phase: str, items: list[Pass | Step | Skip], records: list[PassRecord]) -> None:
    """Append the phase's stages to ``folder/index.txt``: what ran (rewrites, seconds, its dump
    file) and what was skipped, with the reason."""
    done = iter(records)
    lines = []
    for item in items:
        if isinstance(item, Skip):
            lines.append(f"{phase:9s} {item.name:24s} skipped: {item.reason}")
            continue
        rec = next(done)
        file = rec.dump.name if rec.dump is not None else "-"
        what = "done" if isinstance(item, Step) else "rewrite(s)"
        lines.append(f"{phase:9s} {rec.name:24s} {rec.result.count:6d} {what:10s} {rec.seconds:9.3f}s  {file}")
    with open(folder / "index.txt", "a") as f:
        f.write("\n".join(lines) + "\n")
