"""Post-processing of the exported ONNX model (onnx_ir), for what torch cannot express.

* ``Int4Weight(packed)`` placeholders (``ai.stepq.export``) become INT4 initializers: torch has no
  4-bit dtype, but stepq's packed 4-bit weights are already ONNX's INT4 layout (two's complement,
  low nibble first), so the bytes are reused as they are. A DequantizeLinear reads the INT4
  initializer directly (its zero point becomes INT4 too); an integer kernel reads
  ``Cast(INT4 → INT8)``, which ONNX Runtime folds into an int8 constant at session creation, so
  the file stays 4-bit and the kernel stays integer.
* the timestep input is clamped at the graph's entry (``clamp_timestep_input``): ONNX cannot raise,
  so a timestep outside [0, T / timestep_scale] is clamped into it and NaN becomes 0, for every
  model, with or without timestep tables. (``stepq.backends.onnx.load`` checks the call in Python
  first, as the reference backend does, so this only decides what a bare ONNX Runtime session does.)
* stepq's metadata (call signature, input mapping, output structure, timestep grid, placements)
  goes into ``metadata_props`` for ``stepq.backends.onnx.load``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from stepq.backends.onnx.translation import EXPORT_DOMAIN, INT4_WEIGHT_OP
from stepq.compiler import ops
from stepq.compiler.errors import PostconditionError

__all__ = ["METADATA_PREFIX", "clamp_timestep_input", "materialize_int4", "read_metadata", "write_metadata"]

METADATA_PREFIX = "stepq."


def _int4_tensor(values: np.ndarray, name: str) -> ir.Value:
    packed = ops.pack(torch.from_numpy(values.astype(np.int8)), 4, True).numpy()
    tensor = ir.PackedTensor(packed, ir.DataType.INT4, shape=list(values.shape), name=name)
    return ir.Value(name=name, shape=ir.Shape(list(values.shape)), type=ir.TensorType(ir.DataType.INT4),
                    const_value=tensor)


def materialize_int4(model: ir.Model) -> int:
    """Replace every Int4Weight placeholder by an INT4 initializer; returns how many."""
    graph = model.graph
    count = 0
    int4_zero_points: dict[str, ir.Value] = {}
    for node in list(graph):
        if node.domain != EXPORT_DOMAIN or node.op_type != INT4_WEIGHT_OP:
            continue
        src = node.inputs[0]
        if src is None or src.const_value is None:
            raise PostconditionError(f"{node.name}: an Int4Weight placeholder must read an initializer")
        shape = list(node.attributes["shape"].as_ints())
        if not node.attributes["signed"].as_int():
            raise PostconditionError(f"{node.name}: only signed 4-bit weights are stored as INT4")
        packed = src.const_value.numpy().reshape(-1).astype(np.uint8)
        name = f"{src.name}_int4"
        tensor = ir.PackedTensor(packed, ir.DataType.INT4, shape=shape, name=name)
        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.INT4), const_value=tensor)
        graph.register_initializer(value)
        out = node.outputs[0]
        consumers = list(out.consumers())
        direct = consumers and all(c.op_type == "DequantizeLinear" and c.domain == "" and c.inputs[0] is out
                                   and len(c.inputs) > 2 and c.inputs[2] is not None
                                   and c.inputs[2].const_value is not None for c in consumers)
        if direct:
            for c in consumers:
                zp = c.inputs[2]
                assert zp is not None and zp.const_value is not None
                c.replace_input_with(0, value)
                key = str(zp.name)
                if key not in int4_zero_points:
                    int4_zero_points[key] = _int4_tensor(zp.const_value.numpy(), f"{zp.name}_int4")
                    graph.register_initializer(int4_zero_points[key])
                c.replace_input_with(2, int4_zero_points[key])
        else:
            cast = ir.node("Cast", [value], attributes={"to": ir.DataType.INT8}, name=f"{node.name}_cast")
            graph.insert_before(node, cast)
            out.replace_all_uses_with(cast.outputs[0])
        graph.remove(node, safe=True)
        count += 1
    # initializers nothing reads any more (the uint8 bytes, the int8 zero points)
    for name, v in list(graph.initializers.items()):
        if not v.uses() and not v.is_graph_output():
            del graph.initializers[name]
    return count


def clamp_timestep_input(model: ir.Model, name: str, upper: float) -> int:
    """Every reader of graph input ``name`` reads ``Where(IsNaN(t), 0, Clip(t, 0, upper))`` instead
    (integer timesteps: ``Clip(t, 0, floor(upper))``). Returns the number of nodes inserted."""
    graph = model.graph
    t = next((v for v in graph.inputs if v.name == name), None)
    if t is None:
        raise PostconditionError(f"the ONNX graph has no input {name!r} to clamp (inputs: {[v.name for v in graph.inputs]})")
    uses = list(t.uses())
    if not uses:
        return 0
    dtype = t.dtype
    assert dtype is not None
    is_float = dtype.is_floating_point()
    np_dtype = dtype.numpy()

    def const(v: float, label: str) -> ir.Node:
        return ir.node("Constant", [], attributes={"value": ir.tensor(np.array(v, dtype=np_dtype), name=label)},
                       name=f"{name}_{label}")

    lo, hi = const(0, "range_lo"), const(upper if is_float else float(np.floor(upper)), "range_hi")
    clip = ir.node("Clip", [t, lo.outputs[0], hi.outputs[0]], name=f"{name}_clamp")
    new: list[ir.Node] = [lo, hi, clip]
    out = clip.outputs[0]
    if is_float:
        isnan = ir.node("IsNaN", [t], name=f"{name}_isnan")
        where = ir.node("Where", [isnan.outputs[0], lo.outputs[0], out], name=f"{name}_nan_to_zero")
        new += [isnan, where]
        out = where.outputs[0]
    out.name = f"{name}_clamped"
    out.dtype, out.shape = dtype, t.shape
    first = next(iter(graph))
    graph.insert_before(first, new)
    for node, index in uses:
        node.replace_input_with(index, out)
    return len(new)


def write_metadata(model: ir.Model, data: Mapping[str, Any]) -> None:
    for key, value in data.items():
        model.metadata_props[METADATA_PREFIX + key] = json.dumps(value)


def read_metadata(props: Mapping[str, str]) -> dict[str, Any]:
    return {k.removeprefix(METADATA_PREFIX): json.loads(v) for k, v in props.items() if k.startswith(METADATA_PREFIX)}
