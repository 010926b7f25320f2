"""Materialize quantizers: replace every calibrated observer with a fake-quant op.

    call_module[<q>_observer](x, t)  →  fake_quant(x, <q>_scale, <q>_zero_point, qmin, qmax)

The scale and zero point come from the observer's statistics and the spec's observer kind
(``stepq.calibration.qparams.activation_qparams``) and are stored as buffers; the statistics
themselves (overall and per training timestep) move to ``prog.state.activation_stats`` so
timestep-indexed methods can start from them. The observer modules are deleted.

Requires: nothing the manager can check up front (an observer that saw no data raises
``CalibrationError``). Guarantees: no observer left; one fake_quant per observer, and its statistics
in ``prog.state.activation_stats``. Not semantics-preserving (an observer is the identity, a
fake_quant is not); idempotent.
"""

from __future__ import annotations

import torch.fx

from stepq.calibration.observers import ActivationObserver, observer_nodes
from stepq.calibration.qparams import activation_qparams
from stepq.compiler import meta, ops
from stepq.compiler.errors import CalibrationError
from stepq.compiler.graph_utils import register_tensor
from stepq.compiler.pass_manager import Contract, OpAbsent, Pass, PassResult
from stepq.compiler.program import Program

__all__ = ["MaterializeQuantizers", "is_observer", "observer_nodes"]


def is_observer(node: torch.fx.Node) -> bool:
    """Whether ``node`` calls an ``ActivationObserver``."""
    gm = node.graph.owning_module
    return (node.op == "call_module" and gm is not None
            and isinstance(gm.get_submodule(str(node.target)), ActivationObserver))


class MaterializeQuantizers(Pass):
    name = "materialize_quantizers"
    contract = Contract(produces=(OpAbsent(is_observer, "observer"),), writes=("activation_stats",),
                        preserves_semantics=False, idempotent=True)

    def __call__(self, prog: Program) -> PassResult:
        gm = prog.gm
        stats_store = prog.state.activation_stats
        count = 0
        for node, obs in observer_nodes(gm):
            name = node.meta.get(meta.ACT_QUANTIZER, obs.layer)
            st = obs.stats
            if st.total == 0:
                raise CalibrationError(f"the observer of {name!r} saw no data; run calibration before converting")
            spec = obs.spec
            scale, zp = activation_qparams(st.overall.values, st.global_min, st.global_max, spec)
            s_name = register_tensor(gm, f"{name}_scale", scale)
            z_name = register_tensor(gm, f"{name}_zero_point", zp)
            x = node.args[0]
            with gm.graph.inserting_before(node):
                s_node = gm.graph.get_attr(s_name)
                z_node = gm.graph.get_attr(z_name)
                fq = gm.graph.call_function(ops.FAKE_QUANT, (x, s_node, z_node, spec.quant_min, spec.quant_max, None, 0))
            for n in (s_node, z_node):
                meta.mark_inserted(n)
            meta.mark_inserted(fq, **{meta.QUANTIZER_ROLE: "activation", meta.ACT_QUANTIZER: name,
                                      meta.QSPEC: spec})
            fq.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(fq)
            gm.graph.erase_node(node)
            gm.delete_submodule(str(node.target))
            stats_store[name] = st
            count += 1
        return PassResult(count)
