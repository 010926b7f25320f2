"""``check_pass``: hold a pass to its contract on one program.

    report = check_pass(MyPass(), prog, inputs)

runs the pass once through the pass manager on a copy of ``prog`` (the caller's program is never
touched) and asserts, in order:

=================  ===============================================================================
requires           ``contract.requires`` hold on ``prog``; if not, ``NotApplicableError`` (the case
                   does not fit the pass: not a failure of the pass)
runs               the pass runs through ``run_passes`` (its pre- and postconditions checked there)
                   and returns a ``PassResult``
lint               the graph lints
produces           every ``contract.produces`` condition holds after the pass
fake_rerun         the graph re-runs on FakeTensors (shapes and dtypes still propagate)
honest_count       a count of 0 left graph, meta, tensors and state as they were; a positive count
                   changed one of them
inplace            a pass that is not ``inplace`` left ``prog.gm`` (graph and tensors) unchanged
untouched          the pass changed none of the program's fields but ``gm`` and ``state`` (the
                   manager appends to ``history``), and wrote only the state fields it declares
                   (``Contract.writes``, ``StateHas`` in ``produces``, or ``writes_state=``); the inputs are unchanged
finite             outputs that were finite before the pass still are
semantics          ``preserves_semantics``: outputs within ``contract.tolerance`` of the outputs
                   before (relative L2 over all output tensors; bit-identical when 0)
idempotent         ``idempotent``: a second run reports 0 rewrites and gives the same outputs
=================  ===============================================================================

A failed property raises ``PassCheckError`` (an ``AssertionError``) whose message names the pass
and the property. The outputs are computed on throwaway copies, so observers in the graph do not
record the check's inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode

from stepq.compiler.errors import PassError, PostconditionError, PreconditionError
from stepq.compiler.pass_manager import (
    Contract,
    PassResult,
    StateCovers,
    StateHas,
    check_conditions,
    run_passes,
)
from stepq.compiler.program import Program
from stepq.compiler.state import ProgramState

__all__ = ["PROPERTIES", "CheckReport", "NotApplicableError", "PassCheckError", "check_pass", "contract_of",
           "copy_program", "fake_rerun", "relative_l2"]

#: the properties ``check_pass`` asserts, in the order it asserts them.
PROPERTIES = ("requires", "runs", "lint", "produces", "fake_rerun", "honest_count", "inplace", "untouched",
              "finite", "semantics", "idempotent")

_FIELDS = ("signature", "timestep_arg", "sample_arg", "model_name", "timestep_scale", "recipe", "stage")


class PassCheckError(AssertionError):
    """A pass broke a property of its contract. ``pass_name`` and ``property`` say which."""

    def __init__(self, pass_name: str, prop: str, detail: str):
        self.pass_name = pass_name
        self.property = prop
        self.detail = detail
        super().__init__(f"pass {pass_name!r} fails {prop!r}: {detail}")


class NotApplicableError(Exception):
    """The program does not meet the pass's ``requires``: the case does not fit the pass."""

    def __init__(self, pass_name: str, condition: str, why: str):
        self.pass_name = pass_name
        super().__init__(f"check_pass: pass {pass_name!r} is not applicable to this program: it requires "
                         f"{condition}, but {why}")


@dataclass
class CheckReport:
    """What ``check_pass`` saw. ``program`` is the (copied) program after one run of the pass, ready
    for the next pass; ``error`` the relative L2 change of the outputs (None when not computed)."""

    name: str
    contract: Contract
    program: Program
    result: PassResult
    rerun: PassResult | None = None
    error: float | None = None
    checked: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        err = "n/a" if self.error is None else f"{self.error:.3g}"
        return (f"{self.name}: {self.result.count} rewrite(s), output change {err}; checked "
                f"{', '.join(self.checked)}" + "".join(f"; skipped {k} ({v})" for k, v in self.skipped.items()))


def contract_of(pass_: Any) -> Contract:
    """The pass's declared contract, or the default ``Contract()`` for a pass without one."""
    c = getattr(pass_, "contract", None)
    return c if isinstance(c, Contract) else Contract()


