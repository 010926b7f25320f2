"""Programs at a named point of the pipeline, and the whole pipeline under ``check_pass``.

    prog = program_at(captured, "w8a8", calibration, after="annotate_layers")
    check_pass(MyPass(), prog, inputs)

    reports = check_pipeline(captured, recipe, calibration, inputs)   # every pass the recipe runs

Both walk the stages of ``stepq.build_pipeline(recipe)`` in order, exactly as ``stepq.prepare`` /
``calibrate`` / ``train`` / ``convert`` run them, one stage at a time: passes go through ``visit``,
steps (observe, the TDQ fit, QAT, the report, PTQD's statistics) run as the pipeline runs them. The
"train" phase needs ``train_data`` and the "ptqd" phase the FP model; without them the walk stops
before the phase that needs them. Point names are pass names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from stepq.compiler.pass_manager import CompileInputs, Skip, Step, run_passes
from stepq.compiler.pipeline import build_pipeline
from stepq.compiler.program import Program
from stepq.recipe.presets import get_preset
from stepq.recipe.specs import Recipe
from stepq.testing.check import CheckReport, check_pass, copy_program

__all__ = ["check_pipeline", "pipeline_names", "program_at", "walk_pipeline"]

Visit = Callable[[Any, Program], Program]

#: the program's stage once a phase is done (phases not listed leave the stage as it is).
_ADVANCE = {"prepare": "prepared", "calibrate": "calibrated", "convert": "converted"}


def _recipe(recipe: str | Recipe) -> Recipe:
    return get_preset(recipe) if isinstance(recipe, str) else recipe


def _phases(r: Recipe, train_data: Any, fp_model: Any, sampling: Any = None) -> set[str]:
    """The phases a walk runs: a QAT recipe without training data stops after calibrate, a QALoRA
    recipe without a teacher (``fp_model`` and ``sampling``) converts untrained adapters, the ptqd
    phase needs the FP model."""
    if r.qat is not None and train_data is None:
        return {"prepare", "calibrate"}
    if r.qalora is not None and (fp_model is None or sampling is None):
        return {"prepare", "calibrate", "convert"} | ({"ptqd"} if fp_model is not None else set())
    return {"prepare", "calibrate", "train", "convert"} | ({"ptqd"} if fp_model is not None else set())


def pipeline_names(recipe: str | Recipe, *, train_data: Any = None, fp_model: Any = None,
                   sampling: Any = None) -> list[str]:
    """The names of the passes ``recipe`` runs, in order (the points ``program_at`` takes)."""
    r = _recipe(recipe)
    walked = _phases(r, train_data, fp_model, sampling)
    return [s.name for s in build_pipeline(r) if s.phase in walked and not isinstance(s.item, (Skip, Step))]


def walk_pipeline(prog: Program, recipe: str | Recipe, calibration: Iterable[Mapping[str, Any]],
                  visit: Visit | None = None, *, train_data: Any = None, fp_model: Any = None,
                  sampling: Any = None) -> Program:
    """Run every stage of ``recipe`` on a copy of the captured ``prog``; each pass goes through
    ``visit(pass, program) -> program`` (default: ``run_passes``), whose result the walk continues
    with. Returns the program after the last phase it could run (converted, unless a QAT recipe
    came without ``train_data``). A QALoRA recipe trains with ``fp_model`` and ``sampling`` (the
    teacher's trajectories) and is converted with untrained adapters without them."""
    if prog.stage != "captured":
        raise ValueError(f"walk_pipeline starts from a captured program, got one at stage {prog.stage!r}")
    r = _recipe(recipe)
    calls = list(calibration)
    if not calls:
        raise ValueError("walk_pipeline needs calibration data: a non-empty list of input dicts")
    inputs = CompileInputs(calibration=calls, train_data=train_data, fp_model=fp_model, sampling=sampling,
                           progress=False)

    def default(p: Any, q: Program) -> Program:
        run_passes(q, [p])
        return q

    step = visit or default
    prog = copy_program(prog)
    prog.recipe = r
    stages = build_pipeline(r)
    walked = _phases(r, train_data, fp_model, sampling)
    for i, stage in enumerate(stages):
        if stage.phase not in walked:
            continue
        if isinstance(stage.item, Step):
            run_passes(prog, [stage.item], inputs=inputs)
        elif not isinstance(stage.item, Skip):
            prog = step(stage.item, prog)
        last_of_phase = i + 1 == len(stages) or stages[i + 1].phase != stage.phase
        if last_of_phase and stage.phase in _ADVANCE:
            prog.advance(_ADVANCE[stage.phase])
            if stage.phase == "convert":
                prog.state.report_batch = None
    return prog


class _Stop(Exception):
    def __init__(self, prog: Program):
        self.prog = prog


def program_at(prog: Program, recipe: str | Recipe, calibration: Iterable[Mapping[str, Any]], *,
               before: str | None = None, after: str | None = None) -> Program:
    """The program just ``before`` or just ``after`` the named pass of ``recipe``'s pipeline
    (a copy: ``prog``, a captured program, is not modified)."""
    if (before is None) == (after is None):
        raise ValueError("program_at takes exactly one of before= and after=")
    point = before or after
    names = pipeline_names(recipe)
    if point not in names:
        raise ValueError(f"{point!r} is not a pass of recipe {_recipe(recipe).name!r}'s pipeline; its passes: "
                         f"{', '.join(names)}")

    def visit(p: Any, q: Program) -> Program:
        if p.name == before:
            raise _Stop(q)
        run_passes(q, [p])
        if p.name == after:
            raise _Stop(q)
        return q

    try:
        walk_pipeline(prog, recipe, calibration, visit)
    except _Stop as s:
        return s.prog
    raise AssertionError("unreachable: the point is in the pipeline")


def check_pipeline(prog: Program, recipe: str | Recipe, calibration: Iterable[Mapping[str, Any]],
                   inputs: Mapping[str, Any] | Iterable[Mapping[str, Any]], *,
                   writes_state: Mapping[str, Iterable[str]] | None = None, **kwargs: Any) -> list[CheckReport]:
    """``check_pass`` on every pass ``recipe`` runs, each on the program the passes before it left.
    ``writes_state`` maps a pass name to the state fields it may write; other keyword arguments go
    to ``check_pass``."""
    reports: list[CheckReport] = []
    allowed = writes_state or {}
    calls = [inputs] if isinstance(inputs, Mapping) else list(inputs)

    def visit(p: Any, q: Program) -> Program:
        rep = check_pass(p, q, calls, writes_state=allowed.get(p.name, ()), **kwargs)
        reports.append(rep)
        return rep.program

    walk_pipeline(prog, recipe, calibration, visit)
    return reports
