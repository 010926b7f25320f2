"""Insert quantizers: fake-quantized weights and observed activations for every annotated op.

Weights (static, so their scales are computed here, data-free):

    linear(x, W, b)  →  linear(x, fake_quant(W, s_W, z_W, qmin, qmax, axis, group), b)

with ``s_W, z_W`` buffers next to the weight (``<weight>_scale``, ``<weight>_zero_point``) from the
spec's observer (min-max, percentile or MSE search, per tensor / channel / group).

Ternary weights (``TernarySpec``, TerDiT): ``linear(x, ternary(W, α, axis, eps), b)`` with the learned
scale ``α`` a buffer ``<weight>_alpha`` initialised to γ = mean|W| (per tensor or output channel).

Activations (data-dependent): the operand is routed through an observer that records its
statistics along the calibration trajectories and returns it unchanged,

    linear(x, …)  →  linear(call_module[<layer>.input_observer](x, timestep), …)

``materialize_quantizers`` later replaces each observer by ``fake_quant`` with the frozen scale.
One quantizer serves every consumer of the same tensor with the same spec (q/k/v projections of
one hidden state share it), int64 and bool operands are never quantized, and an operand that is
already quantized is left alone, so a second run reports no change.

Requires: every quantizable op annotated (``meta.LAYER_SPEC``). Guarantees: every annotated float
operand is quantized or observed (a weight computed in the graph is left, with a detail); a second
run rewrites nothing. Not semantics-preserving (weights are fake-quantized).
"""

from __future__ import annotations

import logging
import zlib

import torch
import torch.fx

from stepq.calibration.observers import ActivationObserver
from stepq.calibration.qparams import weight_qparams
from stepq.compiler import analysis, meta, ops
from stepq.compiler.graph_utils import fetch_attr, register_tensor, unique_name
from stepq.compiler.pass_manager import Contract, NodesHave, OpAbsent, Pass, PassResult
from stepq.compiler.program import Program
from stepq.compiler.ternary_ops import ternary_gamma
from stepq.recipe.specs import QuantSpec, TernarySpec

__all__ = ["InsertQuantizers", "is_quantizer"]

log = logging.getLogger(__name__)

_SDPA_SUFFIX = ("q_input", "k_input", "v_input")


