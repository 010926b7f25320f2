"""Reconstruction: fit the activation step sizes (TDQ generators, free tables) in PTQ.

``objective="output"`` (the default) and ``objective="layer"``, both on calibration inputs drawn from
real sampler trajectories (many timesteps in one mini-batch).

``objective="layer"`` (layer-wise reconstruction): for every quantized op C (Linear / Conv) whose
input is an activation quantizer Q_l,

    L = Σ_C ‖C(Q_l(x; s_l(t)), Ŵ) − C(x, W)‖² / ‖C(x, W)‖²

where x is the op's input in the floating-point model (errors do not accumulate across layers, so
all layers are fitted at once), Ŵ its quantized weight, W its float weight, and s_l(t) comes from the
scale source (per sample). Gradients reach s_l through the LSQ/STE formula of ``stepq::fake_quant``.
Only the scale source's parameters are trained (Adam); the weights are fixed.

``objective="output"`` (network-output reconstruction): the quantized model's whole output against
the floating-point model's on the same calibration inputs,

    L = ‖ε̂_q(x_t, t; s(t)) − ε_fp(x_t, t)‖² / ‖ε_fp(x_t, t)‖²

with the gradient passing every quantizer by the STE. Errors do accumulate here, which is the
point: a step size is judged by what it does to the prediction the sampler uses, not to its own
layer (on the digits models the layer objective made TDQ worse than static steps, this one better).
The teacher is the program itself with every quantizer bypassed, so no training data and no second
model are needed; a step costs one float forward and one quantized forward and backward.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.fx
from tqdm.auto import tqdm

from stepq.calibration.probe import run_without_quantizers
from stepq.compiler import meta, ops
from stepq.compiler.distributed import (
    any_rank,
    average_gradients,
    broadcast_parameters,
    is_distributed,
    mean_over_ranks,
    or_bool_buffers,
    raise_on_any_rank,
    rank,
    rank_seed,
)
from stepq.compiler.errors import CalibrationError, PreconditionError
from stepq.compiler.fsdp import check_mode, fsdp_training
from stepq.compiler.pass_manager import CompileInputs, Contract, OpPresent, PassResult, RecipeHas, Step
from stepq.compiler.program import Program
from stepq.passes.insert_scale_source import SCALE_SOURCE

__all__ = ["FitScaleSource", "fit_scale_source", "merge_batches"]

log = logging.getLogger(__name__)


def merge_batches(items: Sequence[Mapping[str, Any]], batch_key: str) -> dict[str, Any]:
    """Concatenate input dicts along the batch: every tensor whose leading size is the batch size of
    ``items[i][batch_key]``; other values (Flux's position ids, constants) are taken from the first."""
    sizes = [i[batch_key].shape[0] for i in items]
    out: dict[str, Any] = {}
    for k, v in items[0].items():
        if isinstance(v, torch.Tensor) and all(isinstance(i[k], torch.Tensor) and i[k].dim() >= 1
                                               and i[k].shape[0] == b for i, b in zip(items, sizes)):
            out[k] = torch.cat([i[k] for i in items])
        else:
            out[k] = v
    return out


class _LayerwiseLoss(torch.fx.Interpreter):
    """Runs the FP model (quantizers bypassed) and, beside every quantized op, its quantized twin."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.student: dict[torch.fx.Node, torch.Tensor] = {}
        self.losses: list[torch.Tensor] = []

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.target is ops.FAKE_QUANT:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if n.meta.get(meta.QUANTIZER_ROLE) == "activation":
                self.student[n] = ops.FAKE_QUANT(*args, **kwargs)  # s from the scale source, with grad
            else:
                with torch.no_grad():
                    self.student[n] = ops.FAKE_QUANT(*args, **kwargs)
            return args[0]  # the teacher sees float values
        out = super().run_node(n)
        if meta.LAYER_SPEC in n.meta and any(a in self.student for a in n.args if isinstance(a, torch.fx.Node)):
            if any(isinstance(a, torch.fx.Node) and a in self.student and a.meta.get(meta.QUANTIZER_ROLE) == "activation"
                   for a in n.args):
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                s_args = tuple(self.student.get(a, v) if isinstance(a, torch.fx.Node) else v
                               for a, v in zip(n.args, args))
                assert callable(n.target)
                y = n.target(*s_args, **kwargs)
                ref = out.detach()
                self.losses.append(((y - ref) ** 2).mean() / (ref.pow(2).mean() + 1e-12))
        return out


def _relative_error(student: Any, teacher: Any) -> torch.Tensor:
    """Mean over the floating-point output leaves of ‖y − y_ref‖² / ‖y_ref‖²."""
    pairs = [(y, r) for y, r in zip(torch.utils._pytree.tree_leaves(student), torch.utils._pytree.tree_leaves(teacher))
             if isinstance(y, torch.Tensor) and y.is_floating_point()]
    if not pairs:
        raise PreconditionError("fit_scale_source: the program has no floating-point output to reconstruct")
    return torch.stack([((y - r) ** 2).mean() / (r.pow(2).mean() + 1e-12) for y, r in pairs]).mean()


def _rows(item: Mapping[str, Any], batch_key: str, rows: int, rng: random.Random) -> dict[str, Any]:
    """``rows`` random samples of one calibration item (tensors sliced along the batch)."""
    b = item[batch_key].shape[0]
    if rows >= b:
        return dict(item)
    idx = torch.tensor(sorted(rng.sample(range(b), rows)))
    return {k: v[idx] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == b else v
            for k, v in item.items()}


@torch.enable_grad()
def fit_scale_source(prog: Program, data: Sequence[Mapping[str, Any]], *, steps: int, lr: float, batch: int = 8,
                     rows: int = 4, seed: int = 0, time_budget_s: float | None = None,
                     objective: str = "output", distributed: str = "ddp", progress: bool = True) -> list[float]:
    """Fit ``prog``'s activation scale source by reconstruction (``objective``: "layer" or "output",
    see the module doc); returns the loss curve.

    Each step draws ``batch`` calibration items (each one step of a trajectory batch) at random and
    ``rows`` samples of each, so one mini-batch of ``batch·rows`` samples spans ``batch`` timesteps.
    ``distributed="fsdp"`` shards the scale source (the only trained module) by FSDP2 for the fit;
    the frozen weights stay whole, as calibration needed them (``stepq.compiler.fsdp``).
    """
    gm = prog.gm
    check_mode(distributed)
    if objective not in ("layer", "output"):
        raise PreconditionError(f"fit_scale_source: objective must be 'layer' or 'output', got {objective!r}")
    if not hasattr(gm, SCALE_SOURCE):
        raise PreconditionError("fit_scale_source: the program has no scale source (insert_scale_source)")
    items = list(data)
    # under a process group every rank steps together: a rank without calls fails them all
    raise_on_any_rank(None if items else CalibrationError("fit_scale_source: no calibration data"
                                                          + (f" on rank {rank()}" if is_distributed() else "")),
                      CalibrationError)
    source = gm.get_submodule(SCALE_SOURCE)
    batch_key = prog.sample_arg or prog.timestep_arg
    bound = [prog.bind((), c) for c in items]
    params = [p for p in source.parameters()]
    for p in params:
        p.requires_grad_(True)
    rng = random.Random(rank_seed(seed))  # each rank draws from its own share of the calls
    broadcast_parameters(params)
    curve: list[float] = []
    with fsdp_training(gm, distributed, module=source, borrowed=prog.borrowed) as sharding:
        params = sharding.params(params)
        opt = torch.optim.Adam(params, lr=lr)
        start = time.perf_counter()
        source.train()
        bar = tqdm(range(steps), desc="fit scales", disable=not progress, leave=False)
        for step in bar:
            chosen = [_rows(bound[rng.randrange(len(bound))], batch_key, rows, rng) for _ in range(batch)]
            merged = merge_batches(chosen, batch_key)
            flat = prog.flat_inputs((), merged)
            if objective == "output":
                # the graph module takes the call's own structure (nested inputs: PixArt's added_cond_kwargs)
                loss = _relative_error(prog(**merged), run_without_quantizers(gm, *flat))
            else:
                interp = _LayerwiseLoss(gm)
                interp.run(*flat)
                if not interp.losses:
                    raise PreconditionError("fit_scale_source: no quantized op reads an activation quantizer")
                loss = torch.stack(interp.losses).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(params)  # the replicated ones (all of them under "ddp")
            opt.step()
            curve.append(mean_over_ranks(float(loss.detach())))
            if step % 10 == 0:
                bar.set_postfix(loss=f"{curve[-1]:.4g}")
            if time_budget_s is not None and any_rank(time.perf_counter() - start > time_budget_s):
                log.info("fit_scale_source: time budget of %.0fs reached after %d steps", time_budget_s, step + 1)
                break
        source.eval()
        for p in params:
            p.requires_grad_(False)
    or_bool_buffers(source)  # a scale table's visited timesteps: the union over the ranks
    log.info("fit_scale_source: %d steps, loss %.4g -> %.4g", len(curve), curve[0], curve[-1])
    return curve


class FitScaleSource(Step):
    """TDQ in PTQ: fit the scale source on the calibration calls ``Observe`` kept (count = fit steps)."""

    name = "fit_scale_source"
    contract: ClassVar[Contract] = Contract(
        requires=(RecipeHas("tdq"), OpPresent(lambda n: n.op == "call_module" and n.target == SCALE_SOURCE,
                                              "scale source (insert_scale_source)")),
        writes=("fit_curve",))

    def __call__(self, prog: Program, inputs: CompileInputs) -> PassResult:
        cfg = prog.recipe.tdq
        prog.state.fit_curve = fit_scale_source(
            prog, inputs.kept, steps=cfg.fit_steps, lr=cfg.fit_lr, batch=cfg.fit_batch, rows=cfg.fit_rows,
            seed=cfg.seed, time_budget_s=cfg.time_budget_s, objective=cfg.fit_objective,
            distributed=prog.recipe.distributed, progress=inputs.progress)
        return PassResult(len(prog.state.fit_curve))
