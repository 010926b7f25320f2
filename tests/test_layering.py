"""stepq's import graph is acyclic and layered.

The graph is built from the source (ast + networkx), not by importing: every ``import`` and
``from … import`` at module or function level, relative imports resolved, ``from stepq.x import y``
counted as importing ``stepq.x.y`` when y is a submodule, imports under ``if TYPE_CHECKING:`` left
out (they do not run). A package's ``__init__`` is the package's own module; importing
``stepq.a.b`` does not count as importing ``stepq.a`` (Python runs it, but every module would then
depend on ``stepq/__init__.py``).

Layers, lowest first; a module imports only its own or lower layers, except the edges in
``EXCEPTIONS``:

    0 stepq.compiler      the IR, errors, the pass manager        (+ stepq.metrics, stepq.data, stepq.cuda)
    1 stepq.recipe        specs and presets: policy, no graph
    2 stepq.calibration   collect, samplers, observers, qparams   (+ stepq.zoo)
    3 stepq.passes        one rewrite per file
    4 stepq.artifact      QuantizedModel, store, serialize, report
    5 stepq.methods       tdq, qat, ptqd: the methods' maths
    6 stepq.backends      reference, onnx
    7 top level           stepq/__init__.py, cli, testing

``stepq.metrics`` and ``stepq.data`` import no stepq module, and ``stepq.zoo`` only
``compiler.errors`` and ``calibration.samplers`` (and, in ``load``, the artefact loader for its compiled
models: an exception below): each sits at the lowest layer that holds, so
calibration (or anything above) may use them. This test stays red, listing every offending edge,
until the code follows the rule; the rule is not weakened to fit the code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1] / "stepq"

#: module prefix → layer (the longest matching prefix decides).
LAYERS = {
    "stepq.compiler": 0,
    "stepq.metrics": 0,
    "stepq.data": 0,
    "stepq.cuda": 0,  # kernel sources, their build, emulation, launchers: only compiler.errors (the cupy backend uses them)
    "stepq.recipe": 1,
    "stepq.calibration": 2,
    "stepq.zoo": 2,
    "stepq.passes": 3,
    "stepq.artifact": 4,
    "stepq.methods": 5,
    "stepq.backends": 6,
    "stepq": 7,  # stepq/__init__.py, stepq.cli, stepq.testing
}
LAYER_NAMES = {0: "compiler", 1: "recipe", 2: "calibration", 3: "passes", 4: "artifact", 5: "methods",
               6: "backends", 7: "top level"}

#: (importing module, imported module prefix, why the edge is allowed upward)
EXCEPTIONS = (
    ("stepq.compiler.pipeline", "stepq.recipe", "the driver: the recipe decides which optional stages run"),
    ("stepq.compiler.pipeline", "stepq.calibration", "the driver: calibration's observe step is a stage"),
    ("stepq.compiler.pipeline", "stepq.passes", "the driver: it lists the passes in order"),
    ("stepq.compiler.pipeline", "stepq.artifact", "the driver: convert's report step is a stage"),
    ("stepq.compiler.pipeline", "stepq.methods", "the driver: methods contribute stages to the pipeline"),
    ("stepq.compiler.api", "stepq.recipe", "the driver: prepare resolves a recipe or a preset name"),
    ("stepq.compiler.api", "stepq.calibration", "the driver: calibrate checks for observers that saw no data"),
    ("stepq.compiler.api", "stepq.artifact", "the driver: convert returns a QuantizedModel"),
    ("stepq.artifact.quantized_model", "stepq.backends", "QuantizedModel.export resolves a backend by name"),
    ("stepq.zoo", "stepq.artifact", "zoo.load of a shipped compiled model (digits-dit-ternary) returns a QuantizedModel"),
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """(imported module, line) for every import that runs, at any depth."""

    def __init__(self, module: str, is_package: bool, known: set[str]):
        self.package = module if is_package else module.rpartition(".")[0]
        self.known = known
        self.found: list[tuple[str, int]] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for stmt in node.orelse:
                self.visit(stmt)
            return
        self.generic_visit(node)

    def _add(self, name: str, line: int) -> None:
        while name and name not in self.known:  # an attribute of a module: the module
            name = name.rpartition(".")[0]
        if name:
            self.found.append((name, line))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "stepq" or alias.name.startswith("stepq."):
                self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base_parts = self.package.split(".")
            base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if not (base == "stepq" or base.startswith("stepq.")):
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in self.known else base, node.lineno)


def import_graph() -> nx.DiGraph:
    """Modules of stepq as nodes; an edge a → b (with the ``lines`` of a that import b)."""
    mods = _modules()
    known = set(mods)
    g = nx.DiGraph()
    g.add_nodes_from(known)
    for name, path in mods.items():
        v = _Imports(name, path.name == "__init__.py", known)
        v.visit(ast.parse(path.read_text(), filename=str(path)))
        for target, line in v.found:
            if target == name:
                continue
            if g.has_edge(name, target):
                if line not in g[name][target]["lines"]:
                    g[name][target]["lines"].append(line)
            else:
                g.add_edge(name, target, lines=[line])
    return g


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _excepted(src: str, dst: str) -> bool:
    return any(src == s and (dst == p or dst.startswith(p + ".")) for s, p, _ in EXCEPTIONS)


def _edge(g: nx.DiGraph, a: str, b: str) -> str:
    return f"{a} → {b} (line {', '.join(map(str, g[a][b]['lines']))})"


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    return import_graph()


def test_the_graph_sees_the_imports_it_should(graph):
    # a direct import, a submodule imported by name, a relative one would resolve the same way
    assert graph.has_edge("stepq.compiler.pipeline", "stepq.passes")
    assert graph.has_edge("stepq.passes.insert_quantizers", "stepq.compiler.meta")  # from stepq.compiler import meta
    assert graph.has_edge("stepq.zoo", "stepq.calibration.samplers")  # a function-level import
    # state.py's LayerReport / ActivationStats imports are under TYPE_CHECKING
    assert not graph.has_edge("stepq.compiler.state", "stepq.artifact.report")
    assert all(n.startswith("stepq") for n in graph.nodes) and len(graph) > 50


def test_relative_imports_submodules_and_type_checking_resolve():
    src = (
        "from typing import TYPE_CHECKING\n"
        "from . import meta\n"
        "from ..passes import AnnotateLayers\n"
        "from ..recipe.specs import Recipe\n"
        "if TYPE_CHECKING:\n"
        "    from stepq.artifact.report import LayerReport\n"
        "else:\n"
        "    import stepq.data\n"
        "def f():\n"
        "    from stepq import zoo\n"
    )
    known = {"stepq", "stepq.compiler", "stepq.compiler.meta", "stepq.passes", "stepq.recipe",
             "stepq.recipe.specs", "stepq.artifact.report", "stepq.data", "stepq.zoo"}
    v = _Imports("stepq.compiler.x", False, known)
    v.visit(ast.parse(src))
    assert sorted(m for m, _ in v.found) == ["stepq.compiler.meta", "stepq.data", "stepq.passes", "stepq.recipe.specs",
                                            "stepq.zoo"]


def test_every_exception_names_a_real_edge_source(graph):
    for src, prefix, why in EXCEPTIONS:
        assert src in graph, f"exception for a module that does not exist: {src}"
        assert prefix in graph, f"exception to a package that does not exist: {prefix}"
        assert why


def test_the_import_graph_is_acyclic(graph):
    cycles = []
    for comp in nx.strongly_connected_components(graph):
        if len(comp) > 1:
            cyc = nx.find_cycle(graph.subgraph(comp))
            cycles.append(" → ".join([a for a, _ in cyc] + [cyc[0][0]]))
    assert not cycles, "import cycles:\n  " + "\n  ".join(sorted(cycles))


def test_modules_import_only_their_own_or_lower_layers(graph):
    bad = [f"{_edge(graph, a, b)}: {LAYER_NAMES[layer(a)]} imports {LAYER_NAMES[layer(b)]}"
           for a, b in graph.edges if layer(b) > layer(a) and not _excepted(a, b)]
    assert not bad, f"{len(bad)} upward import(s):\n  " + "\n  ".join(sorted(bad))


def test_passes_import_no_method(graph):
    bad = [_edge(graph, a, b) for a, b in graph.edges
           if a.startswith("stepq.passes") and b.startswith("stepq.methods")]
    assert not bad, "stepq.passes imports a method (the maths belongs in the method, the rewrite in the " \
                    "pass):\n  " + "\n  ".join(sorted(bad))


def _method(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["stepq", "methods"] else None


def test_no_method_imports_another_method(graph):
    bad = [_edge(graph, a, b) for a, b in graph.edges
           if _method(a) and _method(b) and _method(a) != _method(b)]
    assert not bad, "a method package imports another:\n  " + "\n  ".join(sorted(bad))
