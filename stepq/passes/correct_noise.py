"""Correct noise: the denoiser's prediction becomes PTQD's corrected estimate of ε.

PTQD models the quantized prediction as ε̂ = (1 + k_t)·ε + b_t + r_t (k_t: the part of the error
correlated with ε, b_t: its per-channel mean, r_t: a residual; ``stepq.methods.ptqd.statistics``). The pass
inverts the deterministic part on the model's output:

    y = model(x_t, t, …)                        the prediction: ε̂ (its first C channels)
 →  i  = timestep_index(t, T, timestep_scale)   (the graph's single index node, shared with TDQ tables)
    y' = (ε̂ − B[i]) / (1 + K[i])               K: [T] buffer ``ptqd_k_table``, B: [T, C] ``ptqd_bias_table``
       = ε + r_t / (1 + k_t)

Per sample when the output shares its batch with the timestep (K[i] viewed [B, 1, …], B[i]
[B, C, 1, …]), else with the first sample's row. Learned-variance channels beyond C pass through
(y' = cat(corrected, rest)). Classifier-free guidance commutes with the correction, since
u' + s(c' − u') = (ε̂_cfg − b)/(1 + k), so correcting each branch corrects the guided ε.

The tables come from ``prog.state.ptqd`` (``PTQDStats``) and the recipe's ``PTQDConfig``:
K = k_t when ``correlated`` else 0, B = b_t when ``bias`` else 0. Without statistics both are 0 and
the rewrite is the identity (exactly: y − 0 = y, y / 1 = y), so convert can insert it and
``stepq.ptqd.apply`` (the pipeline's ptqd phase) fill it once the statistics are measured. Like the TDQ tables it is a Gather on
the timestep in ONNX; inference pays two gathers, a subtraction and a division.

The pass only inserts the correction (buffers initialised from the state as it is); filling the
buffers of an existing correction with new statistics or flags is ``refresh_tables``.

Requires: no observer left; the first output is the prediction, a [B, ≥C, …] tensor (checked by the
pass: ``PreconditionError``). Guarantees: exactly one correction on that output; a second run
rewrites nothing. Not semantics-preserving in general (exact only while K = B = 0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx

from stepq.compiler import meta
from stepq.compiler.errors import PreconditionError
from stepq.compiler.graph_utils import has_attr, register_tensor
from stepq.compiler.pass_manager import Contract, OpAbsent, OpPresent, Pass, PassResult
from stepq.compiler.program import Program
from stepq.compiler.timesteps import gather_timestep_table
from stepq.passes.materialize_quantizers import is_observer

if TYPE_CHECKING:
    from stepq.methods.ptqd.statistics import PTQDStats

__all__ = ["BIAS_TABLE", "K_TABLE", "CorrectNoise", "correction_tables", "is_correction_table", "prediction_node"]

aten = torch.ops.aten

#: the buffers the correction gathers from.
K_TABLE = "ptqd_k_table"
BIAS_TABLE = "ptqd_bias_table"
_ROLE = "correct_noise"


def prediction_node(gm: torch.fx.GraphModule) -> torch.fx.Node:
    """The graph's first output: the model's prediction."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat: list[torch.fx.Node] = []

    def visit(n: torch.fx.Node) -> torch.fx.Node:
        flat.append(n)
        return n

    torch.fx.node.map_arg(out.args[0], visit)
    if not flat:
        raise PreconditionError("correct_noise: the graph has no tensor output")
    return flat[0]


def _channels(prog: Program, pred: torch.fx.Node) -> int:
    stats: PTQDStats | None = prog.state.ptqd
    if stats is not None:
        return stats.channels
    if prog.sample_arg is not None and prog.sample_arg in prog.signature.tensors:
        shape = prog.signature.tensors[prog.sample_arg].shape
        if len(shape) >= 2:
            return int(shape[1])
    val = pred.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dim() >= 2:
        return int(val.shape[1])
    raise PreconditionError("correct_noise: cannot tell the prediction's channel count")


def correction_tables(prog: Program, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K [T], B [T, C]) from the statistics and the recipe's PTQD flags; zeros where off or absent."""
    T = prog.recipe.num_train_timesteps
    k, b = torch.zeros(T), torch.zeros(T, channels)
    stats: PTQDStats | None = prog.state.ptqd
    cfg = prog.recipe.ptqd
    if stats is None:
        return k, b
    if stats.num_train_timesteps != T:
        raise PreconditionError(f"correct_noise: the PTQD tables have {stats.num_train_timesteps} timesteps, the "
                                f"recipe's num_train_timesteps is {T}")
    if cfg is None or cfg.correlated:
        k = stats.k.detach().float().clone()
    if cfg is None or cfg.bias:
        b = stats.bias.detach().float().clone()
    return k, b


def is_correction_table(node: torch.fx.Node) -> bool:
    """The get_attr of the correction's K table."""
    return node.op == "get_attr" and node.target == K_TABLE


class CorrectNoise(Pass):
    name = "correct_noise"
    contract = Contract(
        requires=(OpAbsent(is_observer, "observer"),),
        produces=(OpPresent(is_correction_table, "correction reading the K table"),),
        preserves_semantics=False,
        idempotent=True,
    )

    def __call__(self, prog: Program) -> PassResult:
        gm, graph = prog.gm, prog.gm.graph
        if any(is_correction_table(n) for n in graph.nodes):
            return PassResult(0)
        if has_attr(gm, K_TABLE):
            raise PreconditionError(f"correct_noise: {K_TABLE!r} exists but no correction reads it")
        pred = prediction_node(gm)
        val = pred.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() < 2:
            raise PreconditionError(f"correct_noise: the prediction {pred.name} is not a [B, C, ...] tensor")
        C = _channels(prog, pred)
        if val.shape[1] < C:
            raise PreconditionError(f"correct_noise: the prediction has {val.shape[1]} channels, the statistics {C}")
        k, b = correction_tables(prog, C)
        k_name = register_tensor(gm, K_TABLE, k)
        b_name = register_tensor(gm, BIAS_TABLE, b)
        output = next(n for n in graph.nodes if n.op == "output")
        extra = {meta.PTQD_NODE: _ROLE}
        kt = gather_timestep_table(prog, k_name, pred, broadcast=True, before=output, extra_meta=extra)
        bt = gather_timestep_table(prog, b_name, pred, broadcast=True, before=output, extra_meta=extra)
        new: list[torch.fx.Node] = []

        def call(target, *args):
            node = graph.call_function(target, args)
            new.append(node)
            return node

        with graph.inserting_before(output):
            eps = pred if val.shape[1] == C else call(aten.slice.Tensor, pred, 1, 0, C)
            y = call(aten.div.Tensor, call(aten.sub.Tensor, eps, bt), call(aten.add.Tensor, kt, 1.0))
            if val.shape[1] != C:
                y = call(aten.cat.default, [y, call(aten.slice.Tensor, pred, 1, C, None)], 1)
        for n in new:
            meta.mark_inserted(n, **extra)
        y.meta["val"] = val
        output.replace_input_with(pred, y)
        return PassResult(1)
