"""Programs at a named point of the pipeline, and the whole pipeline under ``check_pass``.

    prog = program_at(captured, "w8a8", calibration, after="annotate_layers")
    check_pass(MyPass(), prog, inputs)

    reports = check_pipeline(captured, recipe, calibration, inputs)   # every pass the recipe runs

Both walk the stages exactly as ``stepq.prepare`` / ``calibrate`` / ``convert`` do (the passes of
``stepq.compiler.pipeline`` in order; between prepare's and calibrate's passes the calibration data
runs through the observers, after calibrate's passes a TDQ recipe fits its scale source), one pass
at a time. Convert's per-layer report is left out: it is not a pass. Point names are pass names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from stepq.compiler.pass_manager import Skip, run_passes
from stepq.compiler.pipeline import build_calibration_pipeline, build_convert_pipeline, build_pipeline
from stepq.compiler.program import Program
from stepq.methods.tdq.fit import fit_scale_source
from stepq.passes.materialize_quantizers import observer_nodes
from stepq.recipe.presets import get_preset
from stepq.recipe.specs import Recipe
from stepq.testing.check import CheckReport, check_pass, copy_program

__all__ = ["check_pipeline", "pipeline_names", "program_at", "walk_pipeline"]

Visit = Callable[[Any, Program], Program]


def _recipe(recipe: str | Recipe) -> Recipe:
    return get_preset(recipe) if isinstance(recipe, str) else recipe


def pipeline_names(recipe: str | Recipe) -> list[str]:
    """The names of the passes ``recipe`` runs, in order (the points ``program_at`` takes)."""
    r = _recipe(recipe)
    return [p.name for stage in (build_pipeline(r), build_calibration_pipeline(r), build_convert_pipeline(r))
            for p in stage if p is not None and not isinstance(p, Skip)]


def walk_pipeline(prog: Program, recipe: str | Recipe, calibration: Iterable[Mapping[str, Any]],
                  visit: Visit | None = None) -> Program:
    """Run every stage of ``recipe`` on a copy of the captured ``prog``; each pass goes through
    ``visit(pass, program) -> program`` (default: ``run_passes``), whose result the walk continues
    with. Returns the converted program."""
    if prog.stage != "captured":
        raise ValueError(f"walk_pipeline starts from a captured program, got one at stage {prog.stage!r}")
    r = _recipe(recipe)
    calls = list(calibration)
    if not calls:
        raise ValueError("walk_pipeline needs calibration data: a non-empty list of input dicts")

    def default(p: Any, q: Program) -> Program:
        run_passes(q, [p])
        return q

    step = visit or default

    def stage(passes: list[Any], q: Program) -> Program:
        for p in passes:
            if p is not None and not isinstance(p, Skip):
                q = step(p, q)
        return q

    prog = copy_program(prog)
    prog.recipe = r
    prog = stage(build_pipeline(r), prog)
    prog.advance("prepared")
    with torch.no_grad():
        if observer_nodes(prog.gm):
            for c in calls:
                prog(**c)
    prog.state.report_batch = prog.bind((), calls[0])
    prog = stage(build_calibration_pipeline(r), prog)
    if r.tdq is not None and r.qat is None and r.tdq.fit_steps > 0:  # as stepq.calibrate does
        cfg = r.tdq
        prog.state.fit_curve = fit_scale_source(
            prog, [prog.bind((), c) for c in calls], steps=cfg.fit_steps, lr=cfg.fit_lr, batch=cfg.fit_batch,
            rows=cfg.fit_rows, seed=cfg.seed, time_budget_s=cfg.time_budget_s, objective=cfg.fit_objective,
            progress=False)
    prog.advance("calibrated")
    prog = stage(build_convert_pipeline(r), prog)
    prog.state.report_batch = None
    prog.advance("converted")
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
