"""FakeTensor metadata for a loaded graph: ``meta["val"]`` on every node, with the symbolic batch.

A captured graph carries ``meta["val"]`` (FakeTensors of torch.export's mode, the batch a SymInt) on
every node, and the backends read it: the ONNX partitioner only gives a convolution an integer kernel
when its input is a known 4-D tensor, the direct translator types every value from it. A graph read
back from JSON has none, and without this module the digits UNet's 50 convolutions exported as float
kernels after a save / load. On save the placeholders' shapes are recorded (an int per static
dimension, ``{"sym": name, "hint": n}`` per symbolic one); on load FakeTensor propagation
(``torch.fx.passes.fake_tensor_prop``) runs the graph on FakeTensors of those shapes in a fresh
``FakeTensorMode`` with a ``ShapeEnv``, so every node gets its value again, the batch symbolic.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
import torch.fx._pytree as fx_pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.fx.graph import _PyTreeCodeGen
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from stepq.compiler.errors import ArtifactError
from stepq.compiler.program import InputSignature

__all__ = ["placeholder_shapes", "restore_fake_meta"]

_MIN_HINT = 2  # a symbolic dimension's example size: 0 and 1 would be specialised


def placeholder_shapes(gm: torch.fx.GraphModule) -> list[dict[str, Any] | None]:
    """Shape and dtype of every tensor placeholder, in order; ``{"const": v}`` for a captured constant
    (``return_dict=False`` is a placeholder of ``ep.module()``), None for anything else."""
    out: list[dict[str, Any] | None] = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        v = n.meta.get("val")
        if not isinstance(v, torch.Tensor):
            out.append({"const": v} if isinstance(v, (bool, int, float, str)) else None)
            continue
        dims: list[Any] = []
        for d in v.shape:
            if isinstance(d, torch.SymInt):
                hint = d.node.hint if d.node.has_hint() else _MIN_HINT
                dims.append({"sym": str(d), "hint": max(int(hint), _MIN_HINT)})
            else:
                dims.append(int(d))
        out.append({"shape": dims, "dtype": str(v.dtype).removeprefix("torch.")})
    return out


def shapes_from_signature(gm: torch.fx.GraphModule, signature: InputSignature) -> list[dict[str, Any] | None]:
    """The placeholders' shapes as capture makes them (dim 0 of every tensor symbolic): for artefacts
    saved before the shapes were recorded."""
    example: dict[str, Any] = {}
    for name in signature.captured:
        if name in signature.tensors:
            info = signature.tensors[name]
            example[name] = ("t", info)
        else:
            example[name] = signature.constants[name]
    codegen = gm.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen) and codegen.pytree_info.in_spec is not None:
        flat = list(fx_pytree.tree_flatten_spec(((), example), codegen.pytree_info.in_spec))
    else:
        flat = [example.get(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    out: list[dict[str, Any] | None] = []
    for v in flat:
        if isinstance(v, tuple) and len(v) == 2 and v[0] == "t":
            info = v[1]
            dims: list[Any] = [int(d) for d in info.shape]
            if dims:
                dims[0] = {"sym": "batch", "hint": max(dims[0], _MIN_HINT)}
            out.append({"shape": dims, "dtype": info.dtype})
        else:
            out.append({"const": v} if isinstance(v, (bool, int, float, str)) else None)
    return out


def _fake_input(mode: FakeTensorMode, spec: Mapping[str, Any]) -> torch.Tensor:
    dims = spec["shape"]
    sizes = [d["hint"] if isinstance(d, Mapping) else int(d) for d in dims]
    real = torch.zeros(sizes, dtype=getattr(torch, spec["dtype"]))
    dynamic = [DimDynamic.DYNAMIC if isinstance(d, Mapping) else DimDynamic.STATIC for d in dims]
    ctx: StatelessSymbolicContext = StatelessSymbolicContext(
        dynamic_sizes=dynamic, constraint_sizes=[None] * len(dims))  # type: ignore[arg-type]
    return mode.from_tensor(real, symbolic_context=ctx)


def restore_fake_meta(gm: torch.fx.GraphModule, shapes: list[dict[str, Any] | None], *, where: str = "graph") -> None:
    """Run FakeTensor propagation over ``gm`` so that every node has ``meta["val"]`` again.

    ``shapes`` is what ``placeholder_shapes`` recorded (equal symbol names share one symbol: their
    hints are equal, and the ShapeEnv's duck sizing joins them). Raises ``ArtifactError`` naming the
    node when a node cannot be propagated."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(shapes) != len(placeholders):
        raise ArtifactError(f"{where}: {len(shapes)} recorded input shapes for {len(placeholders)} placeholders")
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    args = []
    for node, spec in zip(placeholders, shapes):
        if spec is None:
            args.append(node.meta.get("val"))
        elif "const" in spec:  # a captured constant (return_dict=False): the placeholder's value
            node.meta["val"] = spec["const"]
            args.append(spec["const"])
        else:
            args.append(_fake_input(mode, spec))
    prop = FakeTensorProp(gm, mode)
    try:
        prop.propagate_dont_convert_inputs(*args)
    except Exception as e:
        node = getattr(prop, "_current_node", None) or next(
            (n for n in gm.graph.nodes if "val" not in n.meta and n.op != "output"), None)
        name = node.name if isinstance(node, torch.fx.Node) else "?"
        raise ArtifactError(f"{where}: FakeTensor propagation failed at node {name!r}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from e
