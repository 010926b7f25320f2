"""The backend contract: tag, then lower.

A backend first *partitions* a converted graph: its partitioner walks the nodes it cares about
(its anchors), tries the rows of an explicit placement table in order and tags each node with the
first row that takes it (``node.meta[meta.BACKEND_TAG] = "<backend>:<placement>"``). A node that no
row takes stays as it is and the reasons every row gave are recorded (a ``Rejection``, logged);
``strict=True`` raises one ``UnsupportedNodesError`` that lists every such node. A separate,
stateless *lowering* step then rewrites only the tagged nodes.

Partitioning always works on the backend's own copy of the graph: a ``QuantizedModel`` is never
modified by a backend.

A whole backend (``Backend``, below) is partition → lower → export / load; ``stepq.backends.table``
lists them by name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch.fx

from stepq.compiler import meta
from stepq.compiler.errors import StepqError

if TYPE_CHECKING:
    from stepq.artifact.quantized_model import QuantizedModel

__all__ = [
    "Backend",
    "Exported",
    "Lowered",
    "PartitionResult",
    "Partitioner",
    "Placement",
    "Rejection",
    "UnsupportedNodesError",
    "placement_of",
]

log = logging.getLogger(__name__)

#: a placement's matcher: ``None`` when it takes the node, else the reason it does not.
Matcher = Callable[[torch.fx.Node], "str | None"]


@dataclass(frozen=True)
class Placement:
    """One row of a backend's placement table.

    ``anchors`` are the call targets the row can take; ``kernel`` says what the node becomes;
    ``integer`` whether that runs as an integer kernel (the point of quantizing).
    """

    name: str
    anchors: frozenset[object]
    match: Matcher
    kernel: str
    integer: bool
    description: str = ""


@dataclass(frozen=True)
class Rejection:
    """A node no placement took, with every row's reason."""

    node: str
    target: str
    layer: str | None
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        where = f" ({self.layer})" if self.layer else ""
        return f"{self.node}{where} [{self.target}]: " + "; ".join(self.reasons)


@dataclass
class PartitionResult:
    """What a partitioner tagged (node name → placement name) and what it left alone."""

    backend: str
    tags: dict[str, str] = field(default_factory=dict)
    rejections: list[Rejection] = field(default_factory=list)

    def count(self, placement: str) -> int:
        return sum(1 for p in self.tags.values() if p == placement)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.tags.values():
            out[p] = out.get(p, 0) + 1
        return out

    def summary(self) -> str:
        tagged = ", ".join(f"{k} {v}" for k, v in sorted(self.counts().items())) or "nothing"
        text = f"{self.backend}: tagged {tagged}"
        if self.rejections:
            text += f"; {len(self.rejections)} left as they are:\n  " + "\n  ".join(map(str, self.rejections))
        return text


class UnsupportedNodesError(StepqError):
    """Strict partitioning found nodes the backend cannot take; lists all of them."""

    def __init__(self, backend: str, rejections: Sequence[Rejection]):
        lines = "\n  ".join(map(str, rejections))
        super().__init__(f"backend {backend!r} cannot take {len(rejections)} node(s):\n  {lines}")
        self.backend = backend
        self.rejections = list(rejections)


def _target_name(node: torch.fx.Node) -> str:
    t = node.target
    return str(getattr(t, "__name__", t)) if not isinstance(t, str) else t


class Partitioner:
    """Tags nodes from an explicit placement table (first matching row wins).

    Subclasses (or callers) give ``backend`` and ``table``. ``must_take`` decides which anchored
    nodes count as rejections when no row takes them (by default: all of them).
    """

    def __init__(self, backend: str, table: Sequence[Placement]):
        self.backend = backend
        self.table = tuple(table)
        self._anchors: frozenset[object] = frozenset().union(*(p.anchors for p in self.table))

    def candidates(self, gm: torch.fx.GraphModule) -> Iterable[torch.fx.Node]:
        return (n for n in gm.graph.nodes if n.op == "call_function" and n.target in self._anchors)

    def must_take(self, node: torch.fx.Node) -> bool:
        return True

    def partition(self, gm: torch.fx.GraphModule, *, strict: bool = False) -> PartitionResult:
        result = PartitionResult(self.backend)
        for node in self.candidates(gm):
            node.meta.pop(meta.BACKEND_TAG, None)
            reasons = []
            for row in self.table:
                if node.target not in row.anchors:
                    continue
                why = row.match(node)
                if why is None:
                    node.meta[meta.BACKEND_TAG] = f"{self.backend}:{row.name}"
                    result.tags[node.name] = row.name
                    break
                reasons.append(f"{row.name}: {why}")
            else:
                if self.must_take(node):
                    rej = Rejection(node.name, _target_name(node), node.meta.get(meta.LAYER), tuple(reasons))
                    result.rejections.append(rej)
                    log.info("%s leaves %s", self.backend, rej)
        if result.rejections and strict:
            raise UnsupportedNodesError(self.backend, result.rejections)
        return result


def placement_of(node: torch.fx.Node, backend: str) -> str | None:
    """The placement a partitioner of ``backend`` tagged ``node`` with, if any."""
    tag = node.meta.get(meta.BACKEND_TAG)
    if isinstance(tag, str) and tag.startswith(backend + ":"):
        return tag.split(":", 1)[1]
    return None


# -- the backend protocol ----------------------------------------------------------------------------


@dataclass
class Lowered:
    """A backend's lowered copy of a converted graph: ``partition`` tagged it, the lowering rewrote
    the tagged nodes into the backend's ops (``counts``: rewrites per placement). ``gm`` still runs
    in PyTorch, every backend op having a PyTorch implementation of its semantics, so a lowering is
    tested against the reference backend without the backend's runtime."""

    backend: str
    gm: torch.fx.GraphModule
    partition: PartitionResult
    counts: dict[str, int] = field(default_factory=dict)


@runtime_checkable
class Exported(Protocol):
    """What ``Backend.export`` returns: where the artefact is, what the partition took, a summary."""

    path: Path
    partition: PartitionResult

    def summary(self) -> str: ...


@runtime_checkable
class Backend(Protocol):
    """One deployment target of a QuantizedModel: tag, then lower, then write and run.

    * ``table``: the placement table (data: what the backend takes, as ``Placement`` rows);
    * ``partition(qm)``: tag a copy of ``qm``'s graph from ``table`` (``Partitioner``); the
      QuantizedModel is never modified; ``strict=True`` raises ``UnsupportedNodesError``;
    * ``lower(qm)``: partition a copy and rewrite the tagged nodes into the backend's ops;
    * ``export(qm, path, **options)``: lower and write the backend's artefact at ``path``;
    * ``load(path, **options)``: the written artefact as a callable with ``qm``'s call signature.

    Backends are listed by name in ``stepq.backends.table`` and imported only when looked up.
    """

    name: str
    table: tuple[Placement, ...]

    def partition(self, qm: QuantizedModel, *, strict: bool = False) -> PartitionResult: ...

    def lower(self, qm: QuantizedModel, *, strict: bool = False) -> Lowered: ...

    def export(self, qm: QuantizedModel, path: str | os.PathLike[str], **options: Any) -> Exported: ...

    def load(self, path: str | os.PathLike[str], **options: Any) -> Callable[..., Any]: ...
