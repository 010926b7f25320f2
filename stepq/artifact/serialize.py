"""A GraphModule as JSON plus a flat dict of tensors (for safetensors): no pickle anywhere.

The graph is a list of nodes ``{name, op, target, args, kwargs}``. Arguments are encoded with tags
(``{"node": name}``, ``{"dtype": "float32"}``, ``{"list": [...]}``, ...). Targets are resolved on
load against a closed set: ``torch.ops.<namespace>.<op>.<overload>`` for the aten, prims and stepq
namespaces, and ``operator.getitem``; anything else is refused, so loading an artefact can never
run arbitrary code. Tensors read by ``get_attr`` are stored under their qualified names and
registered as buffers on load. The pytree input/output specs of ``ep.module()``'s calling
convention go through ``torch.utils._pytree.treespec_dumps``.
"""

from __future__ import annotations

import importlib
import json
import math
import operator
from typing import Any

import torch
import torch.fx
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from stepq.compiler import meta
from stepq.compiler.errors import ArtifactError
from stepq.compiler.graph_utils import fetch_attr
from stepq.recipe.specs import LayerSpec, QuantSpec, TernarySpec

__all__ = ["graph_from_json", "graph_to_json"]

GRAPH_FORMAT = 1
_OP_NAMESPACES = ("aten", "prims", "stepq", "_operator")
_BUILTINS: dict[str, Any] = {
    f"operator.{f}": getattr(operator, f)
    for f in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "eq", "ne", "lt", "le",
              "gt", "ge", "and_", "or_", "not_")
}
_BUILTINS.update({f"torch.{f}": getattr(torch, f) for f in ("sym_float", "sym_int", "sym_max", "sym_min", "sym_not",
                                                             "sym_ite", "sym_sqrt") if hasattr(torch, f)})
_PYTREE_MODULE_PREFIXES = ("builtins", "collections", "diffusers.", "torch.")


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target.namespace}.{target._opname}.{target._overloadname}"
    for name, fn in _BUILTINS.items():
        if target is fn:
            return name
    raise ArtifactError(f"cannot serialise call target {target!r}: only torch.ops overloads and operator / "
                        "symbolic-int builtins are allowed in a saved graph")


def _resolve_target(name: str) -> Any:
    if name in _BUILTINS:
        return _BUILTINS[name]
    parts = name.split(".")
    if len(parts) != 5 or parts[:2] != ["torch", "ops"] or parts[2] not in _OP_NAMESPACES:
        raise ArtifactError(f"refusing to load call target {name!r}")
    try:
        return getattr(getattr(getattr(torch.ops, parts[2]), parts[3]), parts[4])
    except AttributeError:
        raise ArtifactError(f"unknown op {name!r} (is the library that defines it imported?)") from None


def _enc(v: Any) -> Any:
    if isinstance(v, torch.fx.Node):
        return {"node": v.name}
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, list):
        return {"list": [_enc(x) for x in v]}
    if isinstance(v, tuple):
        return {"tuple": [_enc(x) for x in v]}
    if isinstance(v, dict):
        return {"dict": [[k, _enc(x)] for k, x in v.items()]}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v).removeprefix("torch.")}
    if isinstance(v, torch.layout):
        return {"layout": str(v).removeprefix("torch.")}
    if isinstance(v, slice):
        return {"slice": [_enc(v.start), _enc(v.stop), _enc(v.step)]}
    raise ArtifactError(f"cannot serialise graph argument {v!r} of type {type(v).__name__}")


def _dec(v: Any, nodes: dict[str, torch.fx.Node]) -> Any:
    if not isinstance(v, dict):
        return v
    (tag, x), = v.items()
    if tag == "node":
        return nodes[x]
    if tag == "float":
        return float(x)
    if tag == "list":
        return [_dec(i, nodes) for i in x]
    if tag == "tuple":
        return tuple(_dec(i, nodes) for i in x)
    if tag == "dict":
        return {k: _dec(i, nodes) for k, i in x}
    if tag in ("dtype", "memory_format", "layout"):
        out = getattr(torch, x, None)
        if out is None:
            raise ArtifactError(f"unknown torch {tag} {x!r}")
        return out
    if tag == "device":
        return torch.device(x)
    if tag == "slice":
        return slice(*(_dec(i, nodes) for i in x))
    raise ArtifactError(f"unknown argument tag {tag!r}")


def _meta_to_json(node: torch.fx.Node) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in (meta.LAYER, meta.OP_KIND, meta.RULE, meta.QUANTIZER_ROLE, meta.ACT_QUANTIZER, meta.WEIGHT_BITS,
                meta.STEPQ_INSERTED, meta.PTQD_NODE):
        if key in node.meta:
            out[key] = node.meta[key]
    if meta.ROLES in node.meta:
        out[meta.ROLES] = sorted(node.meta[meta.ROLES])
    if meta.LAYER_SPEC in node.meta:
        spec = node.meta[meta.LAYER_SPEC]
        out[meta.LAYER_SPEC] = None if spec is None else spec.to_dict()
    if node.meta.get(meta.QSPEC) is not None:
        out[meta.QSPEC] = node.meta[meta.QSPEC].to_dict()
    return out


