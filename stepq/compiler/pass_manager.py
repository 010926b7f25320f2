"""Passes, their declared contract, and the pass manager.

A pass is a class with a ``name``, a ``contract`` and ``__call__(program) -> PassResult``; the
result counts the rewrites it applied (``modified`` is true exactly when the count is positive). A
pass only rewrites the graph: maths that decides values (calibration, fits, statistics) lives in
``stepq.calibration`` or the method's package, and writing new values into buffers a pass already
created is a step of its own.

The contract says what the pass needs and what it leaves::

    class InsertQuantizers(Pass):
        name = "insert_quantizers"
        contract = Contract(
            requires=(NodesHave(meta.LAYER_SPEC, on=quantizable_ops, what="quantizable op"),),
            produces=(OpAbsent(...),),
            preserves_semantics=False,
        )

``requires`` and ``produces`` are ``Condition`` s (node meta keys, program state fields, op kinds
present or absent, the program's stage, a recipe section). The manager checks ``requires`` before
the pass and ``produces`` after it (``PreconditionError`` / ``PostconditionError`` naming the pass
and the node), lints the graph, times the pass and, given a dump folder, writes the graph after it.
``preserves_semantics`` says whether the program's outputs are unchanged (within ``tolerance``,
relative L2) and ``idempotent`` whether a second run rewrites nothing: ``stepq.testing.check_pass``
asserts both on generated models.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch.fx

from stepq.compiler import meta
from stepq.compiler.errors import DumpError, PassError, PostconditionError, PreconditionError, StepqError
from stepq.compiler.program import Program

__all__ = [
    "DUMP_ENV",
    "CompileInputs",
    "Condition",
    "Contract",
    "NodeFilter",
    "NodeFinder",
    "NodesHave",
    "NoneLeft",
    "OpAbsent",
    "OpPresent",
    "Pass",
    "PassRecord",
    "PassResult",
    "RecipeHas",
    "Skip",
    "StageIs",
    "StateCovers",
    "StateHas",
    "Step",
    "check_conditions",
    "dump_graph",
    "lint",
    "resolve_dump",
    "run_passes",
]

log = logging.getLogger(__name__)

#: the environment variable that names a dump folder when no ``dump=`` is given.
DUMP_ENV = "STEPQ_DUMP_DIR"

NodeFilter = Callable[[torch.fx.Node], bool]
#: finds nodes of a program where a plain node filter is not enough (the recipe or the state decides).
NodeFinder = Callable[[Program], Iterable[torch.fx.Node]]


@dataclass(frozen=True)
class PassResult:
    """What a pass did: the number of rewrites, and optional details for the log."""

    count: int = 0
    details: tuple[str, ...] = ()

    @property
    def modified(self) -> bool:
        return self.count > 0


# -- conditions --------------------------------------------------------------------------------


class Condition:
    """A property of a program. ``violation`` returns None when it holds, else what breaks it
    (naming the node where there is one)."""

    def violation(self, prog: Program) -> str | None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.describe()


def _where(node: torch.fx.Node) -> str:
    layer = node.meta.get(meta.LAYER)
    return f"node {node.name!r}" + (f" (layer {layer!r})" if layer else "")


@dataclass(frozen=True)
class NodesHave(Condition):
    """Every node that ``on`` selects carries the meta key ``key`` (``what`` names those nodes)."""

    key: str
    on: NodeFilter
    what: str

    def violation(self, prog: Program) -> str | None:
        for n in prog.gm.graph.nodes:
            if self.on(n) and self.key not in n.meta:
                return f"{_where(n)} has no {self.key!r}"
        return None

    def describe(self) -> str:
        return f"every {self.what} carries {self.key!r}"


@dataclass(frozen=True)
class OpAbsent(Condition):
    """No node that ``match`` selects is left (``what`` names them)."""

    match: NodeFilter
    what: str

    def violation(self, prog: Program) -> str | None:
        for n in prog.gm.graph.nodes:
            if self.match(n):
                return f"{_where(n)} is a {self.what}"
        return None

    def describe(self) -> str:
        return f"no {self.what}"


@dataclass(frozen=True)
class OpPresent(Condition):
    """At least one node that ``match`` selects exists."""

    match: NodeFilter
    what: str

    def violation(self, prog: Program) -> str | None:
        return None if any(self.match(n) for n in prog.gm.graph.nodes) else f"the graph has no {self.what}"

    def describe(self) -> str:
        return f"a {self.what}"


@dataclass(frozen=True)
class NoneLeft(Condition):
    """``find`` yields no node (``what`` names them); for selections that depend on the program
    (its recipe or state), where ``OpAbsent``'s node filter cannot see them."""

    find: NodeFinder
    what: str

    def violation(self, prog: Program) -> str | None:
        for n in self.find(prog):
            return f"{_where(n)} is a {self.what}"
        return None

    def describe(self) -> str:
        return f"no {self.what}"


