"""Quantization-aware training with LSQ (Esser et al., ICLR 2020), with or without TDQ generators.

The calibrated program is trained on the ordinary denoising loss,

    x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε,   t ~ U{0, …, T−1},   L = ‖ε̂_θ(x_t, t) − ε‖²

through the same ``stepq::fake_quant`` ops that ship: the straight-through estimator passes the
gradient to the float weights inside the clipping range, and the LSQ formula gives the step sizes
theirs. Step-size gradients are scaled by g = 1/√(N·Q_P) (N = elements sharing the step, Q_P the top
of the grid), with a hook on each step-size parameter. Learned: every float parameter (weights,
biases, norms) at ``lr``, weight and activation step sizes, or the TDQ generators that produce the
activation steps, at ``scale_lr``; zero points stay at their calibrated values.

``train_qat`` is a plain loop over an iterator of (inputs, target) with an explicit optimizer and no
global state: wrap ``prog.gm`` in DistributedDataParallel and shard the batches to run it distributed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

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
from stepq.compiler.graph_utils import arg_node, as_parameter
from stepq.compiler.pass_manager import CompileInputs, Contract, PassResult, RecipeHas, StageIs, Step
from stepq.compiler.program import Program
from stepq.passes.insert_scale_source import SCALE_SOURCE

__all__ = ["TrainQAT", "denoising_batches", "make_trainable", "train_qat"]

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


def make_trainable(prog: Program, *, batch_size: int
                   ) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Turn step-size buffers into parameters with LSQ gradient scaling.

    Returns (float parameters, step-size parameters, scale-source parameters), all set to require grad.
    The float parameters are the program's own first (the optimizer writes them in place; borrowed
    ones are the user's model's: ``stepq.compiler.borrow``).
    """
    gm = prog.gm
    own_all(prog.borrowed, gm)
    scales: list[torch.nn.Parameter] = []
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
        grad_scale = 1.0 / math.sqrt(per_scale * max(1, int(n.args[4])))
        p.register_hook(lambda g, f=grad_scale: g * f)
        scales.append(p)
    source = list(gm.get_submodule(SCALE_SOURCE).parameters()) if hasattr(gm, SCALE_SOURCE) else []
    special = {id(p) for p in scales + source}
    floats = [p for p in gm.parameters() if id(p) not in special and p.dtype.is_floating_point]
    for p in floats + scales + source:
        p.requires_grad_(True)
    return floats, scales, source


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
    progress: bool = True,
) -> list[float]:
    """LSQ QAT of a calibrated program on (inputs, ε) batches; returns the loss curve."""
    if prog.stage != "calibrated":
        raise PreconditionError(f"train_qat needs a calibrated program, got stage {prog.stage!r}")
    gm = prog.gm
    floats, scales, source = make_trainable(prog, batch_size=batch_size)
    trained = floats + scales + source
    broadcast_parameters(trained)  # under a process group: every rank starts from rank 0's values
    opt = torch.optim.Adam([{"params": floats, "lr": lr}, {"params": scales + source, "lr": scale_lr}])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gm.train()
    curve: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="QAT", disable=not progress, leave=False)
    for step in bar:
        inputs, target = next(batches)
        pred = model_output(prog(**inputs))
        if channels is not None:
            pred = pred[:, :channels]
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(trained)  # under a process group: the gradient of the ranks' concatenated batch
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
    or_bool_buffers(gm)  # a scale table's visited timesteps: the union over the ranks
    gm.eval()
    for p in floats + scales + source:
        p.requires_grad_(False)
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
                                         batch_size=cfg.batch_size, progress=inputs.progress)
        return PassResult(len(prog.state.qat_curve))
