"""Insert RMSNorm after every adaLN modulation linear (TerDiT), found by dataflow.

TerDiT adds one norm to a DiT block: ``adaLN_modulation = Sequential(SiLU, Linear(c → k·d), RMSNorm(k·d))``
before the chunk into shift / scale / gate, because ternary linears make the modulation very large:

    m = Linear(SiLU(c))                          c: the conditioning embedding (no sample dependence)
    m' = m / sqrt(mean(m², last dim) + ε) · g    g learnable, initialised to 1 (``aten.rms_norm``)
    shift, scale, gate, … = chunk(m')

A **modulation** is found on the graph, not by module names. A networkx digraph of the FX nodes
(data edges only; shape edges such as ``sym_size(sample)`` are left out) gives the nodes that do
not depend on the sample input. Every ``chunk`` / ``split`` of such a tensor into at least
``min_chunks`` pieces (shift, scale and a gate: 3 for Flux's single blocks, 6 for adaLN-Zero) is
traced back through views and additions of constants (PixArt's ``scale_shift_table + t.reshape``)
to the op that produced it:

* a ``Linear`` whose input is ``SiLU(...)``: an RMSNorm is inserted on the edge from that linear
  towards this chunk. PixArt's adaLN-single shares one linear between all blocks; each block's
  path gets its own RMSNorm (the linear has one user per block), so the count equals the blocks';
* anything else (a matmul, a conv, a Linear without SiLU): left alone and reported in the details.

Chunks into two pieces (shift and scale without a gate: DiT's final layer, SD3 / Flux
``AdaLayerNormContinuous``) are final-layer style modulations, kept as in the authors' code and
reported. Requires: nothing. Guarantees: every gated modulation linear found reaches its chunk
through an RMSNorm (a second run inserts nothing). Not semantics-preserving.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx

from stepq.compiler import analysis, meta
from stepq.compiler.graph_utils import register_tensor
from stepq.compiler.pass_manager import Contract, NoneLeft, Pass, PassResult
from stepq.compiler.program import Program

__all__ = ["RMS_NORM", "InsertRMSNorm", "Modulation", "find_modulations"]

aten = torch.ops.aten
RMS_NORM = aten.rms_norm.default
_CHUNKS = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default, aten.unsafe_split.Tensor}
#: ops a modulation passes through between its linear and the chunk (reshapes; + a constant table)
_THROUGH = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
            aten.squeeze.dim, aten.contiguous.default, aten.clone.default, aten.add.Tensor, aten.to.dtype,
            aten._assert_tensor_metadata.default}
_SILU = {aten.silu.default, aten.silu_.default}
#: between the SiLU and the linear (SD3's AdaLayerNormContinuous casts: ``silu(c).to(x.dtype)``)
_CASTS = {aten.view.default, aten.reshape.default, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default,
          aten.contiguous.default}


@dataclass(frozen=True)
class Modulation:
    """One chunked conditioning tensor: the chunk, its pieces, the producer found, and either the
    edge (linear → first node towards the chunk) where an RMSNorm goes, or why none goes there."""

    chunk: torch.fx.Node
    pieces: int
    producer: torch.fx.Node
    edge: tuple[torch.fx.Node, torch.fx.Node] | None
    normalized: bool
    reason: str = ""


def _pieces(node: torch.fx.Node) -> int:
    if node.target is aten.split_with_sizes.default:
        return len(node.args[1])  # type: ignore[arg-type]
    if node.target is aten.chunk.default:
        return int(node.args[1])  # type: ignore[arg-type]
    x = node.args[0]
    val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    dim = int(node.args[2]) if len(node.args) > 2 else int(node.kwargs.get("dim", 0))  # type: ignore[arg-type]
    if not isinstance(val, torch.Tensor) or not isinstance(val.shape[dim], int):
        return 0
    return math.ceil(val.shape[dim] / int(node.args[1]))  # type: ignore[arg-type]


def _dataflow(gm: torch.fx.GraphModule) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n)
        for i in analysis.data_inputs(n):
            g.add_edge(i, n)
    return g


def _is_rmsnorm(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is RMS_NORM


def _through_input(node: torch.fx.Node, const: set[torch.fx.Node]) -> torch.fx.Node | None:
    """The one non-constant data input of a pass-through op (None when there are several)."""
    ins = [i for i in analysis.data_inputs(node) if i not in const]
    return ins[0] if len(ins) == 1 else None


def find_modulations(prog: Program, min_chunks: int = 3) -> list[Modulation]:
    """Every chunk/split of a sample-independent tensor into ≥ ``min_chunks`` pieces, traced to its producer."""
    gm = prog.gm
    g = _dataflow(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sample = next((n for n in placeholders if n.name == prog.sample_arg), None)
    on_sample = nx.descendants(g, sample) | {sample} if sample is not None else set()
    deps = analysis.dependency_sets(gm)
    const = {n for n in g if n.op != "placeholder" and not deps.get(n)}
    out = []
    for chunk in gm.graph.nodes:
        if chunk.op != "call_function" or chunk.target not in _CHUNKS or chunk in on_sample:
            continue
        pieces = _pieces(chunk)
        if pieces < min_chunks:
            continue
        prev, cur = chunk, chunk.args[0]
        normalized = False
        while isinstance(cur, torch.fx.Node) and cur.op == "call_function" and (
                cur.target in _THROUGH or _is_rmsnorm(cur)):
            normalized |= _is_rmsnorm(cur)
            nxt = cur.args[0] if _is_rmsnorm(cur) else _through_input(cur, const)
            if nxt is None:
                break
            prev, cur = cur, nxt
        assert isinstance(cur, torch.fx.Node)
        if analysis.op_kind(cur) != "linear" or cur.target is not aten.linear.default:
            out.append(Modulation(chunk, pieces, cur, None, normalized,
                                  f"the modulation is produced by {cur.op} {cur.target}, not a Linear"))
            continue
        x = cur.args[0]
        while isinstance(x, torch.fx.Node) and x.target in _CASTS:
            x = x.args[0]
        if not (isinstance(x, torch.fx.Node) and x.target in _SILU):
            out.append(Modulation(chunk, pieces, cur, None, normalized, "the modulation Linear is not fed by SiLU"))
            continue
        out.append(Modulation(chunk, pieces, cur, (cur, prev), normalized))
    return out


def _unnormalized(prog: Program) -> list[torch.fx.Node]:
    return [m.chunk for m in find_modulations(prog) if m.edge is not None and not m.normalized]


class InsertRMSNorm(Pass):
    name = "insert_rmsnorm"
    contract = Contract(
        produces=(NoneLeft(_unnormalized, "adaLN modulation chunk without an RMSNorm after its Linear"),),
        preserves_semantics=False,
        idempotent=True,
    )

    def __init__(self, eps: float = 1e-6, min_chunks: int = 3):
        self.eps = eps
        self.min_chunks = min_chunks

    def __repr__(self) -> str:
        return f"InsertRMSNorm(eps={self.eps}, min_chunks={self.min_chunks})"

    def __call__(self, prog: Program) -> PassResult:
        gm = prog.gm
        count = 0
        details: list[str] = []
        done: set[tuple[torch.fx.Node, torch.fx.Node]] = set()
        for m in find_modulations(prog, min(2, self.min_chunks)):
            if m.pieces < self.min_chunks:  # shift and scale only
                if m.edge is not None:
                    details.append(f"{m.chunk.name}: {m.pieces} pieces (shift/scale, no gate) after "
                                   f"{analysis.module_path(m.producer)}: a final-layer modulation, left alone")
                continue
            if m.edge is None:
                details.append(f"{m.chunk.name}: {m.reason}; left alone")
                continue
            if m.normalized or m.edge in done:
                continue
            linear, user = m.edge
            done.add(m.edge)
            val = linear.meta.get("val")
            width = int(val.shape[-1]) if isinstance(val, torch.Tensor) else int(gm.get_parameter(
                str(linear.args[1].target)).shape[0])  # type: ignore[union-attr]
            layer = analysis.module_path(linear)
            w_name = register_tensor(gm, f"{layer}.rmsnorm_weight".replace(".", "_"), torch.ones(width),
                                     parameter=True, requires_grad=False)
            with gm.graph.inserting_after(linear):
                w_node = gm.graph.get_attr(w_name)
            with gm.graph.inserting_after(w_node):
                rms = gm.graph.call_function(RMS_NORM, (linear, [width], w_node, self.eps))
            meta.mark_inserted(w_node)
            meta.mark_inserted(rms)
            rms.meta["val"] = val
            if "nn_module_stack" in linear.meta:
                rms.meta["nn_module_stack"] = dict(linear.meta["nn_module_stack"])
            user.replace_input_with(linear, rms)
            count += 1
            details.append(f"{layer}: RMSNorm({width}) before {m.chunk.name} ({m.pieces} pieces)")
        if count:
            gm.graph.lint()
            gm.recompile()
        return PassResult(count, tuple(details))


def chunk_consumers(chunk: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes that read the pieces of ``chunk`` (through its getitems)."""
    out: list[torch.fx.Node] = []
    for u in chunk.users:
        if u.op == "call_function" and u.target is operator.getitem:
            out.extend(u.users)
    return out