@dataclass(frozen=True)
class StateCovers(Condition):
    """Every node ``find`` yields has an entry, keyed by its quantizer name (``stepq.quantizer``), in
    the program state field ``name`` (a dict)."""

    name: str
    find: NodeFinder
    what: str

    def violation(self, prog: Program) -> str | None:
        entries = getattr(prog.state, self.name)
        for n in self.find(prog):
            key = n.meta.get(meta.ACT_QUANTIZER)
            if key not in entries:
                return f"{_where(n)} ({self.what} {key!r}) has no entry in program state {self.name!r}"
        return None

    def describe(self) -> str:
        return f"an entry in program state {self.name!r} for every {self.what}"


@dataclass(frozen=True)
class StateHas(Condition):
    """The program state field ``name`` holds something (``stepq.compiler.state.ProgramState``)."""

    name: str

    def violation(self, prog: Program) -> str | None:
        return None if prog.state.has(self.name) else f"program state {self.name!r} is empty"

    def describe(self) -> str:
        return f"program state {self.name!r}"


@dataclass(frozen=True)
class StageIs(Condition):
    """The program is at one of ``stages`` (``stepq.compiler.program.STAGES``)."""

    stages: tuple[str, ...]

    def violation(self, prog: Program) -> str | None:
        return None if prog.stage in self.stages else f"the program is at stage {prog.stage!r}"

    def describe(self) -> str:
        return "a program at stage " + " or ".join(repr(s) for s in self.stages)


@dataclass(frozen=True)
class RecipeHas(Condition):
    """The program's recipe has the section ``section`` (``tdq``, ``qat``, ``ptqd``...)."""

    section: str

    def violation(self, prog: Program) -> str | None:
        recipe = prog.recipe
        if recipe is None:
            return "the program has no recipe"
        return None if getattr(recipe, self.section, None) is not None else f"recipe {recipe.name!r} has no " \
                                                                              f"{self.section!r} section"

    def describe(self) -> str:
        return f"a recipe with a {self.section!r} section"


def check_conditions(prog: Program, conditions: Iterable[Condition]) -> list[tuple[Condition, str]]:
    """The conditions that do not hold, each with its violation."""
    out = []
    for c in conditions:
        why = c.violation(prog)
        if why is not None:
            out.append((c, why))
    return out


# -- passes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contract:
    """What a pass requires and produces, and the properties ``check_pass`` holds it to.

    ``writes``: the program state fields it may write (besides those a ``StateHas`` /
    ``StateCovers`` in ``produces`` names); ``check_pass`` fails a pass that writes any other.
    ``inplace``: the pass edits ``prog.gm`` (every built-in pass does). ``preserves_semantics``:
    the outputs are unchanged, within ``tolerance`` (relative L2; 0 = bit-identical).
    ``idempotent``: a second run reports no rewrite.
    """

    requires: tuple[Condition, ...] = ()
    produces: tuple[Condition, ...] = ()
    writes: tuple[str, ...] = ()
    preserves_semantics: bool = False
    tolerance: float = 0.0
    idempotent: bool = True
    inplace: bool = True


class Pass:
    """Base class of a graph pass: set ``name`` and ``contract``, implement ``__call__``."""

    name: ClassVar[str] = "pass"
    contract: ClassVar[Contract] = Contract()

    def __call__(self, prog: Program) -> PassResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass
class CompileInputs:
    """What the stages of one compile read besides the program: the data and the FP model.

    ``calibration``: denoiser input dicts (or argument tuples) along FP trajectories;
    ``train_data``: (inputs, ε) batches for QAT; ``fp_model``: the floating-point model (PTQD's
    reference); ``ptqd_data``: inputs for PTQD's statistics (default: ``calibration``);
    ``ptqd_scheduler``: the scheduler whose ᾱ_t gives SNR^F; ``sampling``: the FP trajectories
    EfficientDM distills along (a ``stepq.calibration.Sampling``). Steps may keep what later steps of the
    same compile read (``kept``: the bound calibration calls the TDQ fit replays; ``scratch``: a
    method's shared intermediates, e.g. PTQD's FP predictions).
    """

    calibration: Any = None
    max_batches: int | None = None
    train_data: Any = None
    fp_model: Any = None
    ptqd_data: Any = None
    ptqd_scheduler: Any = None
    sampling: Any = None
    report: bool = True
    progress: bool = True
    kept: list[dict[str, Any]] = field(default_factory=list)
    scratch: dict[str, Any] = field(default_factory=dict)


class Step:
    """Base class of a stage that computes instead of rewriting the graph: it runs the program on
    data (calibration, a fit, training, statistics) and writes program state or parameters.

    ``__call__(prog, inputs)`` returns a ``PassResult`` whose count says how much it did (batches
    seen, fit steps, buffers written); the manager checks its contract, times and dumps it like a pass.
    """

    name: ClassVar[str] = "step"
    contract: ClassVar[Contract] = Contract()

    def __call__(self, prog: Program, inputs: CompileInputs) -> PassResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass(frozen=True)
