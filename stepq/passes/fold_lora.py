"""Fold LoRA adapters: merge each trained B·A into the stored weight and drop the adapter.

    W;  d = call_module[qalora.<weight>]();  fake_quant(add(W, d), s_w, z_w, …)
 →  W ← W + B·A;                             fake_quant(W, s_w, z_w, …)

The merged weight is computed with the same operation the graph ran (``W + d`` in the weight's
dtype), so the folded program equals the unfolded one bit for bit; ``quantize_weights`` then stores
round((deq(W₀) + B·A)/Δ_w) + z_w with the *trained* Δ_w, z_w (re-running PTQ on the merged weight
collapses quality at 4 bits, IntLoRA). No adapter module, node or parameter is left.

Requires: nothing (a program without adapters is left alone). Guarantees: no adapter left;
bit-identical outputs; a second run rewrites nothing.
"""

from __future__ import annotations

import torch
import torch.fx

from stepq.compiler.borrow import replace_tensor
from stepq.compiler.graph_utils import fetch_attr, register_tensor
from stepq.compiler.pass_manager import Contract, OpAbsent, Pass, PassResult
from stepq.compiler.program import Program
from stepq.passes.insert_lora import ADAPTERS, adapter_nodes, is_adapter

__all__ = ["FoldLoRA"]

aten = torch.ops.aten


class FoldLoRA(Pass):
    name = "fold_lora"
    contract = Contract(produces=(OpAbsent(is_adapter, "LoRA adapter"),), preserves_semantics=True, tolerance=0.0,
                        idempotent=True)

    def __call__(self, prog: Program) -> PassResult:
        gm, graph = prog.gm, prog.gm.graph
        count = 0
        for d in adapter_nodes(gm):
            module = gm.get_submodule(str(d.target))
            for add in list(d.users):
                if add.target is not aten.add.Tensor or len(add.args) != 2 or add.args[1] is not d:
                    raise ValueError(f"fold_lora: adapter {d.target!r} feeds {add.format_node()}, not add(weight, adapter)")
                w_node = add.args[0]
                assert isinstance(w_node, torch.fx.Node) and w_node.op == "get_attr"
                w = fetch_attr(gm, w_node.target)
                with torch.no_grad():
                    merged = torch.ops.aten.add.Tensor(w, module())
                    if len(w_node.users) == 1:
                        replace_tensor(gm, str(w_node.target), merged)  # never into the (maybe borrowed) W
                        add.replace_all_uses_with(w_node)
                    else:  # the weight is read elsewhere too: the merged one gets its own buffer
                        name = register_tensor(gm, f"{w_node.target}_merged", merged)
                        with graph.inserting_before(add):
                            m = graph.get_attr(name)
                        m.meta.update(w_node.meta)
                        add.replace_all_uses_with(m)
                graph.erase_node(add)
            graph.erase_node(d)
            gm.delete_submodule(str(d.target))
            count += 1
        if hasattr(gm, ADAPTERS) and not list(gm.get_submodule(ADAPTERS).children()):
            gm.delete_submodule(ADAPTERS)
        return PassResult(count)
