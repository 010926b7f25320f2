"""Passes and the pass manager.

A pass is a callable ``(program) -> PassResult``; the result counts the rewrites it applied, and
``modified`` is true exactly when that count is positive. The manager runs passes in order, lints
the graph after each one, logs what happened (and why an optional pass was skipped), and wraps a
failure in ``PassError`` naming the pass and the ones before it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch.fx

from stepq.compiler.errors import PassError, PostconditionError, StepqError
from stepq.compiler.program import Program

__all__ = ["Pass", "PassResult", "Skip", "lint", "run_passes"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassResult:
    """What a pass did: the number of rewrites, and optional details for the log."""

    count: int = 0
    details: tuple[str, ...] = ()

    @property
    def modified(self) -> bool:
        return self.count > 0


class Pass(Protocol):
    name: str

    def __call__(self, prog: Program) -> PassResult: ...


@dataclass(frozen=True)
class Skip:
    """A placeholder for an optional pass the pipeline left out, with the reason (logged)."""

    name: str
    reason: str


def lint(gm: torch.fx.GraphModule, after: str) -> None:
    try:
        gm.graph.lint()
    except Exception as e:
        raise PostconditionError(f"graph lint failed after pass {after!r}: {e}") from e


def run_passes(prog: Program, passes: Iterable[Pass | Skip | None]) -> list[tuple[str, PassResult]]:
    """Run ``passes`` on ``prog`` in order; returns (name, result) for each pass that ran."""
    done: list[str] = []
    results: list[tuple[str, PassResult]] = []
    for p in passes:
        if p is None:
            continue
        if isinstance(p, Skip):
            log.info("pass %s skipped: %s", p.name, p.reason)
            continue
        start = time.perf_counter()
        try:
            result = p(prog)
        except StepqError as e:
            if isinstance(e, PassError):
                raise
            raise PassError(p.name, done, e) from e
        except Exception as e:
            raise PassError(p.name, done, e) from e
        if result.modified:
            prog.gm.recompile()
        lint(prog.gm, p.name)
        elapsed = time.perf_counter() - start
        log.info("pass %s: %d rewrite(s) in %.3fs", p.name, result.count, elapsed)
        done.append(p.name)
        prog.history.append(p.name)
        results.append((p.name, result))
    return results
