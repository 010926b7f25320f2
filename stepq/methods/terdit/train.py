"""TerDiT's ternary quantization-aware training: a plain loop on the denoising loss.

    x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε,   t ~ U{0, …, T−1},   L = ‖ε̂_θ(x_t, t) − ε‖²

through the ``stepq::ternary`` ops of the prepared graph (identity straight-through estimator for
W, exact gradient for α; ``stepq.compiler.ternary_ops``). Learned: every float parameter (the
latent float weights, biases, norms, the inserted RMSNorm weights) at ``lr``; the ternary scales α
at ``scale_lr``. The step sizes of any other fake-quantized layer of the recipe (an 8-bit embedder)
stay buffers at their data-free values (its weights still train through the STE): with Adam, a step
size of ~3e-3 moved by ~lr per step reaches zero within a few steps.
Adam, linear warm-up over the first 5 % of the steps, cosine decay, gradients clipped to
``TerDiTConfig.grad_clip``. The TerDiT authors trained from scratch with lr 5e-4 and released no
training script; this loop also fine-tunes an FP checkpoint.

No wall-clock budget (a step budget only, so a run is reproducible on a loaded machine), no global
state: the batches come from an explicit iterator (``stepq.methods.qat.denoising_batches``), and the
loss curve is returned and kept in ``prog.state.qat_curve``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from stepq.calibration.samplers import model_output
from stepq.compiler import ops
from stepq.compiler.borrow import own_all
from stepq.compiler.distributed import average_gradients, broadcast_parameters, mean_over_ranks
from stepq.compiler.errors import PreconditionError, RecipeError
from stepq.compiler.fsdp import check_mode, clip_grad_norm, fsdp_training
from stepq.compiler.graph_utils import as_parameter
from stepq.compiler.pass_manager import CompileInputs, Contract, PassResult, RecipeHas, StageIs, Step
from stepq.compiler.program import Program

__all__ = ["TrainTernary", "ternary_scales", "train_ternary"]

log = logging.getLogger(__name__)


def ternary_scales(prog: Program) -> list[torch.nn.Parameter]:
    """The α of every ternary weight, turned into parameters (they are buffers after prepare)."""
    gm = prog.gm
    out: list[torch.nn.Parameter] = []
    seen: set[str] = set()
    for n in gm.graph.nodes:
        if n.target is not ops.TERNARY:
            continue
        a = n.args[1]
        if not isinstance(a, torch.fx.Node) or a.op != "get_attr" or a.target in seen:
            continue
        seen.add(str(a.target))
        out.append(as_parameter(gm, str(a.target)))
    return out


def _lr_factor(step: int, steps: int) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


@torch.enable_grad()
def train_ternary(
    prog: Program,
    batches: Iterator[tuple[Mapping[str, Any], Tensor]],
    *,
    steps: int,
    lr: float = 5e-4,
    scale_lr: float = 5e-4,
    batch_size: int = 64,
    grad_clip: float | None = 1.0,
    channels: int | None = None,
    distributed: str = "ddp",
    progress: bool = True,
) -> list[float]:
    """Ternary QAT of a calibrated program on (inputs, ε) batches; returns the loss curve.
    ``distributed="fsdp"``: the graph module sharded by FSDP2 for the loop (``stepq.compiler.fsdp``)."""
    if prog.stage != "calibrated":
        raise PreconditionError(f"train_ternary needs a calibrated program, got stage {prog.stage!r}")
    check_mode(distributed)
    gm = prog.gm
    own_all(prog.borrowed, gm)  # the optimizer writes the floats in place: never the user's (borrowed) tensors
    alphas = ternary_scales(prog)
    special = {id(p) for p in alphas}
    floats = [p for p in gm.parameters() if id(p) not in special and p.dtype.is_floating_point]
    for p in floats + alphas:
        p.requires_grad_(True)
    broadcast_parameters(floats + alphas)  # under a process group: every rank starts from rank 0's values
    curve: list[float] = []
    with fsdp_training(gm, distributed, borrowed=prog.borrowed) as sharding:
        floats, alphas = sharding.params(floats), sharding.params(alphas)
        params = floats + alphas
        opt = torch.optim.Adam([{"params": floats, "lr": lr}, {"params": alphas, "lr": scale_lr}])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps))
        gm.train()
        bar = tqdm(range(steps), desc="ternary QAT", disable=not progress, leave=False)
        for step in bar:
            inputs, target = next(batches)
            pred = model_output(prog(**inputs))
            if channels is not None:
                pred = pred[:, :channels]
            elif pred.dim() > 1 and pred.shape[1] > target.shape[1]:  # ε and a learned variance (DiT's 2C outputs)
                pred = pred[:, : target.shape[1]]
            loss = torch.nn.functional.mse_loss(pred, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(params)  # before clipping: the clip sees the concatenated batch's gradient
            if grad_clip is not None:
                clip_grad_norm(params, grad_clip)  # the global norm over shards and replicated ones
            opt.step()
            sched.step()
            with torch.no_grad():  # scales stay positive
                for p in alphas:
                    p.clamp_(min=1e-8)
            curve.append(mean_over_ranks(loss.item()))
            if step % 10 == 0:
                bar.set_postfix(loss=f"{curve[-1]:.4g}")
        gm.eval()
        for p in params:
            p.requires_grad_(False)
    return curve


class TrainTernary(Step):
    """TerDiT's ternary QAT on ``inputs.train_data`` (count = training steps); settings from the
    recipe's ``qat`` (steps, lr, scale_lr for α, batch size) and ``terdit`` (grad_clip) sections. The
    loop draws nothing itself: the batches' iterator carries the seed (``QATConfig.seed`` in the
    benchmarks' ``denoising_batches``)."""

    name = "train_ternary"
    contract: ClassVar[Contract] = Contract(requires=(RecipeHas("qat"), RecipeHas("terdit"), StageIs(("calibrated",))),
                                            writes=("qat_curve",))

    def __call__(self, prog: Program, inputs: CompileInputs) -> PassResult:
        cfg, terdit = prog.recipe.qat, prog.recipe.terdit
        if inputs.train_data is None:
            raise RecipeError(f"recipe {prog.recipe.name!r} trains (ternary QAT); pass train_data=denoising_batches(...)")
        prog.state.qat_curve = train_ternary(prog, inputs.train_data, steps=cfg.steps, lr=cfg.lr,
                                             scale_lr=cfg.scale_lr, batch_size=cfg.batch_size,
                                             grad_clip=terdit.grad_clip, distributed=prog.recipe.distributed,
                                             progress=inputs.progress)
        return PassResult(len(prog.state.qat_curve))