def is_quantizer(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.meta.get(meta.QUANTIZER_ROLE) is not None


def _operand_suffix(node: torch.fx.Node, index: int) -> str:
    if analysis.op_kind(node) in ("linear", "conv2d"):
        return "input"
    if node.target is torch.ops.aten.scaled_dot_product_attention.default:
        return _SDPA_SUFFIX[index]
    return "lhs_input" if index == analysis.activation_arg_indices(node)[0] else "rhs_input"


def _unquantized_operand(node: torch.fx.Node) -> bool:
    """An annotated op with a float activation operand, or a get_attr weight, that its spec quantizes
    but nothing quantizes or observes."""
    spec = meta.get_layer_spec(node)
    if spec is None or spec.is_float:
        return False
    if spec.activation is not None:
        for idx in analysis.activation_arg_indices(node):
            x = node.args[idx]
            if analysis.is_float_tensor(x) and not is_quantizer(x):
                return True
    widx = analysis.weight_arg_index(node) if spec.weight is not None else None
    w = node.args[widx] if widx is not None else None
    return isinstance(w, torch.fx.Node) and w.op == "get_attr" and not is_quantizer(w)


class InsertQuantizers(Pass):
    name = "insert_quantizers"
    contract = Contract(
        requires=(NodesHave(meta.LAYER_SPEC, on=lambda n: analysis.op_kind(n) is not None, what="quantizable op"),),
        produces=(OpAbsent(_unquantized_operand, "annotated op with an operand neither quantized nor observed"),),
        preserves_semantics=False,
        idempotent=True,
    )

    def __call__(self, prog: Program) -> PassResult:
        gm = prog.gm
        recipe = prog.recipe
        t_node = prog.timestep_node
        weights: dict[tuple[torch.fx.Node, QuantSpec], torch.fx.Node] = {}
        acts: dict[tuple[torch.fx.Node, QuantSpec], torch.fx.Node] = {}
        # a module called more than once (DiT's timestep embedder, shared by the blocks and the final
        # adaLN) gets one quantizer per call: "<layer>.input", "<layer>.input_call2", …
        used = {n.meta[meta.ACT_QUANTIZER] for n in gm.graph.nodes if meta.ACT_QUANTIZER in n.meta}
        count = 0
        details: list[str] = []
        for node in list(gm.graph.nodes):
            spec = meta.get_layer_spec(node)
            if spec is None or spec.is_float:
                continue
            layer = node.meta.get(meta.LAYER, node.name)
            if spec.weight is not None:
                idx = analysis.weight_arg_index(node)
                if idx is not None:
                    count += self._weight(gm, node, idx, spec.weight, weights, details)
            if spec.activation is not None:
                for idx in analysis.activation_arg_indices(node):
                    x = node.args[idx]
                    if not analysis.is_float_tensor(x) or is_quantizer(x):
                        continue
                    key = (x, spec.activation)
                    q = acts.get(key)
                    if q is None:
                        name = base = f"{layer}.{_operand_suffix(node, idx)}"
                        k = 1
                        while name in used:
                            k += 1
                            name = f"{base}_call{k}"
                        used.add(name)
                        obs = ActivationObserver(
                            name, spec.activation, num_train_timesteps=recipe.num_train_timesteps,
                            timestep_scale=prog.timestep_scale, timestep_policy=recipe.timestep_policy,
                            seed=zlib.crc32(name.encode()))
                        target = unique_name(gm, f"{name}_observer")
                        gm.add_submodule(target, obs)
                        with gm.graph.inserting_before(node):
                            q = gm.graph.call_module(target, (x, t_node))
                        meta.mark_inserted(q, **{meta.QUANTIZER_ROLE: "activation", meta.ACT_QUANTIZER: name,
                                                 meta.QSPEC: spec.activation})
                        q.meta["val"] = x.meta.get("val")
                        acts[key] = q
                        count += 1
                    node.update_arg(idx, q)
        return PassResult(count, tuple(details))

    def _weight(self, gm: torch.fx.GraphModule, node: torch.fx.Node, idx: int, spec: QuantSpec | TernarySpec,
                cache: dict, details: list[str]) -> int:
        w = node.args[idx]
        if not isinstance(w, torch.fx.Node) or is_quantizer(w):
            return 0
        if w.op != "get_attr":
            details.append(f"{node.name}: weight is computed in the graph ({w.name}); left to the pass that made it")
            return 0
        key = (w, spec)
        fq = cache.get(key)
        if fq is not None:
            node.update_arg(idx, fq)
            return 0
        tensor = fetch_attr(gm, w.target)
        if isinstance(spec, TernarySpec):
            a_name = register_tensor(gm, f"{w.target}_alpha", ternary_gamma(tensor.detach(), spec.axis).clone())
            with gm.graph.inserting_before(node):
                a_node = gm.graph.get_attr(a_name)
                fq = gm.graph.call_function(ops.TERNARY, (w, a_node, spec.axis, spec.eps))
            meta.mark_inserted(a_node)
        else:
            fq = self._fake_quant_weight(gm, node, w, tensor, spec)
        meta.mark_inserted(fq, **{meta.QUANTIZER_ROLE: "weight", meta.ACT_QUANTIZER: str(w.target), meta.QSPEC: spec})
        fq.meta["val"] = w.meta.get("val")
        cache[key] = fq
        node.update_arg(idx, fq)
        return 1

    def _fake_quant_weight(self, gm: torch.fx.GraphModule, node: torch.fx.Node, w: torch.fx.Node,
                           tensor: torch.Tensor, spec: QuantSpec) -> torch.fx.Node:
        scale, zp, axis, group = weight_qparams(tensor, spec)
        s_name = register_tensor(gm, f"{w.target}_scale", scale)
        z_name = register_tensor(gm, f"{w.target}_zero_point", zp)
        with gm.graph.inserting_before(node):
            s_node = gm.graph.get_attr(s_name)
            z_node = gm.graph.get_attr(z_name)
            fq = gm.graph.call_function(ops.FAKE_QUANT, (w, s_node, z_node, spec.quant_min, spec.quant_max, axis, group))
        for n in (s_node, z_node):
            meta.mark_inserted(n)
        return fq
