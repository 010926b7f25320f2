"""Direct translation: the lowered FX graph → ONNX IR, without torch.onnx's re-export.

``torch.onnx.export(dynamo=True)`` re-exports the graph it is given (torch.export), decomposes it
(``run_decompositions``, a second trace), translates it and optimises it; on DiT-XL/2 that is 131 s,
almost all of it spent re-deriving what the captured graph already is: ATen ops with a FakeTensor
``meta["val"]`` on every node (the capture's symbolic batch included). This module feeds the lowered
graph straight to the exporter's node translator (the torchlib registry plus stepq's
``TRANSLATION_TABLE``), node by node:

* a node without ``meta["val"]`` (the lowering's QuantizeLinear nodes, most parameters) gets one:
  parameters their real tensor (they become initializers under their parameter path), call nodes a
  FakeTensor computed from their inputs' under the capture's FakeTensorMode;
* assertion nodes are dropped and explicit type-promotion casts inserted (the exporter's own passes);
* placeholders that carry tensors become graph inputs in call order; the outputs follow the graph's
  output node.

Any op the registry cannot translate as captured (one torch.onnx would first decompose) raises
``DirectTranslationError``; ``export`` then falls back to the full torch.onnx path. The exporter's
node translator is a private torch API (``torch.onnx._internal.exporter._core``), pinned with torch.
"""

from __future__ import annotations

import functools
import logging
import operator
from typing import Any

import onnx_ir as ir
import torch
import torch.fx
from onnxscript import version_converter
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.onnx._internal.exporter import _core, _decomp, _ir_passes, _registration
from torch.onnx._internal.fx import passes as _fx_passes

from stepq.backends.onnx.translation import TRANSLATION_TABLE
from stepq.compiler.errors import StepqError

__all__ = ["DirectTranslationError", "translate"]

log = logging.getLogger(__name__)


class DirectTranslationError(StepqError):
    """The lowered graph has a node the direct translator cannot take (torch.onnx's path still can)."""


#: what torch.onnx's ``remove_assertion_nodes`` drops (it walks every submodule as a GraphModule, which
#: ``ep.module()``'s plain container modules are not, so the set is applied to the root graph here).
_ASSERTIONS = {
    torch.ops.aten.sym_constrain_range_for_size.default,
    torch.ops.aten._assert_async.default,
    torch.ops.aten._assert_async.msg,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten._assert_tensor_metadata.default,
}


@functools.cache
def registry(opset: int) -> _registration.ONNXRegistry:
    """torchlib's registry at ``opset`` with stepq's translation table on top (as torch.onnx.export builds it).

    Built once per opset (≈ 2 s: torchlib's import and schema conversion) and only read afterwards."""
    reg = _registration.ONNXRegistry.from_torchlib(opset_version=opset)
    for torch_op, onnx_fn in TRANSLATION_TABLE.items():
        reg.register_op(torch_op, onnx_fn, is_complex=False)
    return reg


def _fake_mode(gm: torch.fx.GraphModule) -> Any:
    fake_mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])
    if fake_mode is None:
        raise DirectTranslationError("the graph's placeholders carry no FakeTensor (was it captured by stepq?)")
    return fake_mode


