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
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx
from torch.distributed import ReduceOp
from tqdm.auto import tqdm

from stepq.calibration.probe import run_without_quantizers
from stepq.compiler import meta, ops
from stepq.compiler.distributed import (
    all_reduce,
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
from stepq.compiler.timesteps import timestep_index
from stepq.methods.tdq.sources import ScaleGenerators, grid_frequencies
from stepq.passes.insert_scale_source import SCALE_SOURCE

__all__ = ["SMOOTHNESS_POINTS", "FitScaleSource", "ScaleFit", "curvature", "fit_scale_source", "merge_batches"]

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


def _take(item: Mapping[str, Any], batch_key: str, idx: torch.Tensor) -> dict[str, Any]:
    """The samples ``idx`` of one calibration item (tensors sliced along the batch)."""
    b = item[batch_key].shape[0]
    return {k: v[idx] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == b else v
            for k, v in item.items()}


def _rows(item: Mapping[str, Any], batch_key: str, rows: int, rng: random.Random) -> dict[str, Any]:
    """``rows`` random samples of one calibration item (tensors sliced along the batch)."""
    b = item[batch_key].shape[0]
    if rows >= b:
        return dict(item)
    return _take(item, batch_key, torch.tensor(sorted(rng.sample(range(b), rows))))


@dataclass
class ScaleFit:
    """What ``fit_scale_source`` did: ``curve``, the training (reconstruction) loss of every step;
    ``holdout_curve``, (Adam steps done, held-out loss) at every evaluation (empty without held-out
    timesteps); ``holdout_timesteps``, the integer timesteps kept out of the fit; ``best_step``, the
    steps done when the restored parameters were taken (the held-out minimum; None: the last step's)."""

    curve: list[float]
    holdout_curve: list[tuple[int, float]] = field(default_factory=list)
    holdout_timesteps: list[int] = field(default_factory=list)
    best_step: int | None = None


#: base points of the smoothness penalty per step (each a triple t, t+1, t+2 of integer timesteps)
SMOOTHNESS_POINTS = 64


def curvature(source: torch.nn.Module, t0: torch.Tensor) -> torch.Tensor:
    """Mean over the quantizers and the base points ``t0`` of the squared second difference of
    log s(t) on the integer grid, (log s(t0+2) − 2·log s(t0+1) + log s(t0))² (the smoothness penalty)."""
    t = (t0.reshape(-1, 1) + torch.arange(3, device=t0.device)).reshape(-1)
    log_s = torch.log(source(t)).reshape(-1, t0.numel(), 3)  # [L, P, 3]
    return (log_s[..., 2] - 2 * log_s[..., 1] + log_s[..., 0]).pow(2).mean()


def _timestep_rows(prog: Program, item: Mapping[str, Any]) -> torch.Tensor:
    """The integer training timesteps of one bound call (the table rows its samples read), 1-D."""
    t = item[prog.timestep_arg]
    t = t if isinstance(t, torch.Tensor) else torch.as_tensor(t)
    return timestep_index(t, scale=float(prog.timestep_scale), num_train_timesteps=prog.recipe.num_train_timesteps,
                          policy=prog.recipe.timestep_policy, where="the TDQ fit").reshape(-1)


def _visited(prog: Program, bound: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """[T] bool: the integer timesteps of the calls, the union over the ranks."""
    seen = torch.zeros(prog.recipe.num_train_timesteps, dtype=torch.bool)
    for c in bound:
        seen[_timestep_rows(prog, c).cpu()] = True
    return all_reduce(seen.to(torch.uint8), ReduceOp.MAX).bool() if is_distributed() else seen


def _choose_holdout(visited: torch.Tensor, fraction: float, seed: int) -> list[int]:
    """round(fraction · n) of the n visited timesteps (at least one), drawn from the interior (the
    first and last visited timesteps stay in the fit, which would otherwise extrapolate)."""
    seen = torch.nonzero(visited).reshape(-1).tolist()
    if len(seen) < 3:
        raise CalibrationError(f"fit_scale_source: holdout needs at least 3 distinct calibration timesteps, "
                               f"got {len(seen)}")
    interior = seen[1:-1]
    k = min(max(1, round(fraction * len(seen))), len(interior))
    return sorted(random.Random(seed).sample(interior, k))


def _split(prog: Program, bound: Sequence[Mapping[str, Any]], held: Sequence[int],
           batch_key: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training calls, held-out calls): the samples at the held-out timesteps go to the second,
    the others to the first (a call whose samples mix both is split by rows)."""
    held_t = torch.tensor(list(held), dtype=torch.int64)
    train: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for c in bound:
        rows = _timestep_rows(prog, c).cpu()
        mask = torch.isin(rows, held_t)
        if bool(mask.all()) or not bool(mask.any()):
            (out if bool(mask.all()) else train).append(dict(c))
        elif rows.numel() != c[batch_key].shape[0]:
            raise CalibrationError(f"fit_scale_source: a calibration call has {rows.numel()} timesteps for "
                                   f"{c[batch_key].shape[0]} samples; cannot split it by timestep")
        else:
            train.append(_take(c, batch_key, torch.nonzero(~mask).reshape(-1)))
            out.append(_take(c, batch_key, torch.nonzero(mask).reshape(-1)))
    return train, out


@torch.enable_grad()
def fit_scale_source(prog: Program, data: Sequence[Mapping[str, Any]], *, steps: int, lr: float, batch: int = 8,
                     rows: int = 4, seed: int = 0, time_budget_s: float | None = None,
                     objective: str = "output", distributed: str = "ddp", progress: bool = True,
                     frequencies: str = "geometric", smoothness: float = 0.0, holdout: float = 0.0,
                     holdout_every: int = 10) -> ScaleFit:
    """Fit ``prog``'s activation scale source by reconstruction (``objective``: "layer" or "output",
    see the module doc); returns the loss curves (``ScaleFit``).

    Each step draws ``batch`` calibration items (each one step of a trajectory batch) at random and
    ``rows`` samples of each, so one mini-batch of ``batch·rows`` samples spans ``batch`` timesteps.
    ``distributed="fsdp"`` shards the scale source (the only trained module) by FSDP2 for the fit;
    the frozen weights stay whole, as calibration needed them (``stepq.compiler.fsdp``).

    Smooth in t (TDQ generators; docs/TDQ.md): ``frequencies="grid"`` sets the generators' encoding
    from the visited timesteps before the first step (``grid_frequencies``; "geometric" keeps the
    paper's). ``smoothness`` > 0 adds ``smoothness · curvature(source, t0)`` to every step's loss, at
    ``SMOOTHNESS_POINTS`` random base points t0 of [0, T − 2) (the curve records the reconstruction
    loss alone). ``holdout`` > 0 keeps that fraction of the visited timesteps (whole timesteps, from
    the interior; seeded by ``seed``) out of the fit, evaluates the loss on up to ``rows`` fixed
    samples of each held-out call before the first step, every ``holdout_every`` steps and after
    the last, and restores the parameters of the lowest held-out loss at the end. With the defaults
    the fit is the one without these (same random draws, same numbers).
    """
    gm = prog.gm
    check_mode(distributed)
    if objective not in ("layer", "output"):
        raise PreconditionError(f"fit_scale_source: objective must be 'layer' or 'output', got {objective!r}")
    if frequencies not in ("grid", "geometric"):
        raise PreconditionError(f"fit_scale_source: frequencies must be 'grid' or 'geometric', got {frequencies!r}")
    if not (smoothness >= 0 and 0 <= holdout < 1 and holdout_every >= 1):
        raise PreconditionError(f"fit_scale_source: need smoothness >= 0, 0 <= holdout < 1 and holdout_every >= 1, "
                                f"got {smoothness}, {holdout}, {holdout_every}")
    if not hasattr(gm, SCALE_SOURCE):
        raise PreconditionError("fit_scale_source: the program has no scale source (insert_scale_source)")
    items = list(data)
    # under a process group every rank steps together: a rank without calls fails them all
    raise_on_any_rank(None if items else CalibrationError("fit_scale_source: no calibration data"
                                                          + (f" on rank {rank()}" if is_distributed() else "")),
                      CalibrationError)
    source = gm.get_submodule(SCALE_SOURCE)
    generators = isinstance(source, ScaleGenerators)
    if smoothness > 0 and not generators:
        raise PreconditionError(f"fit_scale_source: the smoothness penalty needs TDQ generators, the scale source is "
                                f"a {type(source).__name__}")
    batch_key = prog.sample_arg or prog.timestep_arg
    bound = [prog.bind((), c) for c in items]
    T = prog.recipe.num_train_timesteps
    visited = _visited(prog, bound) if frequencies == "grid" or holdout > 0 else None
    if frequencies == "grid" and isinstance(source, ScaleGenerators) and visited is not None:
        source.set_frequencies(grid_frequencies(torch.nonzero(visited).reshape(-1), source.fourier_dim, T))
        log.info("fit_scale_source: grid frequencies, periods %.3g..%.3g timesteps",
                 float(2 * math.pi / source.freqs.max()), float(2 * math.pi / source.freqs.min()))
    result = ScaleFit([])
    held_calls: list[dict[str, Any]] = []
    held_batches: list[dict[str, Any]] = []
    if holdout > 0 and visited is not None:
        result.holdout_timesteps = _choose_holdout(visited, holdout, seed)
        bound, held_calls = _split(prog, bound, result.holdout_timesteps, batch_key)
        error = None if bound and held_calls else CalibrationError(
            f"fit_scale_source: holdout left {len(bound)} training and {len(held_calls)} held-out calls"
            + (f" on rank {rank()}" if is_distributed() else ""))
        raise_on_any_rank(error, CalibrationError)
        pick = random.Random(seed + 1)
        held_calls = [_rows(c, batch_key, rows, pick) for c in held_calls]
        held_batches = [merge_batches(held_calls[i:i + batch], batch_key) for i in range(0, len(held_calls), batch)]

    def loss_of(merged: dict[str, Any]) -> torch.Tensor:
        flat = prog.flat_inputs((), merged)
        if objective == "output":
            # the graph module takes the call's own structure (nested inputs: PixArt's added_cond_kwargs)
            return _relative_error(prog(**merged), run_without_quantizers(gm, *flat))
        interp = _LayerwiseLoss(gm)
        interp.run(*flat)
        if not interp.losses:
            raise PreconditionError("fit_scale_source: no quantized op reads an activation quantizer")
        return torch.stack(interp.losses).mean()

    params = [p for p in source.parameters()]
    for p in params:
        p.requires_grad_(True)
    rng = random.Random(rank_seed(seed))  # each rank draws from its own share of the calls
    smooth_gen = torch.Generator().manual_seed(rank_seed(seed) + 7) if smoothness > 0 else None
    broadcast_parameters(params)
    curve = result.curve
    best: tuple[float, list[torch.Tensor]] | None = None

    @torch.no_grad()
    def evaluate(done: int) -> None:
        nonlocal best
        source.eval()  # a free table interpolates the timesteps it was not fitted at, as it will ship
        value = mean_over_ranks(float(torch.stack([loss_of(m) for m in held_batches]).mean()))
        source.train()
        result.holdout_curve.append((done, value))
        if best is None or value < best[0]:
            best = (value, [p.detach().clone() for p in params])
            result.best_step = done

    with fsdp_training(gm, distributed, module=source, borrowed=prog.borrowed) as sharding:
        params = sharding.params(params)
        opt = torch.optim.Adam(params, lr=lr)
        start = time.perf_counter()
        source.train()
        if held_calls:
            evaluate(0)
        bar = tqdm(range(steps), desc="fit scales", disable=not progress, leave=False)
        for step in bar:
            chosen = [_rows(bound[rng.randrange(len(bound))], batch_key, rows, rng) for _ in range(batch)]
            merged = merge_batches(chosen, batch_key)
            loss = loss_of(merged)
            total = loss
            if smooth_gen is not None:
                device = params[0].device
                t0 = torch.randint(0, max(T - 2, 1), (SMOOTHNESS_POINTS,), generator=smooth_gen).to(device)
                total = loss + smoothness * curvature(source, t0)
            opt.zero_grad(set_to_none=True)
            total.backward()
            average_gradients(params)  # the replicated ones (all of them under "ddp")
            opt.step()
            curve.append(mean_over_ranks(float(loss.detach())))
            if step % 10 == 0:
                bar.set_postfix(loss=f"{curve[-1]:.4g}")
            stop = time_budget_s is not None and any_rank(time.perf_counter() - start > time_budget_s)
            if held_calls and ((step + 1) % holdout_every == 0 or step + 1 == steps or stop):
                evaluate(step + 1)
            if stop:
                log.info("fit_scale_source: time budget of %.0fs reached after %d steps", time_budget_s, step + 1)
                break
        if best is not None and result.best_step != len(curve):
            with torch.no_grad():
                for p, v in zip(params, best[1]):
                    p.copy_(v)
            log.info("fit_scale_source: restored the parameters of step %d (held-out loss %.4g)",
                     result.best_step, best[0])
        source.eval()
        for p in params:
            p.requires_grad_(False)
    or_bool_buffers(source)  # a scale table's visited timesteps: the union over the ranks
    if curve:
        log.info("fit_scale_source: %d steps, loss %.4g -> %.4g", len(curve), curve[0], curve[-1])
    return result


class FitScaleSource(Step):
    """TDQ in PTQ: fit the scale source on the calibration calls ``Observe`` kept (count = fit steps)."""

    name = "fit_scale_source"
    contract: ClassVar[Contract] = Contract(
        requires=(RecipeHas("tdq"), OpPresent(lambda n: n.op == "call_module" and n.target == SCALE_SOURCE,
                                              "scale source (insert_scale_source)")),
        writes=("fit_curve", "fit_holdout_curve"))

    def __call__(self, prog: Program, inputs: CompileInputs) -> PassResult:
        cfg = prog.recipe.tdq
        fit = fit_scale_source(
            prog, inputs.kept, steps=cfg.fit_steps, lr=cfg.fit_lr, batch=cfg.fit_batch, rows=cfg.fit_rows,
            seed=cfg.seed, time_budget_s=cfg.time_budget_s, objective=cfg.fit_objective,
            distributed=prog.recipe.distributed, progress=inputs.progress, frequencies=cfg.frequencies,
            smoothness=cfg.smoothness, holdout=cfg.holdout, holdout_every=cfg.holdout_every)
        prog.state.fit_curve = fit.curve
        if fit.holdout_curve:
            prog.state.fit_holdout_curve = fit.holdout_curve
        return PassResult(len(fit.curve))