def copy_program(prog: Program) -> Program:
    """A copy of ``prog`` as ``stepq.prepare`` makes one: its own graph module (deep copy) and
    history, a new state whose containers are new (the statistics objects inside are shared)."""
    return prog.copy()


def fake_rerun(prog: Program, inputs: Mapping[str, Any]) -> None:
    """Re-run the graph on FakeTensors: shapes and dtypes still propagate. The graph's
    ``meta['val']`` is left as it is (an ``fx.Interpreter``, not ``FakeTensorProp``, which rewrites it)."""
    flat = prog.flat_inputs((), inputs)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in flat]
    with mode, torch.no_grad():
        torch.fx.Interpreter(prog.gm).run(*fake)


def relative_l2(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> float:
    """‖after − before‖₂ / ‖before‖₂ over all tensors together (0 when both are zero)."""
    num = sum(float((a.double() - b.double()).square().sum()) for b, a in zip(before, after))
    den = sum(float(b.double().square().sum()) for b in before)
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


# -- snapshots -----------------------------------------------------------------------------------


def _arg_form(a: Any, index: dict[torch.fx.Node, int]) -> Any:
    return pytree.tree_map(lambda x: ("%", index[x]) if isinstance(x, torch.fx.Node) else repr(x), a)


def _graph_form(gm: torch.fx.GraphModule) -> list[tuple[Any, ...]]:
    """The graph with node names erased: op, target, argument structure, stepq meta."""
    index: dict[torch.fx.Node, int] = {}
    out = []
    for i, n in enumerate(gm.graph.nodes):
        index[n] = i
        stepq_meta = tuple(sorted((k, repr(v)) for k, v in n.meta.items() if k.startswith("stepq.")))
        out.append((n.op, str(n.target), _arg_form(n.args, index), _arg_form(n.kwargs, index), stepq_meta))
    return out


def _tensors(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    out = {k: v.detach().clone() for k, v in gm.named_parameters(remove_duplicate=False)}
    out.update({k: v.detach().clone() for k, v in gm.named_buffers(remove_duplicate=False)})
    for n in gm.graph.nodes:  # tensor constants that are plain attributes
        if n.op == "get_attr" and n.target not in out:
            v = _attr(gm, str(n.target))
            if isinstance(v, torch.Tensor):
                out[str(n.target)] = v.detach().clone()
    return out


def _attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _state_ids(state: ProgramState) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ProgramState.field_names():
        v = getattr(state, name)
        if isinstance(v, dict):
            out[name] = {k: id(x) for k, x in v.items()}
        elif isinstance(v, list):
            out[name] = [id(x) for x in v]
        else:
            out[name] = None if v is None else id(v)
    return out


@dataclass
class _Snapshot:
    graph: list[tuple[Any, ...]]
    tensors: dict[str, torch.Tensor]
    modules: dict[str, str]
    state: dict[str, Any]
    fields: dict[str, Any]
    history: list[str]

    @classmethod
    def of(cls, prog: Program) -> _Snapshot:
        return cls(_graph_form(prog.gm), _tensors(prog.gm),
                   {k: type(m).__name__ for k, m in prog.gm.named_modules()}, _state_ids(prog.state),
                   {f: getattr(prog, f) for f in _FIELDS}, list(prog.history))

    def gm_changes(self, other: _Snapshot) -> list[str]:
        out = []
        if self.graph != other.graph:
            changed = sum(1 for a, b in zip(self.graph, other.graph) if a != b)
            out.append(f"the graph ({len(self.graph)} → {len(other.graph)} nodes, "
                       f"{changed + abs(len(self.graph) - len(other.graph))} differ)")
        if self.modules != other.modules:
            out.append("the submodules")
        names = sorted(set(self.tensors) ^ set(other.tensors))
        names += [k for k in self.tensors if k in other.tensors and not _same(self.tensors[k], other.tensors[k])]
        if names:
            out.append("tensors " + ", ".join(repr(n) for n in names[:5]) + (" …" if len(names) > 5 else ""))
        return out

    def state_changes(self, other: _Snapshot) -> list[str]:
        return [k for k in self.state if self.state[k] != other.state[k]]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def _calls(inputs: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    calls = [inputs] if isinstance(inputs, Mapping) else list(inputs)
    if not calls or not all(isinstance(c, Mapping) for c in calls):
        raise TypeError("check_pass: inputs must be a dict of keyword arguments or a non-empty list of them")
    return calls


def _leaves(out: Any) -> list[torch.Tensor]:
    return [x.detach().clone() for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


@torch.no_grad()
def _outputs(prog: Program, calls: Sequence[Mapping[str, Any]]) -> list[torch.Tensor]:
    # observers (call_module) would record these calls: run a copy then; function calls are pure
    stateful = any(n.op == "call_module" for n in prog.gm.graph.nodes)
    scratch = copy_program(prog) if stateful else prog
    out: list[torch.Tensor] = []
    for c in calls:
        out += _leaves(scratch(**c))
    return out


def _compare(name: str, prop: str, before: list[torch.Tensor], after: list[torch.Tensor], tol: float) -> float:
    if len(before) != len(after) or any(a.shape != b.shape for a, b in zip(before, after)):
        raise PassCheckError(name, prop, f"output shapes changed: {[tuple(b.shape) for b in before]} → "
                                         f"{[tuple(a.shape) for a in after]}")
    err = relative_l2(before, after)
    if tol == 0.0:
        if not all(torch.equal(a, b) for a, b in zip(before, after)):
            raise PassCheckError(name, prop, f"outputs are not bit-identical (relative L2 {err:.3g}, tolerance 0)")
    elif not err <= tol:
        raise PassCheckError(name, prop, f"outputs changed by relative L2 {err:.3g} > tolerance {tol:g}")
    return err


# -- the check -----------------------------------------------------------------------------------


def _run(name: str, prog: Program, pass_: Any) -> PassResult:
    try:
        return run_passes(prog, [pass_])[0].result
    except PreconditionError as e:
        raise PassCheckError(name, "requires", str(e)) from e
    except PassError as e:
        raise PassCheckError(name, "runs", f"the pass raised: {e}") from e
    except PostconditionError as e:
        text = str(e)
        prop = "lint" if "lint" in text else "produces" if "must leave" in text else "runs"
        raise PassCheckError(name, prop, text) from e


def check_pass(pass_: Any, prog: Program, inputs: Mapping[str, Any] | Iterable[Mapping[str, Any]], *,
               tolerance: float | None = None, writes_state: Iterable[str] = (), fake: bool = True
               ) -> CheckReport:
    """Assert ``pass_``'s contract on ``prog`` (see the module docstring for the properties).

    Args:
        pass_: the pass (a ``stepq.compiler.pass_manager.Pass``, or anything with ``name`` and
            ``__call__(prog) -> PassResult``; without a ``contract``, the default ``Contract()``).
        prog: a program at the point of the pipeline where the pass runs. Not modified.
        inputs: one call (a dict of keyword arguments) or a list of calls to compare outputs on.
        tolerance: overrides ``contract.tolerance`` for the semantics check.
        writes_state: program state fields the pass may write besides the ``StateHas`` ones in
            ``contract.produces``.
        fake: re-run the graph on FakeTensors after the pass.

    Raises:
        NotApplicableError: ``contract.requires`` does not hold on ``prog``.
        PassCheckError: a property failed (the message names the pass and the property).
    """
    name = str(getattr(pass_, "name", type(pass_).__name__))
    contract = contract_of(pass_)
    failed = check_conditions(prog, contract.requires)
    if failed:
        cond, why = failed[0]
        raise NotApplicableError(name, cond.describe(), why)
    calls = _calls(inputs)
    tol = contract.tolerance if tolerance is None else tolerance
    checked: list[str] = ["requires"]
    skipped: dict[str, str] = {}
    caller = _Snapshot.of(prog)
    given = [pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, dict(c)) for c in calls]

    work = copy_program(prog)
    before = _Snapshot.of(work)
    outs_before = _outputs(work, calls)
    result = _run(name, work, pass_)
    checked += ["runs", "lint", "produces"]
    try:
        work.gm.graph.lint()
    except Exception as e:
        raise PassCheckError(name, "lint", str(e)) from e
    failed = check_conditions(work, contract.produces)
    if failed:
        cond, why = failed[0]
        raise PassCheckError(name, "produces", f"must leave {cond.describe()}: {why}")

    if fake:
        try:
            fake_rerun(work, calls[0])
        except Exception as e:
            raise PassCheckError(name, "fake_rerun", f"the graph does not re-run on FakeTensors: "
                                                     f"{type(e).__name__}: {e}") from e
        checked.append("fake_rerun")
    else:
        skipped["fake_rerun"] = "fake=False"

    after = _Snapshot.of(work)
    gm_changes, state_changes = before.gm_changes(after), before.state_changes(after)
    if result.count == 0 and (gm_changes or state_changes):
        what = gm_changes + [f"program state {s!r}" for s in state_changes]
        raise PassCheckError(name, "honest_count", "it reported 0 rewrites but changed " + "; ".join(what))
    if result.count > 0 and not gm_changes and not state_changes:
        raise PassCheckError(name, "honest_count", f"it reported {result.count} rewrite(s) but changed nothing")
    checked.append("honest_count")
    if not contract.inplace:
        if gm_changes:
            raise PassCheckError(name, "inplace", "the contract says inplace=False but the pass changed "
                                 + "; ".join(gm_changes))
        checked.append("inplace")
    else:
        skipped["inplace"] = "the contract says inplace=True"

    allowed = ({c.name for c in contract.produces if isinstance(c, (StateHas, StateCovers))}
               | set(contract.writes) | set(writes_state))
    moved = [f for f in _FIELDS if getattr(work, f) is not before.fields[f]]
    if moved:
        raise PassCheckError(name, "untouched", f"the pass changed the program's {', '.join(moved)}")
    if work.history != before.history + [name]:
        raise PassCheckError(name, "untouched", f"the program's history became {work.history} "
                                                f"(was {before.history})")
    undeclared = [s for s in state_changes if s not in allowed]
    if undeclared:
        raise PassCheckError(name, "untouched", f"it wrote program state {', '.join(map(repr, undeclared))}, "
                             "which its contract does not declare (Contract(writes=...) or StateHas(...) in produces)")
    for c, g in zip(calls, given):
        if any(isinstance(v, torch.Tensor) and not _same(v, g[k]) for k, v in c.items()):
            raise PassCheckError(name, "untouched", "the pass changed the caller's input tensors")
    if caller.gm_changes(_Snapshot.of(prog)) or caller.state != _Snapshot.of(prog).state:
        raise PassCheckError(name, "untouched", "the caller's program changed (it must only be read)")
    checked.append("untouched")

    outs_after = _outputs(work, calls)
    if all(bool(torch.isfinite(o).all()) for o in outs_before if o.is_floating_point()):
        bad = [i for i, o in enumerate(outs_after) if o.is_floating_point() and not bool(torch.isfinite(o).all())]
        if bad:
            raise PassCheckError(name, "finite", f"output(s) {bad} became non-finite")
        checked.append("finite")
    try:
        error: float | None = relative_l2(outs_before, outs_after)
    except RuntimeError:
        error = None
    if contract.preserves_semantics:
        error = _compare(name, "semantics", outs_before, outs_after, tol)
        checked.append("semantics")
    else:
        skipped["semantics"] = "the contract does not preserve semantics"

    rerun = None
    if contract.idempotent:
        again = copy_program(work)
        again_before = _Snapshot.of(again)
        rerun = _run(name, again, pass_)
        if rerun.count != 0:
            raise PassCheckError(name, "idempotent", f"a second run reported {rerun.count} rewrite(s)"
                                 + (f": {'; '.join(rerun.details)}" if rerun.details else ""))
        changes = again_before.gm_changes(_Snapshot.of(again))
        if changes:
            raise PassCheckError(name, "idempotent", "a second run reported 0 rewrites but changed "
                                 + "; ".join(changes))
        _compare(name, "idempotent", outs_after, _outputs(again, calls), 0.0)
        checked.append("idempotent")
    else:
        skipped["idempotent"] = "the contract says idempotent=False"
    return CheckReport(name, contract, work, result, rerun, error, tuple(checked), skipped)
