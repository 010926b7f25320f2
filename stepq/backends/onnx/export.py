"""``export_graph(qm, path)``: one converted graph → quantized ONNX for ONNX Runtime.

    deepcopy(qm.gm) → partition (tag) → lower (placement rewrites, ``lower.py``)
      → direct translation (``direct.py``), or torch.export (dynamic batch)
        → torch.onnx.export(dynamo=True, opset 21, TRANSLATION_TABLE)
      → post-process (INT4 initializers, stepq metadata) → save (external data above 2 GB) → onnx.checker

The QuantizedModel is never modified: everything happens on a copy of its graph module.
Nothing is lowered to fake-quant arithmetic: every quantizer becomes QuantizeLinear /
DequantizeLinear or an integer kernel's input (``lower.py`` checks that no stepq quantizer op is left).
The backend's ``export`` (``backend.py``) calls this for a single-width graph and ``mixed.py`` for a
PTQD mixed-precision one (one ``export_graph`` per width, merged under an If).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import onnxscript
import torch
from torch.export import Dim
from torch.utils import _pytree as pytree

from stepq.backends.base import PartitionResult
from stepq.backends.onnx import direct
from stepq.backends.onnx.lower import LoweringResult, lower
from stepq.backends.onnx.partition import OnnxPartitioner
from stepq.backends.onnx.postprocess import clamp_timestep_input, materialize_int4, write_metadata
from stepq.backends.onnx.runtime import u8s8_saturates
from stepq.backends.onnx.translation import TRANSLATION_TABLE
from stepq.compiler.capture import widen_batch
from stepq.compiler.errors import FallbackWarning, PostconditionError, StepqError
from stepq.compiler.program import InputSignature

__all__ = ["EXTERNAL_DATA_THRESHOLD", "ExportResult", "OnnxExportError", "OnnxInput", "example_inputs", "export_graph",
           "lowered_copy", "write_atomically"]

log = logging.getLogger(__name__)

#: protobuf's limit: above it, tensors go to a ``<name>.data`` file beside the model.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


class OnnxExportError(StepqError):
    """torch.export or torch.onnx could not export the lowered graph."""


@dataclass(frozen=True)
class OnnxInput:
    """One ONNX graph input: the call argument it comes from and its pytree key path in the call
    (``whole``: the input is the argument itself, not a tensor nested inside it)."""

    name: str
    argument: str
    keypath: str
    whole: bool


@dataclass
class ExportResult:
    path: Path
    partition: PartitionResult
    lowered: dict[str, int]
    per_tensor_timestep: list[str]
    file_bytes: int
    seconds: float
    external_data: bool
    stages: dict[str, float] = field(default_factory=dict)
    #: "direct" (stepq's node-by-node translation) or "torch.onnx" (torch.export + torch.onnx.export)
    translator: str = "direct"
    #: the ONNX graph's inputs, in order, with the call arguments they are fed from
    inputs: list[OnnxInput] = field(default_factory=list)

    def input_name(self, argument: str) -> str:
        """The ONNX input fed with the call argument ``argument`` (a tensor argument)."""
        for i in self.inputs:
            if i.argument == argument and i.whole:
                return i.name
        raise KeyError(f"no ONNX input is the argument {argument!r}; inputs: "
                       f"{[(i.name, i.keypath) for i in self.inputs]}")

    def summary(self) -> str:
        return (f"{self.path} ({self.file_bytes / 2**20:.1f} MiB{', external data' if self.external_data else ''}) "
                f"in {self.seconds:.1f}s ({self.translator}): {self.lowered}; {len(self.partition.rejections)} quantized layer(s) in float")


def _example_tensor(name: str, info: Any, signature: InputSignature) -> torch.Tensor:
    dtype = info.torch_dtype
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(info.shape, generator=g, dtype=dtype)
    if name == signature.timestep:
        return torch.full(info.shape, 1, dtype=dtype)
    return torch.zeros(info.shape, dtype=dtype)


def example_inputs(signature: InputSignature) -> dict[str, Any]:
    """Inputs of the captured shapes and dtypes (what torch.export traces the lowered graph with)."""
    out: dict[str, Any] = {}
    for name in signature.captured:
        if name in signature.constants:
            out[name] = copy.deepcopy(signature.constants[name])
        else:
            out[name] = _example_tensor(name, signature.tensors[name], signature)
    return out


def _batch_dim(v: Any) -> Any:
    return {0: Dim.AUTO} if isinstance(v, torch.Tensor) and v.dim() >= 1 else None


def tensor_leaves(kwargs: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """The tensor leaves of a call, in the order torch.export flattens them (the ONNX inputs' order):
    (key path, the argument it belongs to, whether it is the whole argument)."""
    leaves, _ = pytree.tree_flatten_with_path(((), dict(kwargs)))
    out = []
    for path, v in leaves:
        if isinstance(v, torch.Tensor):
            # path = (SequenceKey(1), MappingKey(argument), ...nested keys)
            out.append((pytree.keystr(path), str(path[1].key), len(path) == 2))  # type: ignore[attr-defined]
    return out


def write_atomically(path: Path, write: Callable[[Path], None], *, external_data: bool) -> None:
    """Run ``write(tmp)`` on a file of ``path``'s name in a temporary sibling folder, then rename it
    (and its ``<name>.data`` when ``external_data``) into place: a failed write or check leaves no
    partial file, and a previous file at ``path`` stays as it was. A stale ``<name>.data`` beside a
    file written without external data is removed, so the pair on disk always belongs together."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    data = path.parent / (path.name + ".data")
    try:
        write(tmpdir / path.name)
        if external_data:
            os.replace(tmpdir / data.name, data)
        os.replace(tmpdir / path.name, path)
        if not external_data and data.exists():
            data.unlink()
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _rss_gb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return float("nan")


def _initializer_bytes(model: ir.Model) -> int:
    total = 0
    for v in model.graph.initializers.values():
        if v.const_value is not None:
            total += v.const_value.nbytes
    return total


def lowered_copy(qm: Any, *, strict: bool, unsigned_weights: bool | None = None
                 ) -> tuple[torch.fx.GraphModule, PartitionResult, LoweringResult]:
    """A copy of ``qm``'s graph, partitioned and lowered to the backend's ops (still runs in PyTorch).
    ``unsigned_weights``: as ``export_graph``'s (None: ``u8s8_saturates()`` of this CPU)."""
    # a structural copy: the lowering registers new tensors and deletes attributes on the copy but
    # never writes into a tensor, so the copy shares the model's tensor storage (DiT-XL: −0.8 GB)
    memo: dict[int, Any] = {id(t): t for t in qm.gm.state_dict(keep_vars=True).values()}
    gm = copy.deepcopy(qm.gm, memo)
    partition = OnnxPartitioner().partition(gm, strict=strict)
    if unsigned_weights is None:
        unsigned_weights = u8s8_saturates()
    return gm, partition, lower(gm, partition, unsigned_weights=unsigned_weights)


def _torch_onnx_export(gm: torch.fx.GraphModule, kwargs: dict[str, Any], *, opset: int, dynamic_batch: bool,
                       optimize: bool, stages: dict[str, float]) -> tuple[ir.Model, Any]:
    """The lowered graph through torch.export and torch.onnx.export (re-trace, decompositions, translation)."""
    dyn = {k: pytree.tree_map(_batch_dim, v) for k, v in kwargs.items()} if dynamic_batch else None
    t = time.perf_counter()
    try:
        with torch.no_grad():
            ep = torch.export.export(gm, (), kwargs, dynamic_shapes=dyn, strict=False)
    except Exception as e:
        raise OnnxExportError(f"torch.export of the lowered graph failed: {type(e).__name__}: {e}") from e
    stages["torch_export_s"] = time.perf_counter() - t
    t = time.perf_counter()
    try:
        program = torch.onnx.export(ep, dynamo=True, opset_version=opset, custom_translation_table=TRANSLATION_TABLE,
                                    optimize=optimize, verbose=False)
    except Exception as e:
        raise OnnxExportError(f"torch.onnx.export failed: {type(e).__name__}: {e}") from e
    stages["onnx_translate_s"] = time.perf_counter() - t
    stages["onnx_translate_rss_GB"] = _rss_gb()
    if program is None:
        raise OnnxExportError("torch.onnx.export returned no program")
    return program.model, ep.call_spec.out_spec


def export_graph(qm: Any, path: str | os.PathLike[str], *, opset: int = 21, dynamic_batch: bool = True,
                 strict: bool = False, external_data: bool | None = None, check: bool = True,
                 translator: str = "auto", optimize: bool | None = None,
                 unsigned_weights: bool | None = None) -> ExportResult:
    """Write ``qm`` (a QuantizedModel) as quantized ONNX, its graph as it is (no width switch).

    Args:
        opset: ONNX opset (≥ 21: QuantizeLinear/DequantizeLinear with INT4 and blocked scales).
        dynamic_batch: a symbolic batch dimension on every input (as at capture).
        strict: raise ``UnsupportedNodesError`` if any quantized Linear/Conv cannot become an
            integer kernel (by default it runs as a float kernel on Q/DQ inputs and is reported).
        external_data: store tensors in ``<file>.data``; by default only above protobuf's 2 GB.
        check: run ``onnx.checker`` on the written file.
        translator: ``"direct"`` translates the lowered graph node by node with torch.onnx's op
            registry (``direct.py``: no re-export, no whole-graph decomposition; DiT-XL 131 s → ~25 s);
            ``"torch.onnx"`` runs torch.export + ``torch.onnx.export(dynamo=True)`` on it;
            ``"auto"`` (default) tries direct and falls back to torch.onnx if a node cannot be taken.
        optimize: run onnxscript's optimizer (constant folding, CSE, dead code) on the ONNX graph.
            Default: only on the torch.onnx path (as torch.onnx.export does); the direct path leaves
            that to ONNX Runtime's session-time optimiser (same latency measured, 9 s less on DiT-XL).
        unsigned_weights: store the integer kernels' signed 8-bit weights as uint8 with zero point 128
            (the same products): ONNX Runtime's u8·s8 kernel on x86 CPUs without VNNI or AMX sums pairs
            of products in saturating int16 and is wrong by up to 2·255·127 − 32767 per pair; its u8·u8
            kernel is exact. Default (None): when this CPU is such a CPU (``u8s8_saturates()``); a file
            for another machine can set it either way (True is exact everywhere, False is ORT's faster
            path on VNNI / AMX CPUs).
    """
    if translator not in ("auto", "direct", "torch.onnx"):
        raise ValueError(f"translator must be 'auto', 'direct' or 'torch.onnx', got {translator!r}")
    if opset < 21:
        raise ValueError(f"opset {opset} is too old: stepq's ONNX needs opset 21 (INT4, blocked Q/DQ)")
    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    gm, partition, lowered = lowered_copy(qm, strict=strict, unsigned_weights=unsigned_weights)
    if partition.rejections:
        shown = "\n  ".join(map(str, partition.rejections[:5]))
        more = f"\n  ... and {len(partition.rejections) - 5} more" if len(partition.rejections) > 5 else ""
        warnings.warn(FallbackWarning(
            f"ONNX export of {qm.program.model_name}: {len(partition.rejections)} quantized node(s) run as float "
            f"kernels (their quantizers become Q/DQ pairs), not integer kernels:\n  {shown}{more}\n"
            "(strict=True raises instead; backend.partition(qm).summary() lists them all)"), stacklevel=3)
    stages["lower_s"] = time.perf_counter() - t0
    stages["lower_rss_GB"] = _rss_gb()
    if lowered.collapsed_per_sample:
        log.info("%d timestep-table quantizers read the first timestep of the batch in ONNX (integer kernels "
                 "need one scale per tensor)", len(lowered.collapsed_per_sample))

    signature: InputSignature = qm.program.signature
    kwargs = example_inputs(signature)
    if dynamic_batch:  # a batch-1 capture: trace torch.onnx's export at batch 2, or it fixes the batch at 1
        kwargs = widen_batch(kwargs, qm.program.sample_arg)
    model: ir.Model | None = None
    out_spec: Any = None
    if translator == "direct" and not dynamic_batch:
        raise ValueError("translator='direct' keeps the captured (dynamic) batch; dynamic_batch=False needs "
                         "translator='torch.onnx' (or 'auto')")
    used = "torch.onnx"
    if translator == "direct" or (translator == "auto" and dynamic_batch):
        t = time.perf_counter()
        try:
            model = direct.translate(gm, opset=opset)
            out_spec = gm.graph._codegen.pytree_info.out_spec  # type: ignore[attr-defined]
        except direct.DirectTranslationError as e:
            if translator == "direct":
                raise OnnxExportError(f"direct translation failed: {e}") from e
            warnings.warn(FallbackWarning(f"direct ONNX translation failed, falling back to torch.onnx.export "
                                          f"(slower, same graph): {e}"), stacklevel=3)
            model = None
            gm = lowered_copy(qm, strict=strict, unsigned_weights=unsigned_weights)[0]
        else:
            used = "direct"
            stages["direct_translate_s"] = time.perf_counter() - t
            if optimize:  # None: not on the direct path
                t = time.perf_counter()
                onnxscript.optimizer.optimize(model)
                stages["optimize_s"] = time.perf_counter() - t
            stages["translate_rss_GB"] = _rss_gb()
    if model is None:
        model, out_spec = _torch_onnx_export(gm, kwargs, opset=opset, dynamic_batch=dynamic_batch,
                                             optimize=optimize is not False, stages=stages)
    del gm

    t = time.perf_counter()
    n_int4 = materialize_int4(model)
    leaves = tensor_leaves(kwargs)
    keypaths = [k for k, _, _ in leaves]
    inputs = [v.name for v in model.graph.inputs]
    if len(inputs) != len(keypaths):
        raise PostconditionError(f"the ONNX graph has {len(inputs)} inputs but the call has {len(keypaths)} tensors "
                                 f"({inputs} vs {keypaths})")
    prog = qm.program
    timestep_input = next(n for n, (_, arg, _) in zip(inputs, leaves) if arg == signature.timestep)
    clamp_timestep_input(model, str(timestep_input), prog.recipe.num_train_timesteps / prog.timestep_scale)
    write_metadata(model, {
        "format": 1,
        "signature": signature.to_dict(),
        "inputs": [[n, k] for n, k in zip(inputs, keypaths)],
        "out_spec": pytree.treespec_dumps(out_spec) if out_spec is not None else None,
        "sample_arg": prog.sample_arg,
        "timestep_scale": prog.timestep_scale,
        "recipe": getattr(prog.recipe, "name", None),
        "num_train_timesteps": prog.recipe.num_train_timesteps,
        "timestep_policy": prog.recipe.timestep_policy,
        "model_name": prog.model_name,
        "placements": partition.counts(),
        "float_quantized_layers": [str(r) for r in partition.rejections],
        "per_tensor_timestep": bool(lowered.collapsed_per_sample),
        "translator": used,
    })
    size = _initializer_bytes(model)
    use_external = size > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    data_name = path.name + ".data"

    final: ir.Model = model

    def write(tmp: Path) -> None:
        nonlocal t
        ir.save(final, tmp, external_data=data_name if use_external else None)
        stages["save_s"] = time.perf_counter() - t
        stages["save_rss_GB"] = _rss_gb()
        if check:
            t = time.perf_counter()
            onnx.checker.check_model(str(tmp))
            stages["check_s"] = time.perf_counter() - t

    write_atomically(path, write, external_data=use_external)
    model = None  # the graph's tensors can be large: drop them before the result is built
    file_bytes = path.stat().st_size + ((path.parent / data_name).stat().st_size if use_external else 0)
    result = ExportResult(path, partition, lowered.counts | ({"int4_initializers": n_int4} if n_int4 else {}),
                          lowered.collapsed_per_sample, file_bytes, time.perf_counter() - t0, use_external, stages,
                          used, [OnnxInput(str(n), arg, k, whole) for n, (k, arg, whole) in zip(inputs, leaves)])
    log.info("onnx export: %s", result.summary())
    return result
