"""Quantization-aware training with LSQ (Esser et al., ICLR 2020), with or without TDQ generators.

The calibrated program is trained on the ordinary denoising loss,

    x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε,   t ~ U{0, …, T−1},   L = ‖ε̂_θ(x_t, t) − ε‖²

through the same ``stepq::fake_quant`` ops that ship: the straight-through estimator passes the
gradient to the float weights inside the clipping range, and the LSQ formula gives the step sizes
theirs. Step-size gradients are scaled by g = 1/√(N·Q_P) (N = elements sharing the step, Q_P the top
of the grid), after each backward (not by a tensor hook: FSDP2 replaces the parameter objects, and
a hook would stay on the parameter and apply again when the program is trained a second time). Learned: every float parameter (weights,
biases, norms) at ``lr``, weight and activation step sizes, or the TDQ generators that produce the
activation steps, at ``scale_lr``; zero points stay at their calibrated values.

``train_qat`` is a plain loop over an iterator of (inputs, target) with an explicit optimizer and no
global state. Under a process group each rank trains on its own batches; the parameters are
replicated with averaged gradients (``distributed="ddp"``) or sharded by FSDP2 (``"fsdp"``,
``stepq.compiler.fsdp``), see docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from stepq.calibration.samplers import model_output
from stepq.compiler import meta, ops
from stepq.compiler.borrow import own_all
from stepq.compiler.distributed import (
    any_rank,
    average_gradients,
    broadcast_parameters,
    mean_over_ranks,
    or_bool_buffers,
)
from stepq.compiler.errors import PreconditionError, RecipeError
from stepq.compiler.fsdp import check_mode, fsdp_training
from stepq.compiler.graph_utils import arg_node, as_parameter
from stepq.compiler.pass_manager import CompileInputs, Contract, PassResult, RecipeHas, StageIs, Step
from stepq.compiler.program import Program
from stepq.passes.insert_scale_source import SCALE_SOURCE

__all__ = ["TrainQAT", "Trainable", "denoising_batches", "make_trainable", "scale_step_gradients", "train_qat"]

log = logging.getLogger(__name__)


def denoising_batches(
    x0: Tensor,
    scheduler: Any,
    make_inputs: Callable[[Tensor, Tensor, Mapping[str, Any]], dict[str, Any]],
    *,
    batch_size: int,
    cond: Mapping[str, Tensor] | None = None,
    cond_dropout: tuple[str, Any, float] | None = None,
    seed: int = 0,
) -> Iterator[tuple[dict[str, Any], Tensor]]:
    """Endless (inputs, ε) pairs: random training images, timesteps and noise, noised by ``scheduler``.

    ``cond`` holds per-image conditioning (e.g. ``{"class_labels": labels}``); ``cond_dropout =
    (key, null_value, p)`` replaces it by the null value with probability p, once per sample (CFG).
    """
    g = torch.Generator().manual_seed(seed)
    T = scheduler.config.num_train_timesteps
    n = x0.shape[0]
    while True:
        idx = torch.randint(0, n, (batch_size,), generator=g)
        x = x0[idx]
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(0, T, (batch_size,), generator=g)
        x_t = scheduler.add_noise(x, noise, t)
        c = {k: v[idx] for k, v in (cond or {}).items()}
        if cond_dropout is not None:
            key, null, p = cond_dropout
            drop = torch.rand(batch_size, generator=g) < p
            c[key] = torch.where(drop, torch.as_tensor(null, dtype=c[key].dtype), c[key])
        yield make_inputs(x_t, t, c), noise


class Trainable(NamedTuple):
    """What QAT trains: float parameters, step sizes (with their LSQ gradient scales g, one per
    step size, in order) and the scale source's parameters."""

    floats: list[torch.nn.Parameter]
    scales: list[torch.nn.Parameter]
    source: list[torch.nn.Parameter]
    grad_scales: list[float]


def scale_step_gradients(scales: Sequence[torch.nn.Parameter], grad_scales: Sequence[float]) -> None:
    """LSQ's gradient scaling, after the backward: ∂L/∂s ← g·∂L/∂s (a sharded step size's gradient
    is its shard's: the scaling is linear, so it commutes with the mean over the ranks)."""
    for p, g in zip(scales, grad_scales, strict=True):
        if p.grad is not None:
            p.grad.mul_(g)