class Skip:
    """A placeholder for an optional stage the pipeline left out, with the reason (logged)."""

    name: str
    reason: str


@dataclass(frozen=True)
class PassRecord:
    """One pass the manager ran: its result, its wall time and where its dump went."""

    name: str
    result: PassResult
    seconds: float
    dump: Path | None = None


def lint(gm: torch.fx.GraphModule, after: str) -> None:
    try:
        gm.graph.lint()
    except Exception as e:
        raise PostconditionError(f"graph lint failed after pass {after!r}: {e}") from e


def _contract(p: Any) -> Contract:
    c = getattr(p, "contract", None)
    return c if isinstance(c, Contract) else Contract()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def dump_graph(prog: Program, folder: str | os.PathLike[str], name: str, result: PassResult | None = None,
               seconds: float | None = None, phase: str = "") -> Path:
    """Write the program's graph as readable text to ``folder/NNN-name.txt`` (NNN: the position of
    the pass in the program's history, so the files of one compile sort in pipeline order)."""
    root = Path(folder)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DumpError(f"cannot write the graph dump to {root}: {e}") from None
    path = root / f"{len(prog.history):03d}-{_safe(name)}.txt"
    lines = [f"# pass: {name}", f"# program stage: {prog.stage}" + (f" (running the {phase!r} phase)" if phase else ""),
             f"# recipe: {getattr(prog.recipe, 'name', None)}"]
    if result is not None:
        lines.append(f"# rewrites: {result.count}")
        lines += [f"#   {d}" for d in result.details]
    if seconds is not None:
        lines.append(f"# seconds: {seconds:.4f}")
    nodes = sum(1 for _ in prog.gm.graph.nodes)
    lines.append(f"# nodes: {nodes}")
    text = "\n".join(lines) + "\n\n" + prog.gm.print_readable(print_output=False, include_stride=False,
                                                                include_device=False)
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DumpError(f"cannot write the graph dump {path}: {e}") from None
    return path


def resolve_dump(dump: str | os.PathLike[str] | None) -> Path | None:
    """The dump folder: ``dump`` if given, else ``$STEPQ_DUMP_DIR`` if set, else none."""
    if dump is not None:
        return Path(dump)
    env = os.environ.get(DUMP_ENV)
    return Path(env) if env else None


def run_passes(prog: Program, passes: Iterable[Any], *, inputs: CompileInputs | None = None,
               dump: str | os.PathLike[str] | None = None, check: bool = True, phase: str = "") -> list[PassRecord]:
    """Run ``passes`` (and ``Step`` s, given ``inputs``) on ``prog`` in order (``Skip`` and ``None``
    are logged and left out).

    With ``check`` (the default) each pass's ``contract.requires`` is checked before it and
    ``contract.produces`` after it. ``dump`` (or ``$STEPQ_DUMP_DIR``) is a folder that receives the
    graph after every pass. Returns a ``PassRecord`` per pass that ran.
    """
    folder = resolve_dump(dump)
    done: list[str] = []
    records: list[PassRecord] = []
    prog.borrowed.check(after=None)  # the user's model changed under the program since capture
    for p in passes:
        if p is None:
            continue
        if isinstance(p, Skip):
            log.info("pass %s skipped: %s", p.name, p.reason)
            continue
        contract = _contract(p)
        if check:
            failed = check_conditions(prog, contract.requires)
            if failed:
                cond, why = failed[0]
                raise PreconditionError(f"pass {p.name!r} requires {cond.describe()}: {why}")
        start = time.perf_counter()
        try:
            result = p(prog, inputs if inputs is not None else CompileInputs()) if isinstance(p, Step) else p(prog)
        except StepqError as e:
            # a step's typed error is about its inputs (empty or non-finite data, a missing model):
            # the user catches it as it is; a pass's is a compiler failure, named with the passes before it
            if isinstance(e, PassError) or isinstance(p, Step):
                raise
            raise PassError(p.name, done, e) from e
        except Exception as e:
            raise PassError(p.name, done, e) from e
        if not isinstance(result, PassResult):
            raise PostconditionError(f"pass {p.name!r} returned {type(result).__name__}, not a PassResult")
        prog.borrowed.check(after=p.name)  # copy on write: no stage writes the user's tensors
        if result.modified:
            prog.gm.recompile()
        lint(prog.gm, p.name)
        if check:
            failed = check_conditions(prog, contract.produces)
            if failed:
                cond, why = failed[0]
                raise PostconditionError(f"pass {p.name!r} must leave {cond.describe()}: {why}")
        elapsed = time.perf_counter() - start
        log.info("pass %s: %d rewrite(s) in %.3fs", p.name, result.count, elapsed)
        path = dump_graph(prog, folder, p.name, result, elapsed, phase) if folder is not None else None
        done.append(p.name)
        prog.history.append(p.name)
        records.append(PassRecord(p.name, result, elapsed, path))
    return records

