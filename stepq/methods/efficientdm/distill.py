"""EfficientDM's data-free distillation: the FP model teaches the QALoRA model along its own trajectories.

For each batch of ``batch_size`` trajectories (seeded initial noise and conditioning, drawn as the
``Sampling`` says), the FP model runs its sampler from x_T; at every denoising step the quantized
program sees the same x_t (and the same [cond; uncond] batch under classifier-free guidance), and
its guidance-combined ε̂ is pulled to the FP ε by

    L_t = mean (ε̂_q(x_t, t) − ε_FP(x_t, t))²

with one AdamW step per denoising step (the authors' loop); the trajectory continues with the FP ε,
so the student is trained on the teacher's distribution of x_t. Training stops after ``steps``
optimiser steps (a step budget, never a wall-clock one), in the middle of a trajectory if need be.

Trained: the LoRA factors (per layer ``lora_lr · mean(Δ_w)`` when ``scale_aware``, else one rate
with the same mean), the weight steps Δ_w (``weight_step_lr``), the TALSQ step and zero-point
tables (``act_lr``). Everything else (the pre-quantized weights, biases, norms, zero points of the
weights) is frozen. Learning rates decay linearly to 0 over ``steps``. No global state: the
optimiser and the generator are local, so the loop can run under DistributedDataParallel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from stepq.calibration.collect import Sampling
from stepq.calibration.samplers import default_make_inputs, make_denoiser, sample
from stepq.compiler import meta, ops
from stepq.compiler.distributed import (
    average_gradients,
    broadcast_parameters,
    mean_over_ranks,
    or_bool_buffers,
    rank_seed,
)
from stepq.compiler.errors import PreconditionError, RecipeError
from stepq.compiler.fsdp import check_mode, fsdp_training
from stepq.compiler.graph_utils import arg_node, as_parameter, fetch_attr
from stepq.compiler.pass_manager import (
    CompileInputs,
    Contract,
    OpPresent,
    PassResult,
    RecipeHas,
    StageIs,
    Step,
)
from stepq.compiler.program import Program
from stepq.methods.efficientdm.talsq import TemporalSteps
from stepq.passes.insert_lora import adapter_nodes, is_adapter
from stepq.passes.insert_scale_source import SCALE_SOURCE
from stepq.recipe.specs import QALoRAConfig

__all__ = ["DistillQALoRA", "distill_qalora", "lora_learning_rates"]

log = logging.getLogger(__name__)

aten = torch.ops.aten


class _Done(Exception):
    """Raised inside the sampler when the step budget is spent."""


def _adapted_weight_quantizers(prog: Program) -> dict[str, torch.fx.Node]:
    """adapter target → the weight fake_quant it feeds (fake_quant(add(W, adapter)))."""
    out = {}
    for d in adapter_nodes(prog.gm):
        for add in d.users:
            for fq in add.users:
                if fq.target is ops.FAKE_QUANT:
                    out[str(d.target)] = fq
    return out


def lora_learning_rates(prog: Program, cfg: QALoRAConfig) -> dict[str, float]:
    """The LoRA learning rate of each adapter: ``lora_lr · mean(Δ_w)`` of its layer (scale-aware), or
    ``lora_lr`` times the mean of those means for every layer."""
    means = {name: float(fetch_attr(prog.gm, arg_node(fq, 1).target).detach().mean())
             for name, fq in _adapted_weight_quantizers(prog).items()}
    if not means:
        return {}
    if cfg.scale_aware:
        return {k: cfg.lora_lr * v for k, v in means.items()}
    avg = sum(means.values()) / len(means)
    return {k: cfg.lora_lr * avg for k in means}


def _grid_of_rows(prog: Program, source: TemporalSteps) -> tuple[Tensor, Tensor]:
    """[L] quant_min / quant_max of the quantizer behind each row of the TALSQ source."""
    lo = torch.zeros(len(source.names))
    hi = torch.full((len(source.names),), 255.0)
    for n in prog.gm.graph.nodes:
        if n.target is ops.FAKE_QUANT and n.meta.get(meta.ACT_QUANTIZER) in source.names:
            row = source.names.index(n.meta[meta.ACT_QUANTIZER])
            lo[row], hi[row] = float(n.args[3]), float(n.args[4])
    return lo, hi


@torch.no_grad()
def distill_qalora(
    prog: Program,
    teacher: Callable[..., Any],
    sampling: Sampling,
    cfg: QALoRAConfig,
    *,
    distributed: str = "ddp",
    progress: bool = True,
) -> list[float]:
    """Train ``prog``'s adapters (and TALSQ tables, weight steps) by distillation from ``teacher``;
    returns the loss of every optimiser step. ``distributed="fsdp"``: the program sharded by FSDP2
    for the loop (the tensors it borrows from the user's model, the teacher's, stay whole:
    ``stepq.compiler.fsdp``)."""
    if prog.stage != "calibrated":
        raise PreconditionError(f"distill_qalora needs a calibrated program, got stage {prog.stage!r}")
    check_mode(distributed)
    gm = prog.gm
    if not adapter_nodes(gm):
        raise PreconditionError("distill_qalora: the program has no LoRA adapter (run insert_lora first)")
    for p in gm.parameters():
        p.requires_grad_(False)
    rates = lora_learning_rates(prog, cfg)
    groups: list[dict[str, Any]] = []
    for name, lr in rates.items():
        groups.append({"params": list(gm.get_submodule(name).parameters()), "lr": lr, "name": name})
    w_steps = [as_parameter(gm, str(arg_node(fq, 1).target)) for fq in _adapted_weight_quantizers(prog).values()]
    if cfg.weight_step_lr > 0:
        groups.append({"params": w_steps, "lr": cfg.weight_step_lr, "name": "weight_steps"})
    source = gm.get_submodule(SCALE_SOURCE) if hasattr(gm, SCALE_SOURCE) else None
    talsq = source if isinstance(source, TemporalSteps) else None
    if source is not None:
        groups.append({"params": list(source.parameters()), "lr": cfg.act_lr, "name": "activation_steps"})
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    grid = _grid_of_rows(prog, talsq) if talsq is not None else None
    broadcast_parameters([p for g in groups for p in g["params"]])
    with fsdp_training(gm, distributed, borrowed=prog.borrowed) as sharding:
        for g in groups:
            g["params"] = sharding.params(g["params"])
        curve = _distill(prog, teacher, sampling, cfg, groups, sharding.params(w_steps), talsq, grid, progress)
    or_bool_buffers(gm)  # TALSQ's visited timesteps: the union over the ranks
    return curve


def _distill(prog: Program, teacher: Callable[..., Any], sampling: Sampling, cfg: QALoRAConfig,
             groups: list[dict[str, Any]], w_steps: list[torch.nn.Parameter], talsq: TemporalSteps | None,
             grid: tuple[Tensor, Tensor] | None, progress: bool) -> list[float]:
    """The distillation loop on the (possibly sharded) parameter groups; returns the loss curve."""
    gm = prog.gm
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    steps = cfg.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1.0 - i / max(1, steps)))
    make = sampling.make_inputs or default_make_inputs(teacher)
    shape = sampling.sample_shape
    channels = sampling.channels if sampling.channels is not None else shape[0]
    n_steps = cfg.num_inference_steps or sampling.num_inference_steps
    seed = rank_seed(cfg.seed)  # each rank distills along its own trajectories
    gen = torch.Generator().manual_seed(seed)
    trained = [p for g in groups for p in g["params"]]
    curve: list[float] = []
    bar = tqdm(total=steps, desc="QALoRA distillation", disable=not progress, leave=False)

    def train_step(pred: Tensor, target: Tensor) -> None:
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(trained)  # the replicated ones (all of them under "ddp")
        with torch.no_grad():
            opt.step()
            sched.step()
            if talsq is not None and grid is not None:
                talsq.clamp_(*grid)
            for p in w_steps:
                p.clamp_(min=1e-8)
        curve.append(mean_over_ranks(float(loss.detach())))
        bar.update(1)
        if len(curve) % 10 == 0:
            bar.set_postfix(loss=f"{curve[-1]:.4g}")
        if len(curve) >= steps:
            raise _Done

    def draw(n: int) -> tuple[Tensor, dict[str, Any], dict[str, Any] | None]:
        noise = torch.randn((n, *shape), generator=gen)
        cond: dict[str, Any] = dict(sampling.conditions(n, gen)) if sampling.conditions else {}
        un = dict(sampling.uncond(cond)) if sampling.uncond is not None else None
        return noise, cond, un

    def denoiser(model: Callable[..., Any], cond: Mapping[str, Any],
                 un: Mapping[str, Any] | None) -> Callable[[Tensor, Tensor], Tensor]:
        return make_denoiser(model, make_inputs=make, cond=cond, uncond=un, guidance_scale=sampling.guidance_scale,
                             channels=channels)

    gm.train()
    trajectory = 0
    try:
        if cfg.order == "trajectory":
            while len(curve) < steps:
                noise, cond, un = draw(cfg.batch_size)
                denoise = _training_denoiser(denoiser(teacher, cond, un), denoiser(prog, cond, un), train_step)
                try:
                    sample(denoise, sampling.scheduler, noise, n_steps, seed=seed * 1_000_003 + trajectory,
                           eta=sampling.eta)
                except _Done:
                    break
                trajectory += 1
        else:
            while len(curve) < steps:
                buffer = _TeacherBuffer()
                for _ in range(cfg.buffer_trajectories):
                    noise, cond, un = draw(cfg.batch_size)
                    buffer.record(denoiser(teacher, cond, un), sampling, noise, n_steps, cond,
                                  seed=seed * 1_000_003 + trajectory)
                    trajectory += 1
                try:
                    for x, t, target, cond in buffer.batches(cfg.batch_size, gen):
                        un = dict(sampling.uncond(cond)) if sampling.uncond is not None else None
                        with torch.enable_grad():
                            train_step(denoiser(prog, cond, un)(x, t), target)
                except _Done:
                    break
    finally:
        bar.close()
        gm.eval()
        for p in gm.parameters():
            p.requires_grad_(False)
    return curve


class _TeacherBuffer:
    """The teacher's steps of a few trajectories, (x_t, t, ε_FP, conditioning) per sample and step,
    served back as shuffled minibatches: every kept pair once, in random order across samples and
    timesteps (``QALoRAConfig.order = "shuffled"``)."""

    def __init__(self) -> None:
        self.x: list[Tensor] = []
        self.t: list[Tensor] = []
        self.eps: list[Tensor] = []
        self.sample: list[Tensor] = []  # index of the sample (into the concatenated conditioning)
        self.conds: list[dict[str, Any]] = []
        self.n = 0

    def record(self, fp: Callable[[Tensor, Tensor], Tensor], sampling: Sampling, noise: Tensor, n_steps: int,
               cond: Mapping[str, Any], *, seed: int) -> None:
        ids = torch.arange(self.n, self.n + noise.shape[0])

        def denoise(x: Tensor, t: Tensor) -> Tensor:
            eps = fp(x, t)
            self.x.append(x.detach().clone())
            self.t.append(torch.as_tensor(t).reshape(-1).expand(x.shape[0]).clone())
            self.eps.append(eps.detach().clone())
            self.sample.append(ids)
            return eps

        sample(denoise, sampling.scheduler, noise, n_steps, seed=seed, eta=sampling.eta)
        self.conds.append(dict(cond))
        self.n += noise.shape[0]

    def batches(self, batch_size: int, gen: torch.Generator) -> Iterator[tuple[Tensor, Tensor, Tensor, dict[str, Any]]]:
        x, t, eps, ids = torch.cat(self.x), torch.cat(self.t), torch.cat(self.eps), torch.cat(self.sample)
        cond = {k: (torch.cat([c[k] for c in self.conds]) if isinstance(v, Tensor) else v)
                for k, v in (self.conds[0] if self.conds else {}).items()}
        perm = torch.randperm(x.shape[0], generator=gen)
        for chunk in perm.split(batch_size):
            if chunk.numel() < batch_size:
                break  # every batch the same size (the last partial one is dropped)
            yield x[chunk], t[chunk], eps[chunk], {k: (v[ids[chunk]] if isinstance(v, Tensor) else v)
                                                  for k, v in cond.items()}


def _training_denoiser(fp: Callable[[Tensor, Tensor], Tensor], student: Callable[[Tensor, Tensor], Tensor],
                       train_step: Callable[[Tensor, Tensor], None]) -> Callable[[Tensor, Tensor], Tensor]:
    """The sampler's denoiser: the FP ε continues the trajectory; on the way, one training step
    pulls the student's ε on the same x_t to it."""

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        target = fp(x, t)
        with torch.enable_grad():
            pred = student(x, t)
            train_step(pred, target)
        return target

    return denoise