def make_trainable(prog: Program, *, batch_size: int) -> Trainable:
    """Turn step-size buffers into parameters and compute their LSQ gradient scales
    (``scale_step_gradients`` applies them).

    Returns the float parameters, the step-size parameters with their scales, and the scale
    source's parameters, all set to require grad. The float parameters are the program's own first
    (the optimizer writes them in place; borrowed ones are the user's model's:
    ``stepq.compiler.borrow``).
    """
    gm = prog.gm
    own_all(prog.borrowed, gm)
    scales: list[torch.nn.Parameter] = []
    grad_scales: list[float] = []
    seen: set[str] = set()
    for n in gm.graph.nodes:
        if n.target is not ops.FAKE_QUANT:
            continue
        s_node = n.args[1]
        if not isinstance(s_node, torch.fx.Node) or s_node.op != "get_attr" or s_node.target in seen:
            continue
        seen.add(str(s_node.target))
        p = as_parameter(gm, str(s_node.target))
        x_val = arg_node(n, 0).meta.get("val")
        numel = 1
        if isinstance(x_val, Tensor):
            shape = [batch_size if i == 0 and n.meta.get(meta.QUANTIZER_ROLE) == "activation" else s
                     for i, s in enumerate(x_val.shape)]
            numel = math.prod(int(s) if isinstance(s, int) else batch_size for s in shape)
        per_scale = max(1, numel // max(1, p.numel()))
        scales.append(p)
        grad_scales.append(1.0 / math.sqrt(per_scale * max(1, int(n.args[4]))))
    source = list(gm.get_submodule(SCALE_SOURCE).parameters()) if hasattr(gm, SCALE_SOURCE) else []
    special = {id(p) for p in scales + source}
    floats = [p for p in gm.parameters() if id(p) not in special and p.dtype.is_floating_point]
    for p in floats + scales + source:
        p.requires_grad_(True)
    return Trainable(floats, scales, source, grad_scales)


@torch.enable_grad()
def train_qat(
    prog: Program,
    batches: Iterator[tuple[Mapping[str, Any], Tensor]],
    *,
    steps: int,
    lr: float = 1e-4,
    scale_lr: float = 1e-3,
    batch_size: int = 64,
    channels: int | None = None,
    time_budget_s: float | None = None,
    distributed: str = "ddp",
    progress: bool = True,
) -> list[float]:
    """LSQ QAT of a calibrated program on (inputs, ε) batches; returns the loss curve.

    ``distributed``: under a process group, ``"ddp"`` (replicated parameters, averaged gradients) or
    ``"fsdp"`` (the graph module sharded by FSDP2 for the loop, ``stepq.compiler.fsdp``)."""
    if prog.stage != "calibrated":
        raise PreconditionError(f"train_qat needs a calibrated program, got stage {prog.stage!r}")
    check_mode(distributed)
    gm = prog.gm
    made = make_trainable(prog, batch_size=batch_size)
    broadcast_parameters(made.floats + made.scales + made.source)  # every rank starts from rank 0's values
    curve: list[float] = []
    with fsdp_training(gm, distributed, borrowed=prog.borrowed) as sharding:
        floats, scales, source = sharding.params(made.floats), sharding.params(made.scales), sharding.params(made.source)
        trained = floats + scales + source
        opt = torch.optim.Adam([{"params": floats, "lr": lr}, {"params": scales + source, "lr": scale_lr}])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        gm.train()
        start = time.perf_counter()
        bar = tqdm(range(steps), desc="QAT", disable=not progress, leave=False)
        for step in bar:
            inputs, target = next(batches)
            pred = model_output(prog(**inputs))
            if channels is not None:
                pred = pred[:, :channels]
            loss = torch.nn.functional.mse_loss(pred, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # under "fsdp": the sharded gradients are the ranks' mean already
            average_gradients(trained)  # the replicated ones: the gradient of the ranks' concatenated batch
            scale_step_gradients(scales, made.grad_scales)
            opt.step()
            sched.step()
            with torch.no_grad():  # step sizes stay positive (the generators' softplus does that itself)
                for p in scales:
                    p.clamp_(min=1e-8)
            curve.append(mean_over_ranks(float(loss.detach())))
            if step % 10 == 0:
                bar.set_postfix(loss=f"{curve[-1]:.4g}")
            if time_budget_s is not None and any_rank(time.perf_counter() - start > time_budget_s):
                log.info("train_qat: time budget reached after %d steps", step + 1)
                break
        gm.eval()
        for p in trained:
            p.requires_grad_(False)
    or_bool_buffers(gm)  # a scale table's visited timesteps: the union over the ranks
    return curve


class TrainQAT(Step):
    """LSQ quantization-aware training on ``inputs.train_data`` (count = training steps)."""

    name = "train_qat"
    contract: ClassVar[Contract] = Contract(requires=(RecipeHas("qat"), StageIs(("calibrated",))), writes=("qat_curve",))

    def __call__(self, prog: Program, inputs: CompileInputs) -> PassResult:
        cfg = prog.recipe.qat
        if inputs.train_data is None:
            raise RecipeError(f"recipe {prog.recipe.name!r} trains (QAT); pass train_data=denoising_batches(...)")
        prog.state.qat_curve = train_qat(prog, inputs.train_data, steps=cfg.steps, lr=cfg.lr, scale_lr=cfg.scale_lr,
                                         batch_size=cfg.batch_size, distributed=prog.recipe.distributed,
                                         progress=inputs.progress)
        return PassResult(len(prog.state.qat_curve))
