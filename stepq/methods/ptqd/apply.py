"""PTQD on a compiled model: measure, choose bits, fill the tables; and the matching sampler.

    qm = stepq.quantize(model, example, "w4a8", calibration=calib)        # any converted model
    qm = stepq.methods.ptqd.apply(qm, model, data)                                 # data: FP-trajectory inputs
    sched = stepq.methods.ptqd.scheduler_for(qm, DDPMScheduler.from_config(cfg))   # the variance schedule
    images = sample(make_denoiser(qm), sched, noise, 100)

``stepq.quantize`` does the same for recipes with a ``ptqd`` section (on its calibration data).

``apply`` runs, on the model's own program (in place):

1. the PTQD passes, so the graph has the output correction (identity until filled) and, for mixed
   precision, the lower widths' scales (``calibrate_widths``) and the per-timestep bit switch
   (every step at the top width until chosen); ``refresh_tables`` resets the buffers of a model
   that had them to that starting point;
2. mixed precision: for each width b, every step pinned to b and SNR^Q_b(t) measured against the
   FP model on the same inputs; the bits table chosen against SNR^F(t), each lower width's scales
   recalibrated on the steps that run at it (``calibrate_widths``), both written into the graph
   (``refresh_tables``; the SNR^Q curves kept in the state are those the choice was made on: scales
   calibrated on all steps);
3. the statistics k_t, b_t, σ_q(t) of the (mixed) model, with the correction off, on the same
   inputs; ``refresh_tables`` fills the correction tables from them and the recipe's flags.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from stepq.artifact.quantized_model import QuantizedModel
from stepq.compiler.errors import PreconditionError
from stepq.compiler.pass_manager import Skip, run_passes
from stepq.methods.ptqd.mixed import CalibrateWidths, MixedPrecision, choose_bits, forward_snr, set_bits
from stepq.methods.ptqd.scheduler import PTQDScheduler, scheduler_kind
from stepq.methods.ptqd.statistics import PTQDStats, measure, predictions
from stepq.passes import CorrectNoise, RefreshTables, SelectBits
from stepq.recipe.specs import PTQDConfig

__all__ = ["apply", "copy_model", "scheduler_for", "with_config"]

log = logging.getLogger(__name__)


def copy_model(qm: QuantizedModel) -> QuantizedModel:
    """An independent copy of a compiled model (graph, buffers and state)."""
    prog = qm.program
    return QuantizedModel(prog.replace(gm=copy.deepcopy(prog.gm), state=prog.state.copy(), history=list(prog.history)))


def _channels(qm: QuantizedModel) -> int | None:
    prog = qm.program
    info = prog.signature.tensors.get(prog.sample_arg) if prog.sample_arg is not None else None
    return int(info.shape[1]) if info is not None and len(info.shape) >= 2 else None


def _default_scheduler(T: int) -> Any:
    from diffusers import DDPMScheduler

    log.info("PTQD mixed precision: no scheduler given; SNR^F from DDPMScheduler(num_train_timesteps=%d)'s "
             "default (linear) betas", T)
    return DDPMScheduler(num_train_timesteps=T)


@torch.no_grad()
def apply(qm: QuantizedModel, fp_model: Any, data: Iterable[Mapping[str, Any]], *, config: PTQDConfig | None = None,
          scheduler: Any = None) -> QuantizedModel:
    """Measure PTQD's statistics of ``qm`` against ``fp_model`` on ``data`` and fill its graph (in place).

    Args:
        qm: a converted model (any recipe; ``config`` or the recipe's ``ptqd`` section says what to do).
        fp_model: the floating-point model ``qm`` was compiled from.
        data: denoiser input dicts recorded along FP trajectories (``stepq.calibration.collect``), at
            ``config.guidance_scale`` when the model is guided (the dicts are then [cond; uncond] calls).
        config: overrides ``qm.recipe.ptqd`` (and is recorded in the recipe); default ``PTQDConfig()``.
        scheduler: the diffusers scheduler whose ᾱ_t gives SNR^F for mixed precision (default: DDPM's).
    """
    if not isinstance(qm, QuantizedModel):
        raise PreconditionError(f"stepq.methods.ptqd.apply takes a QuantizedModel, got {type(qm).__name__}")
    prog = qm.program
    cfg = config or prog.recipe.ptqd or PTQDConfig()
    prog.recipe = prog.recipe.replace(ptqd=cfg)
    T = prog.recipe.num_train_timesteps
    items = list(data)
    if not items:
        raise PreconditionError("stepq.methods.ptqd.apply needs data: the iterable yielded no input dicts")
    prog.state.ptqd = None  # measure the uncorrected model: the correction is the identity
    prog.state.ptqd_bits = None  # and start from every step at the top width, all-step scales
    mixed = cfg.mixed_bits or ()
    run_passes(prog, [CalibrateWidths() if mixed else Skip("calibrate_widths", "PTQDConfig.mixed_bits is empty"),
                      SelectBits() if mixed else Skip("select_bits", "PTQDConfig.mixed_bits is empty"),
                      CorrectNoise(), RefreshTables()])
    kw: dict[str, Any] = dict(timestep_arg=prog.timestep_arg, num_train_timesteps=T,
                              timestep_scale=prog.timestep_scale, timestep_policy=prog.recipe.timestep_policy,
                              guidance_scale=cfg.guidance_scale, channels=_channels(qm))
    refs = predictions(fp_model, items, guidance_scale=cfg.guidance_scale, channels=kw["channels"])
    if cfg.mixed_bits:
        snr_f = forward_snr(scheduler if scheduler is not None else _default_scheduler(T), T)
        curves, visited = [], None
        for b in cfg.mixed_bits:
            set_bits(qm, b)
            st = measure(refs, qm, items, normality_samples=None, seed=cfg.seed, **kw)
            curves.append(st.snr)
            visited = st.visited
        snr_q = torch.stack(curves)
        assert visited is not None
        mp = MixedPrecision(bits=tuple(cfg.mixed_bits), table=choose_bits(snr_q, cfg.snr_margin * snr_f,
                                                                          cfg.mixed_bits),
                            snr_q=snr_q, snr_f=snr_f, visited=visited, margin=cfg.snr_margin)
        prog.state.ptqd_bits = mp
        # each lower width recalibrated on the steps that now run at it; the table and scales written
        run_passes(prog, [CalibrateWidths(), RefreshTables()])
        log.info("PTQD mixed precision: %.1f%% of the training timesteps at %d bits",
                 100 * mp.share(torch.arange(T)), cfg.mixed_bits[0])
    stats = measure(refs, qm, items, normality_samples=cfg.normality_samples, seed=cfg.seed, **kw)
    prog.state.ptqd = stats
    run_passes(prog, [RefreshTables()])
    return qm


def with_config(qm: QuantizedModel, config: PTQDConfig) -> QuantizedModel:
    """A copy of ``qm`` with its measured statistics applied under other flags (an ablation)."""
    prog = qm.program
    if not prog.state.has('ptqd'):
        raise PreconditionError("with_config needs a model with PTQD statistics (run stepq.methods.ptqd.apply)")
    old = prog.recipe.ptqd
    if old is not None and tuple(old.mixed_bits) != tuple(config.mixed_bits):
        raise PreconditionError("with_config cannot change mixed_bits: the statistics were measured on the other "
                                "bit schedule")
    out = copy_model(qm)
    out.program.recipe = prog.recipe.replace(ptqd=config)
    run_passes(out.program, [CorrectNoise(), RefreshTables()])
    return out


def scheduler_for(qm: QuantizedModel, scheduler: Any) -> Any:
    """``scheduler`` wrapped in ``PTQDScheduler`` with ``qm``'s statistics, when its recipe asks for the
    variance schedule (else, and for flow matching, ``scheduler`` itself)."""
    cfg = qm.recipe.ptqd
    stats: PTQDStats | None = qm.program.state.ptqd
    if cfg is None or not cfg.variance or stats is None:
        return scheduler
    if scheduler_kind(scheduler) == "flow":
        log.info("PTQD: flow-matching sampling is deterministic; only the output correction applies")
        return scheduler
    return PTQDScheduler(scheduler, stats, correlated=cfg.correlated)
