"""PTQD's steps in the pipeline (phase "ptqd", ``stepq.compiler.pipeline``): measure against the FP
model, choose the bits, measure the noise. The graph side is the select_bits / correct_noise passes,
the buffers are written from the state by refresh_tables.

    choose_bits     for each width b: every step pinned to b, SNR^Q_b(t) against the FP model on the
                    same inputs; the bits table from SNR^Q_b > margin · SNR^F  → state.ptqd_bits
    measure_noise   k_t, b_t, σ_q(t) of the (mixed) model, the correction off → state.ptqd
                    (with their standard errors, under the config's estimator: shrinkage, gate)

Both read the PTQD data (``CompileInputs.ptqd_data``, default the calibration data) and the FP
model's predictions on it, computed once per compile and shared through ``CompileInputs.scratch``.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch

from stepq.artifact.quantized_model import QuantizedModel
from stepq.compiler.errors import PreconditionError
from stepq.compiler.pass_manager import (
    CompileInputs,
    Contract,
    PassResult,
    RecipeHas,
    StageIs,
    StateHas,
    Step,
)
from stepq.compiler.program import Program
from stepq.methods.ptqd.mixed import MixedPrecision, choose_bits, forward_snr, set_bits
from stepq.methods.ptqd.statistics import Estimator, measure, predictions
from stepq.recipe.specs import PTQDConfig

__all__ = ["ChooseBits", "MeasureNoise", "copy_model"]

log = logging.getLogger(__name__)


def copy_model(qm: QuantizedModel) -> QuantizedModel:
    """An independent copy of the compiled model ``qm`` (graph, buffers and state)."""
    prog = qm.program
    return QuantizedModel(prog.copy())


def _channels(prog: Program) -> int | None:
    info = prog.signature.tensors.get(prog.sample_arg) if prog.sample_arg is not None else None
    return int(info.shape[1]) if info is not None and len(info.shape) >= 2 else None


def _default_scheduler(T: int) -> Any:
    from diffusers import DDPMScheduler

    log.info("PTQD mixed precision: no scheduler given; SNR^F from DDPMScheduler(num_train_timesteps=%d)'s "
             "default (linear) betas", T)
    return DDPMScheduler(num_train_timesteps=T)


def _data(prog: Program, inputs: CompileInputs) -> tuple[list[Any], list[torch.Tensor], dict[str, Any]]:
    """(items, FP predictions, measure() keywords), computed once per compile."""
    cached = inputs.scratch.get("ptqd")
    if cached is not None:
        return cached
    cfg: PTQDConfig = prog.recipe.ptqd
    if inputs.fp_model is None:
        raise PreconditionError("PTQD measures the quantized model against the FP model; none was given")
    data = inputs.ptqd_data if inputs.ptqd_data is not None else inputs.calibration
    items = list(data) if data is not None else []
    if not items:
        raise PreconditionError("PTQD needs data: the iterable yielded no input dicts")
    kw: dict[str, Any] = dict(timestep_arg=prog.timestep_arg, num_train_timesteps=prog.recipe.num_train_timesteps,
                              timestep_scale=prog.timestep_scale, timestep_policy=prog.recipe.timestep_policy,
                              guidance_scale=cfg.guidance_scale, channels=_channels(prog))
    refs = predictions(inputs.fp_model, items, guidance_scale=cfg.guidance_scale, channels=kw["channels"])
    inputs.scratch["ptqd"] = (items, refs, kw)
    return items, refs, kw


class ChooseBits(Step):
    """Step-aware mixed precision: measure SNR^Q per width and choose the bits table (count = widths)."""

    name = "choose_bits"
    contract: ClassVar[Contract] = Contract(requires=(RecipeHas("ptqd"), StageIs(("converted",))),
                                            produces=(StateHas("ptqd_bits"),))

    @torch.no_grad()
    def __call__(self, prog: Program, inputs: CompileInputs) -> PassResult:
        cfg: PTQDConfig = prog.recipe.ptqd
        T = prog.recipe.num_train_timesteps
        items, refs, kw = _data(prog, inputs)
        qm = QuantizedModel(prog)
        snr_f = forward_snr(inputs.ptqd_scheduler if inputs.ptqd_scheduler is not None else _default_scheduler(T), T)
        curves, visited = [], None
        for b in cfg.mixed_bits:
            set_bits(qm, b)
            st = measure(refs, qm, items, normality_samples=None, seed=cfg.seed, **kw)
            curves.append(st.snr)
            visited = st.visited
        snr_q = torch.stack(curves)
        assert visited is not None
        mp = MixedPrecision(bits=tuple(cfg.mixed_bits), table=choose_bits(snr_q, cfg.snr_margin * snr_f, cfg.mixed_bits),
                            snr_q=snr_q, snr_f=snr_f, visited=visited, margin=cfg.snr_margin)
        prog.state.ptqd_bits = mp
        log.info("PTQD mixed precision: %.1f%% of the training timesteps at %d bits",
                 100 * mp.share(torch.arange(T)), cfg.mixed_bits[0])
        return PassResult(len(cfg.mixed_bits))


class MeasureNoise(Step):
    """PTQD's statistics k_t, b_t, σ_q(t) of the program as it runs now, against the FP model (count = 1)."""

    name = "measure_noise"
    contract: ClassVar[Contract] = Contract(requires=(RecipeHas("ptqd"), StageIs(("converted",))),
                                            produces=(StateHas("ptqd"),))

    @torch.no_grad()
    def __call__(self, prog: Program, inputs: CompileInputs) -> PassResult:
        cfg: PTQDConfig = prog.recipe.ptqd
        items, refs, kw = _data(prog, inputs)
        prog.state.ptqd = measure(refs, QuantizedModel(prog), items, normality_samples=cfg.normality_samples,
                                  seed=cfg.seed, estimator=Estimator.of(cfg), **kw)
        return PassResult(1)
