"""ONNX for step-aware mixed precision: one file, an If over one subgraph per activation width.

In the reference graph every switched quantizer computes all its widths and a ``where`` on the
bits table picks one per sample. ONNX Runtime's integer kernels need one activation scale per
tensor, so in ONNX the whole batch takes the width of its (shared) timestep, and the switch moves up
to the top of the graph:

    i    = clip(round(t[0] · timestep_scale), 0, T − 1)          (t: the timestep input)
    cond = Gather(ptqd_bits_table, i) == b₁
    y    = If(cond, then = graph at A_{b₁}, else = graph at A_{b₂})    (nested for more widths)

Each branch is ``export_graph`` of ``stepq.methods.ptqd.specialize(qm, b)`` (so it has the backend's
integer kernels: MatMulIntegerToFloat, QLinearConv...); ``t`` is the ONNX input the branch's export
feeds from the signature's timestep argument (``ExportResult.input_name``). The ONNX backend's
``export`` (``qm.export_onnx``) comes here for any graph that reads the bits table (``is_mixed``). Both branches read their tensors
from the outer graph's initializers; identical tensors (the integer weights, biases, the PTQD
correction tables, everything but the activation scales) are stored once, so the file is barely
larger than a single-width one. A batch with mixed timesteps takes the first sample's width (the
reference backend switches per sample). The alternatives were weighed in docs/PTQD.md: a Where
over two Q/DQ branches would compute both and break ORT's Q/DQ → integer-kernel fusion; one file
per width duplicates the weights and moves the switch into the sampler.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from stepq.artifact.quantized_model import QuantizedModel
from stepq.backends.onnx.export import EXTERNAL_DATA_THRESHOLD, ExportResult, export_graph, write_atomically
from stepq.compiler.errors import PostconditionError, PreconditionError
from stepq.compiler.graph_utils import fetch_attr
from stepq.methods.ptqd.mixed import specialize
from stepq.passes.select_bits import BITS_TABLE

__all__ = ["MixedExportResult", "export_mixed", "is_mixed"]

log = logging.getLogger(__name__)


def is_mixed(qm: QuantizedModel) -> bool:
    """Whether ``qm``'s graph switches activation widths per step (it reads the bits table)."""
    return any(n.op == "get_attr" and n.target == BITS_TABLE for n in qm.gm.graph.nodes)


@dataclass
class MixedExportResult(ExportResult):
    """An If file: ``path`` is the merged model; ``partition``, ``lowered``, ``translator`` and
    ``inputs`` are the widest branch's, ``per_tensor_timestep`` any branch's; each width's own
    export is in ``branches``."""

    widths: tuple[int, ...] = ()
    branches: dict[int, ExportResult] = field(default_factory=dict)
    shared_initializers: int = 0

    def summary(self) -> str:
        return (f"{self.path} ({self.file_bytes / 2**20:.1f} MiB) in {self.seconds:.1f}s: If over "
                f"A{'/A'.join(map(str, self.widths))}, {self.shared_initializers} initializers; widest branch "
                f"{self.lowered}; {len(self.partition.rejections)} quantized layer(s) in float")


def _same(a: Any, b: Any) -> bool:
    return a.data_type == b.data_type and list(a.dims) == list(b.dims) and np.array_equal(
        numpy_helper.to_array(a), numpy_helper.to_array(b))


def _branch(model: Any, prefix: str, outer_inits: dict[str, Any], outer_names: set[str], out_names: list[str]) -> Any:
    """``model``'s graph as an If branch: intermediate names prefixed, initializers moved to the outer
    graph (shared when identical), the outputs renamed to fresh branch-local names."""
    g = model.graph
    rename: dict[str, str] = {}
    for init in g.initializer:
        other = outer_inits.get(init.name)
        if other is None:
            outer_inits[init.name] = init
        elif not _same(other, init):
            new = f"{prefix}{init.name}"
            rename[init.name] = new
            init.name = new
            outer_inits[new] = init
    for node in g.node:
        for a in node.attribute:
            if a.g.node or a.graphs:
                raise PreconditionError(f"export_mixed: node {node.name} has a subgraph; nested graphs are not merged")
        for i, name in enumerate(node.output):
            if name:
                node.output[i] = rename.setdefault(name, f"{prefix}{name}")
        node.name = f"{prefix}{node.name}"
    for node in g.node:
        for i, name in enumerate(node.input):
            if name and name in rename:
                node.input[i] = rename[name]
            elif name and name not in outer_names and name not in outer_inits:
                raise PreconditionError(f"export_mixed: {name!r} is read before it is written in {prefix}")
    outputs = []
    for vi, outer in zip(g.output, out_names):
        inner = rename.get(vi.name, vi.name)
        if inner in outer_names:  # an output that is an input or initializer: route through Identity
            ident = f"{prefix}{outer}_out"
            g.node.append(helper.make_node("Identity", [inner], [ident], name=f"{prefix}identity_{outer}"))
            inner = ident
        out = type(vi)()
        out.CopyFrom(vi)
        out.name = inner
        outputs.append(out)
    return helper.make_graph(list(g.node), prefix.rstrip("/"), [], outputs)


