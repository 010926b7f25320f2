"""Insert LoRA adapters: QALoRA's trainable low-rank update in front of each selected weight quantizer.

    linear(x, fake_quant(W, s_w, z_w, …), b)
 →  W ← fake_quant(W, s_w, z_w, …)                          (the stored weight becomes deq(W₀): on the grid)
    d = call_module[qalora.<weight>]()                        B·A, shaped like W, B = 0 at first
    linear(x, fake_quant(add(W, d), s_w, z_w, …), b)

(the same for conv2d; a conv's A has the layer's kernel, its B is 1×1). The adapter module is made by
the factory the pass is constructed with, ``make_adapter(weight_shape, rank, generator)``
(``stepq.methods.efficientdm.lora.LoRADelta``), seeded by ``recipe.qalora.seed`` in graph order.

Selected: every Linear and Conv2d whose weight is fake-quantized from a stored tensor read by that
layer only, whose structural roles avoid ``recipe.qalora.exclude_roles`` (the 8-bit input, output
and timestep-embedding layers, as in EfficientDM's code) and, for a conv, with ``groups == 1``.

Because a grid value fake-quantizes to itself, the rewrite leaves the outputs bit-identical until
the adapters are trained (B = 0). ``fold_lora`` merges them back into the stored weights.

Requires: a recipe with a ``qalora`` section; no observer left (the weight steps are final).
Guarantees: every selected layer reads its adapter; bit-identical outputs; a second run rewrites nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx

from stepq.compiler import analysis, meta, ops
from stepq.compiler.borrow import replace_tensor
from stepq.compiler.graph_utils import fetch_attr
from stepq.compiler.pass_manager import Contract, NoneLeft, OpAbsent, Pass, PassResult, RecipeHas
from stepq.compiler.program import Program
from stepq.passes.materialize_quantizers import is_observer

__all__ = ["ADAPTERS", "AdapterFactory", "InsertLoRA", "adapter_nodes", "is_adapter", "lora_candidates"]

aten = torch.ops.aten

#: the GraphModule attribute the adapters live under (``qalora.<weight name>``)
ADAPTERS = "qalora"

#: ``make_adapter(weight_shape, rank, generator) -> module`` whose ``forward()`` returns B·A shaped like the weight
AdapterFactory = Callable[[torch.Size, int, torch.Generator], torch.nn.Module]


def is_adapter(node: torch.fx.Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith(f"{ADAPTERS}.")


def adapter_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if is_adapter(n)]


def _weight_quantizer(layer: torch.fx.Node) -> torch.fx.Node | None:
    w = layer.args[1] if len(layer.args) > 1 else None
    if isinstance(w, torch.fx.Node) and w.target is ops.FAKE_QUANT and w.meta.get(meta.QUANTIZER_ROLE) == "weight":
        return w
    return None


def lora_candidates(prog: Program) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(layer, weight quantizer) of every layer the recipe's ``qalora`` section selects, adapted or not."""
    cfg = prog.recipe.qalora
    exclude = frozenset(cfg.exclude_roles) if cfg is not None else frozenset()
    out = []
    for node in prog.gm.graph.nodes:
        kind = analysis.op_kind(node)
        if kind not in ("linear", "conv2d") or exclude & frozenset(node.meta.get(meta.ROLES, ())):
            continue
        if kind == "conv2d" and len(node.args) > 6 and node.args[6] != 1:
            continue  # grouped / depthwise conv: B·A has no single-kernel form
        fq = _weight_quantizer(node)
        if fq is None or len(fq.users) != 1:
            continue
        src = fq.args[0]
        if isinstance(src, torch.fx.Node) and src.op == "get_attr" and len(src.users) == 1:
            out.append((node, fq))
        elif isinstance(src, torch.fx.Node) and src.target is aten.add.Tensor and any(
                isinstance(a, torch.fx.Node) and is_adapter(a) for a in src.args):
            out.append((node, fq))
    return out


def _unadapted(prog: Program) -> list[torch.fx.Node]:
    if prog.recipe is None or prog.recipe.qalora is None:
        return []
    return [layer for layer, fq in lora_candidates(prog) if arg_is_get_attr(fq)]


def arg_is_get_attr(fq: torch.fx.Node) -> bool:
    return isinstance(fq.args[0], torch.fx.Node) and fq.args[0].op == "get_attr"


class InsertLoRA(Pass):
    name = "insert_lora"
    contract = Contract(
        requires=(RecipeHas("qalora"), OpAbsent(is_observer, "observer")),
        produces=(NoneLeft(_unadapted, "layer selected by the recipe's qalora section without an adapter"),),
        preserves_semantics=True,
        tolerance=0.0,
        idempotent=True,
    )

    def __init__(self, make_adapter: AdapterFactory):
        self.make_adapter = make_adapter

    def __repr__(self) -> str:
        return f"InsertLoRA({getattr(self.make_adapter, '__name__', self.make_adapter)!s})"

    def __call__(self, prog: Program) -> PassResult:
        cfg = prog.recipe.qalora
        assert cfg is not None
        gm, graph = prog.gm, prog.gm.graph
        gen = torch.Generator().manual_seed(cfg.seed)
        count = 0
        for layer, fq in lora_candidates(prog):
            if not arg_is_get_attr(fq):
                continue
            w_node = fq.args[0]
            assert isinstance(w_node, torch.fx.Node)
            w = fetch_attr(gm, w_node.target)
            s, z = fetch_attr(gm, fq.args[1].target), fetch_attr(gm, fq.args[2].target)  # type: ignore[union-attr]
            with torch.no_grad():
                # deq(W₀) is on the grid; a new tensor, since W is the user's (borrowed, never written)
                replace_tensor(gm, str(w_node.target), ops.fake_quant(w, s, z, *fq.args[3:]))  # type: ignore[arg-type]
            key = f"{ADAPTERS}.{str(w_node.target).replace('.', '_')}"
            gm.add_submodule(key, self.make_adapter(w.shape, cfg.rank, gen))
            with graph.inserting_before(fq):
                d = graph.call_module(key, ())
                add = graph.call_function(aten.add.Tensor, (w_node, d))
            for n in (d, add):
                meta.mark_inserted(n)
                n.meta["val"] = w_node.meta.get("val")
            d.meta[meta.LAYER] = layer.meta.get(meta.LAYER, layer.name)
            fq.update_arg(0, add)
            count += 1
        return PassResult(count)