def _meta_from_json(d: dict[str, Any]) -> dict[str, Any]:
    out = dict(d)
    if meta.ROLES in out:
        out[meta.ROLES] = frozenset(out[meta.ROLES])
    if meta.LAYER_SPEC in out:
        out[meta.LAYER_SPEC] = LayerSpec.from_dict(out[meta.LAYER_SPEC])
    if meta.QSPEC in out:
        d = out[meta.QSPEC]
        out[meta.QSPEC] = TernarySpec.from_dict(d) if d.get("kind") == TernarySpec.kind else QuantSpec.from_dict(d)
    return out


def graph_to_json(gm: torch.fx.GraphModule) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(graph description, tensors by qualified name)."""
    nodes, tensors = [], {}
    for n in gm.graph.nodes:
        entry: dict[str, Any] = {"name": n.name, "op": n.op}
        if n.op == "call_function":
            entry["target"] = _target_name(n.target)
        elif n.op == "get_attr":
            entry["target"] = n.target
            t = fetch_attr(gm, n.target)
            if not isinstance(t, torch.Tensor):
                raise ArtifactError(f"get_attr {n.target!r} is not a tensor")
            tensors[n.target] = t.detach().contiguous().clone()
        elif n.op in ("placeholder", "output"):
            entry["target"] = n.target
        else:
            raise ArtifactError(f"cannot serialise a {n.op} node ({n.name}: {n.target}); convert the program first")
        entry["args"] = _enc(tuple(n.args))
        entry["kwargs"] = _enc(dict(n.kwargs))
        node_meta = _meta_to_json(n)
        if node_meta:
            entry["meta"] = node_meta
        nodes.append(entry)
    doc: dict[str, Any] = {"format": GRAPH_FORMAT, "nodes": nodes}
    codegen = gm.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen):
        info = codegen.pytree_info
        assert info.in_spec is not None and info.out_spec is not None
        doc["pytree"] = {"orig_args": list(info.orig_args), "in_spec": pytree.treespec_dumps(info.in_spec),
                         "out_spec": pytree.treespec_dumps(info.out_spec)}
    return doc, tensors


def _import_pytree_types(spec_json: str) -> None:
    """Import the modules of the output types a spec names (diffusers output classes register
    themselves with pytree on import)."""
    for name in set(_walk_types(json.loads(spec_json))):
        module = name.rpartition(".")[0]
        if module and module.startswith(_PYTREE_MODULE_PREFIXES) and module != "builtins":
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ArtifactError(f"the saved output structure needs {module!r}: {e}") from None


def _walk_types(obj: Any):
    if isinstance(obj, dict):
        if isinstance(obj.get("type"), str):
            yield obj["type"]
        for v in obj.values():
            yield from _walk_types(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk_types(v)


def graph_from_json(doc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    if doc.get("format") != GRAPH_FORMAT:
        raise ArtifactError(f"graph format {doc.get('format')!r} is not supported (expected {GRAPH_FORMAT})")
    import stepq.compiler.ops  # noqa: F401  - defines the stepq ops the graph refers to

    root = torch.nn.Module()
    from stepq.compiler.graph_utils import register_tensor

    for name, t in tensors.items():
        register_tensor(root, name, t)
    graph = torch.fx.Graph()
    nodes: dict[str, torch.fx.Node] = {}
    for e in doc["nodes"]:
        args = _dec(e["args"], nodes)
        kwargs = _dec(e["kwargs"], nodes)
        op = e["op"]
        if op == "get_attr" and e["target"] not in tensors:
            raise ArtifactError(f"the graph reads {e['target']!r} but the weights file has no such tensor")
        if op in ("placeholder", "get_attr", "output"):
            target = e["target"]
        elif op == "call_function":
            target = _resolve_target(e["target"])
        else:
            raise ArtifactError(f"unknown node op {op!r}")
        n = graph.create_node(op, target, args, kwargs, name=e["name"])
        if n.name != e["name"]:
            raise ArtifactError(f"duplicate node name {e['name']!r} in the saved graph")
        n.meta.update(_meta_from_json(e.get("meta", {})))
        nodes[e["name"]] = n
    if "pytree" in doc:
        pt = doc["pytree"]
        _import_pytree_types(pt["out_spec"])
        graph._codegen = _PyTreeCodeGen(_PyTreeInfo(pt["orig_args"], pytree.treespec_loads(pt["in_spec"]),
                                                    pytree.treespec_loads(pt["out_spec"])))
    graph.lint()
    return torch.fx.GraphModule(root, graph)