class DistillQALoRA(Step):
    """EfficientDM's distillation of the QALoRA program from the FP model (count = optimiser steps).

    Reads ``inputs.fp_model`` (the teacher: the user's model, never modified) and ``inputs.sampling``
    (the trajectories: ``stepq.Sampling``, by default the calibration's)."""

    name = "distill_qalora"
    contract: ClassVar[Contract] = Contract(
        requires=(RecipeHas("qalora"), StageIs(("calibrated",)), OpPresent(is_adapter, "LoRA adapter")),
        writes=("distill_curve",))

    def __call__(self, prog: Program, inputs: CompileInputs) -> PassResult:
        cfg = prog.recipe.qalora
        assert cfg is not None
        if inputs.fp_model is None:
            raise RecipeError(f"recipe {prog.recipe.name!r} distills from the FP model; pass fp_model=")
        if not isinstance(inputs.sampling, Sampling):
            raise RecipeError(f"recipe {prog.recipe.name!r} distills along FP trajectories: pass sampling=stepq.Sampling"
                              "(...) or calibration data from stepq.calibration.collect (which records its sampling)")
        prog.state.distill_curve = distill_qalora(prog, inputs.fp_model, inputs.sampling, cfg,
                                                  distributed=prog.recipe.distributed, progress=inputs.progress)
        return PassResult(len(prog.state.distill_curve))