def _fill_meta(gm: torch.fx.GraphModule) -> None:
    """Give every node the ``meta["val"]`` the translator reads (FakeTensors of the capture's mode)."""
    fake_mode = _fake_mode(gm)
    fakes: dict[torch.fx.Node, Any] = {}

    def fake_of(n: torch.fx.Node) -> Any:
        if n not in fakes:
            v = n.meta["val"]
            fakes[n] = fake_mode.from_tensor(v) if isinstance(v, torch.Tensor) and not isinstance(
                v, torch._subclasses.FakeTensor) else v
        return fakes[n]

    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = gm
            for atom in str(node.target).split("."):
                value = getattr(value, atom)
            if not isinstance(value, torch.Tensor):
                raise DirectTranslationError(f"get_attr node {node.name!r} ({node.target}) is not a tensor")
            # a real tensor: the translator turns it into an initializer holding these bytes
            node.meta["val"] = value.detach()
        elif node.op == "call_function" and "nn_module_stack" not in node.meta:
            # nodes the passes inserted: the module of the layer they feed (ONNX node metadata)
            stacks = [u.meta["nn_module_stack"] for u in node.users if "nn_module_stack" in u.meta]
            node.meta["nn_module_stack"] = stacks[0] if stacks else {}
        if node.op == "call_function" and "val" not in node.meta:
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), fake_of)
            try:
                with fake_mode:
                    node.meta["val"] = node.target(*args, **kwargs)
            except Exception as e:
                raise DirectTranslationError(f"no FakeTensor for node {node.name!r} ({node.target}): "
                                             f"{type(e).__name__}: {e}") from e