def export_mixed(qm: QuantizedModel, path: str | os.PathLike[str], *, external_data: bool | None = None,
                 check: bool = True, **export_options: Any) -> MixedExportResult:
    """Write a mixed-precision ``qm`` as one ONNX file with an If per activation width (see module doc).

    ``export_options`` go to ``export_graph`` for every branch; ``external_data`` and ``check`` apply
    to the merged file. It loads with ``stepq.backends.onnx.load`` like any stepq ONNX model.
    """
    cfg = qm.recipe.ptqd
    if cfg is None or not cfg.mixed_bits:
        raise PreconditionError("export_mixed needs a model with PTQD mixed precision (recipe.ptqd.mixed_bits)")
    t0 = time.perf_counter()
    widths = tuple(cfg.mixed_bits)
    prog = qm.program
    T = prog.recipe.num_train_timesteps
    bits_table = fetch_attr(prog.gm, BITS_TABLE).detach().cpu().numpy().astype(np.int64)
    models, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for b in widths:
            f = Path(tmp) / f"a{b}.onnx"
            results[b] = export_graph(specialize(qm, b), f, **{**export_options, "external_data": False, "check": False})
            models.append(onnx.load(str(f)))
    top, top_result = models[-1], results[widths[-1]]
    props = {p.key: p.value for p in top.metadata_props}
    inputs = [vi.name for vi in top.graph.input]
    for b, m in zip(widths, models):
        if [vi.name for vi in m.graph.input] != inputs:
            raise PostconditionError(f"export_mixed: the A{b} branch's inputs {[vi.name for vi in m.graph.input]} "
                                     f"differ from the A{widths[-1]} branch's {inputs}")
    try:
        t_name = top_result.input_name(prog.signature.timestep)
    except KeyError as e:
        raise PreconditionError(f"export_mixed: no ONNX input carries the timestep {prog.signature.timestep!r}: "
                                f"{e.args[0]}") from None
    out_names = [vi.name for vi in top.graph.output]
    outer_inits: dict[str, Any] = {}
    outer_names = set(inputs)
    branches = [_branch(m, f"a{b}/", outer_inits, outer_names | set(outer_inits), out_names)
                for m, b in zip(models, widths)]
    # cond_j = bits[clip(round(t[0] · scale), 0, T − 1)] == b_j
    nodes = [
        helper.make_node("Cast", [t_name], ["ptqd/t64"], to=TensorProto.DOUBLE),
        helper.make_node("Mul", ["ptqd/t64", "ptqd/scale"], ["ptqd/ts"]),
        helper.make_node("Round", ["ptqd/ts"], ["ptqd/tr"]),
        helper.make_node("Cast", ["ptqd/tr"], ["ptqd/ti"], to=TensorProto.INT64),
        helper.make_node("Clip", ["ptqd/ti", "ptqd/zero", "ptqd/tmax"], ["ptqd/tc"]),
        helper.make_node("Reshape", ["ptqd/tc", "ptqd/flat"], ["ptqd/tf"]),
        helper.make_node("Gather", ["ptqd/tf", "ptqd/zero"], ["ptqd/t0"], axis=0),
        helper.make_node("Gather", [BITS_TABLE, "ptqd/t0"], ["ptqd/bits"], axis=0),
    ]
    consts = [
        numpy_helper.from_array(np.array(prog.timestep_scale, dtype=np.float64), "ptqd/scale"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "ptqd/zero"),
        numpy_helper.from_array(np.array(T - 1, dtype=np.int64), "ptqd/tmax"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "ptqd/flat"),
        numpy_helper.from_array(bits_table, BITS_TABLE),
    ]
    # If(b₁, g₁, If(b₂, g₂, … g_n)): the else branch of each If is a graph holding the next If
    else_graph = branches[-1]
    for j in reversed(range(len(widths) - 1)):
        cond = f"ptqd/is_a{widths[j]}"
        outs = out_names if j == 0 else [f"ptqd/if{j}/{n}" for n in out_names]
        if_node = helper.make_node("If", [cond], outs, name=f"ptqd/select_a{widths[j]}", then_branch=branches[j],
                                   else_branch=else_graph)
        consts.append(numpy_helper.from_array(np.array(widths[j], dtype=np.int64), f"ptqd/b{widths[j]}"))
        cmp = helper.make_node("Equal", ["ptqd/bits", f"ptqd/b{widths[j]}"], [cond])
        if j == 0:
            nodes += [cmp, if_node]
        else:
            out_vis = [type(vi)() for vi in top.graph.output]
            for vi, src, n in zip(out_vis, top.graph.output, outs):
                vi.CopyFrom(src)
                vi.name = n
            # the Equal of width b_j lives inside the enclosing else branch, with its If
            else_graph = helper.make_graph([cmp, if_node], f"ptqd_else_{j}", [], out_vis)
    graph = helper.make_graph(nodes, top.graph.name, list(top.graph.input), list(top.graph.output),
                              initializer=list(outer_inits.values()) + consts)
    opsets: dict[str, int] = {}
    for m in models:
        for op in m.opset_import:
            opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
    merged = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                               producer_name="stepq", ir_version=top.ir_version)
    for key, value in props.items():
        merged.metadata_props.add(key=key, value=value)
    merged.metadata_props.add(key="stepq.ptqd_bits", value=str(list(widths)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(i.ByteSize() for i in graph.initializer)
    use_external = size > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    data_name = path.name + ".data"

    def write(tmp: Path) -> None:
        onnx.save_model(merged, str(tmp), save_as_external_data=use_external, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=0)
        if check:
            onnx.checker.check_model(str(tmp))

    write_atomically(path, write, external_data=use_external)
    file_bytes = path.stat().st_size + ((path.parent / data_name).stat().st_size if use_external else 0)
    per_tensor = sorted({q for r in results.values() for q in r.per_tensor_timestep})
    result = MixedExportResult(
        path, top_result.partition, top_result.lowered, per_tensor, file_bytes, time.perf_counter() - t0,
        use_external, {f"a{b}_s": r.seconds for b, r in results.items()}, top_result.translator, top_result.inputs,
        widths=widths, branches=results, shared_initializers=len(outer_inits))
    log.info("onnx export: %s", result.summary())
    return result