def _functionalize_copies(gm: torch.fx.GraphModule) -> int:
    """``copy_(dst, src)`` into a fresh tensor read by nobody after it → ``src`` (cast to dst's dtype).

    Decompositions of in-place ops leave such copies (``rms_norm`` → ``add_`` → ``add`` + ``copy_``);
    torch.export would functionalize them. Only the safe case is rewritten: ``dst`` is the output of
    a non-aliasing op, every other reader of it runs before the copy, and the shapes agree; any other
    ``copy_`` is left for the translator to reject (and ``export`` to fall back).
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.copy_.default:
            continue
        dst, src = node.args[:2]
        if not (isinstance(dst, torch.fx.Node) and isinstance(src, torch.fx.Node)):
            continue
        fresh = isinstance(dst.target, torch._ops.OpOverload) and not any(
            r.alias_info is not None for r in dst.target._schema.returns)
        if not fresh or any(order[u] > order[node] for u in dst.users if u is not node):
            continue
        dv, sv = dst.meta.get("val"), src.meta.get("val")
        if not (isinstance(dv, torch.Tensor) and isinstance(sv, torch.Tensor)) or dv.shape != sv.shape:
            continue
        out = src
        if dv.dtype != sv.dtype:
            with gm.graph.inserting_before(node):
                out = gm.graph.call_function(torch.ops.aten._to_copy.default, (src,), {"dtype": dv.dtype})
            out.meta["val"] = node.meta.get("val", dv)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        if not dst.users:
            gm.graph.erase_node(dst)
        done += 1
    return done


def _decompose_unregistered(gm: torch.fx.GraphModule, reg: _registration.ONNXRegistry) -> int:
    """Replace each node whose op has no ONNX translation by its decomposition, traced locally.

    The same table torch.onnx's ``run_decompositions`` uses, applied to those nodes only (on the
    digits models a handful of ``aten.to`` / ``aten.chunk``-like nodes, not the whole graph).
    """
    table: dict[Any, Any] = _decomp.create_onnx_friendly_decomposition_table(
        set(_decomp.get_onnx_implemented_overloads(reg)))
    fake_mode = _fake_mode(gm)
    done = 0
    for node in list(gm.graph.nodes):
        if (node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload)
                or reg.is_registered(node.target)):
            continue
        decomp = table.get(node.target)
        if decomp is None and torch._C._dispatch_has_kernel_for_dispatch_key(node.target.name(),
                                                                            "CompositeImplicitAutograd"):
            decomp = node.target.decompose  # what run_decompositions does for composite ops
        if decomp is None:
            continue  # the translator reports it
        flat, spec = torch.utils._pytree.tree_flatten((node.args, node.kwargs))
        slots = [i for i, a in enumerate(flat) if isinstance(a, torch.fx.Node)]
        target = node.target

        def run(*tensors: Any, _flat: list[Any] = flat, _slots: list[int] = slots, _d: Any = decomp,
                _spec: Any = spec) -> Any:
            leaves = list(_flat)
            for i, t in zip(_slots, tensors):
                leaves[i] = t
            args, kwargs = torch.utils._pytree.tree_unflatten(leaves, _spec)
            return _d(*args, **kwargs)

        try:
            with fake_mode:
                # functionalized: composite kernels may write in place (rms_norm's copy_)
                sub = make_fx(torch.func.functionalize(run, remove="mutations_and_views"), tracing_mode="symbolic",
                              decomposition_table=table)(
                    *[flat[i].meta["val"] for i in slots])
        except Exception as e:
            raise DirectTranslationError(f"decomposing node {node.name!r} ({target}) failed: "
                                         f"{type(e).__name__}: {e}") from e
        env: dict[torch.fx.Node, Any] = {}
        placeholders = iter(flat[i] for i in slots)
        with gm.graph.inserting_before(node):
            for sn in sub.graph.nodes:
                if sn.op == "placeholder":
                    env[sn] = next(placeholders)
                elif sn.op == "get_attr":
                    name = f"_stepq_decomp_{node.name}_{sn.target}"
                    gm.register_buffer(name, getattr(sub, str(sn.target)))
                    env[sn] = gm.graph.get_attr(name)
                elif sn.op == "output":
                    out = torch.fx.node.map_arg(sn.args[0], env.__getitem__)
                else:
                    env[sn] = gm.graph.node_copy(sn, env.__getitem__)
        if isinstance(out, torch.fx.Node):
            node.replace_all_uses_with(out)
        else:
            for user in list(node.users):
                if user.op == "call_function" and user.target is operator.getitem:
                    user.replace_all_uses_with(out[user.args[1]])
                    gm.graph.erase_node(user)
                else:
                    raise DirectTranslationError(f"node {node.name!r} ({target}) returns {type(out).__name__} "
                                                 f"used by {user.name!r} other than by indexing")
        gm.graph.erase_node(node)
        done += 1
    if done:
        gm.recompile()
    return done


def translate(gm: torch.fx.GraphModule, *, opset: int) -> ir.Model:
    """The lowered graph module (modified: meta, assertion nodes, casts) as an ONNX IR model.

    Graph inputs: the tensor placeholders, in order (the call's tensor leaves); outputs: the output
    node's values. Initializers are named after the parameter / buffer path.
    """
    _fill_meta(gm)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTIONS:
            gm.graph.erase_node(node)
    reg = registry(opset)
    n_decomposed = _decompose_unregistered(gm, reg)
    n_copies = _functionalize_copies(gm)  # the captured graph's and the decompositions' in-place copies
    log.debug("direct translation: %d node(s) decomposed, %d copy_ made functional", n_decomposed, n_copies)
    try:
        _fx_passes.InsertTypePromotion(gm).run()
    except Exception as e:
        raise DirectTranslationError(f"type promotion failed: {type(e).__name__}: {e}") from e
    attr_names = {n.name: str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}

    model = ir.Model(ir.Graph([], [], nodes=[], name="main_graph"), ir_version=10,
                     producer_name="stepq", producer_version=torch.__version__)
    try:
        values = _core._translate_fx_graph(gm.graph, model, graph_like=model.graph, owned_graphs={},
                                           lower="at_conversion", registry=reg)
    except Exception as e:  # DispatchError / ConversionError: an op torch.onnx would decompose first
        cause = e.__cause__ or e
        raise DirectTranslationError(f"{e}; {type(cause).__name__}: {str(cause)[:300]}") from e

    model.graph.inputs.clear()
    for node in gm.graph.nodes:
        if node.op == "placeholder" and isinstance(node.meta.get("val"), torch.Tensor):
            value = values[node.name]
            assert isinstance(value, ir.Value)
            model.graph.inputs.append(value)
    for old, new in attr_names.items():
        init = model.graph.initializers.pop(old, None)
        if init is not None:
            init.name = new
            model.graph.initializers[new] = init
    _ir_passes.add_opset_imports(model)  # torchlib emits opset 18 ...
    version_converter.convert_version(model, opset, fallback=True)  # ... as torch.onnx.export, convert
    return model
