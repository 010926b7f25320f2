"""PTQD's variance-schedule calibration: the sampler absorbs the residual quantization noise.

After the output correction, the prediction is ε + r_t/(1 + k_t) with r_t ~ N(0, σ_q(t)²) (PTQD's
model), so every step already injects noise of known variance through the ε term; the sampler's own
noise is lowered by as much.

DDPM (ε prediction). x_{t−1} = (x_t − β_t/√(1−ᾱ_t)·ε)/√α_t + σ_t·z, so the residual enters with the
coefficient β_t/(√α_t·√(1−ᾱ_t)):

    σ'_t² = max(σ_t² − β_t²/(α_t(1−ᾱ_t)(1+k_t)²)·σ_q(t)², 0)

with σ_t² diffusers' "fixed_small" variance and, for a schedule that skips timesteps, the effective
α_t = ᾱ_t/ᾱ_prev, β_t = 1 − α_t of the jump (what diffusers' step uses).

DDIM. x_{t−1} = √ᾱ_{t−1}·x̂_0 + √(1−ᾱ_{t−1}−σ_t²)·ε + σ_t·z with x̂_0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t, so the
ε coefficient is √(1−ᾱ_{t−1}−σ_t²) − √ᾱ_{t−1}·√(1−ᾱ_t)/√ᾱ_t and

    λ_t = [√(1−ᾱ_{t−1}−σ_t²) − √ᾱ_{t−1}·√(1−ᾱ_t)/√ᾱ_t] / (1 + k_t),   σ'_t² = max(σ_t² − λ_t²σ_q(t)², 0)

with σ_t = η·√((1−ᾱ_{t−1})/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_{t−1})). The step then runs diffusers' DDIM update with
η'_t = σ'_t/√var, so the direction term uses σ'_t as well (as the authors' sampler does). With
η = 0 (deterministic DDIM) σ_t = 0 and there is nothing to lower: the variance part does nothing and
only the output correction acts.

Flow matching (FlowMatchEulerDiscreteScheduler): the sampler is deterministic, so only the output
correction applies; the wrapper passes every step through unchanged.

The wrapper never draws noise differently from the wrapped scheduler: the same generator gives the
same noise sequence, so FP and quantized trajectories stay comparable sample by sample. With k = 0
and σ_q = 0 a step equals diffusers' step exactly.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from stepq.compiler.errors import StepqError

__all__ = ["PTQDScheduler", "UnsupportedSchedulerError", "scheduler_for", "scheduler_kind"]

log = logging.getLogger(__name__)


class UnsupportedSchedulerError(StepqError, ValueError):
    """A scheduler (or scheduler configuration) that PTQD's variance correction cannot wrap."""


def scheduler_kind(scheduler: Any) -> str:
    """"ddpm", "ddim" or "flow" for a diffusers ``scheduler`` PTQD supports."""
    names = {c.__name__ for c in type(scheduler).__mro__}
    if "DDPMScheduler" in names:
        return "ddpm"
    if "DDIMScheduler" in names:
        return "ddim"
    if "FlowMatchEulerDiscreteScheduler" in names:
        return "flow"
    raise UnsupportedSchedulerError(f"PTQDScheduler wraps diffusers' DDPMScheduler, DDIMScheduler and "
                                    f"FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}")


def _check_config(scheduler: Any, kind: str) -> None:
    cfg = scheduler.config
    if kind == "flow":
        return
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise UnsupportedSchedulerError(f"PTQD's variance correction needs ε prediction, the scheduler has "
                                        f"prediction_type={cfg.get('prediction_type')!r}")
    if cfg.get("thresholding", False):
        raise UnsupportedSchedulerError("PTQD's variance correction does not support dynamic thresholding")
    if kind == "ddpm" and cfg.get("variance_type", "fixed_small") != "fixed_small":
        raise UnsupportedSchedulerError(f"PTQD's DDPM correction is for variance_type='fixed_small', the scheduler "
                                        f"has {cfg.get('variance_type')!r}")


class PTQDScheduler:
    """A diffusers scheduler whose per-step noise variance is lowered by PTQD's residual variance.

    ``stats`` gives k_t and σ_q(t) as tables over the training timesteps (``PTQDStats``, or anything
    with ``k`` and ``sigma`` tensors of length T). ``correlated=False`` says the model output was not
    divided by (1 + k_t), so k is taken as 0. Every attribute not defined here (``timesteps``,
    ``set_timesteps``, ``scale_model_input``, ``config``...) is the wrapped scheduler's.
    """

    def __init__(self, scheduler: Any, stats: Any, *, correlated: bool = True):
        kind = scheduler_kind(scheduler)
        _check_config(scheduler, kind)
        k, sigma = torch.as_tensor(stats.k).double(), torch.as_tensor(stats.sigma).double()
        T = int(scheduler.config.get("num_train_timesteps", k.numel()))
        if k.shape != (T,) or sigma.shape != (T,):
            raise UnsupportedSchedulerError(f"the PTQD tables have {k.numel()} timesteps, the scheduler {T}")
        if kind == "flow":
            log.info("PTQDScheduler: flow matching is deterministic; only the output correction applies")
        self.scheduler = scheduler
        self.stats = stats
        self.kind = kind
        self.correlated = correlated
        self._k = k if correlated else torch.zeros_like(k)
        self._sigma = sigma

    # -- delegation -----------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name in ("scheduler", "stats", "kind", "correlated", "_k", "_sigma"):
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    def fresh(self) -> PTQDScheduler:
        """A wrapper around a fresh copy of the wrapped scheduler (``stepq.calibration.samplers.fresh_scheduler``)."""
        inner = type(self.scheduler).from_config(self.scheduler.config)
        return PTQDScheduler(inner, self.stats, correlated=self.correlated)

    def __repr__(self) -> str:
        return f"PTQDScheduler({type(self.scheduler).__name__}, correlated={self.correlated})"

    # -- the variance rule ----------------------------------------------------------------------
    def _tables(self, t: int) -> tuple[float, float]:
        return float(self._k[t]), float(self._sigma[t])

    def ddpm_variance(self, timestep: int) -> tuple[Tensor, Tensor]:
        """(σ_t², σ'_t²) of a DDPM step from ``timestep`` (after ``set_timesteps``)."""
        s = self.scheduler
        t = int(timestep)
        prev_t = s.previous_timestep(t)
        a_t = s.alphas_cumprod[t]
        a_prev = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.one
        alpha = a_t / a_prev
        beta = 1 - alpha
        var = s._get_variance(t)  # fixed_small, clamped at 1e-20 as diffusers does
        k, sq = self._tables(t)
        if sq == 0.0:
            return var, var
        coef = beta**2 / (alpha * (1 - a_t) * (1 + k) ** 2)
        return var, torch.clamp(var - coef * sq**2, min=0.0)

    def ddim_variance(self, timestep: int, eta: float) -> tuple[Tensor, Tensor, Tensor]:
        """(var, σ_t², σ'_t²) of a DDIM step: var is DDIM's variance at η = 1, σ_t² = η²·var."""
        s = self.scheduler
        t = int(timestep)
        prev_t = t - s.config.num_train_timesteps // s.num_inference_steps
        a_t = s.alphas_cumprod[t]
        a_prev = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.final_alpha_cumprod
        var = s._get_variance(t, prev_t)
        sigma2 = (eta * var**0.5) ** 2
        k, sq = self._tables(t)
        if sq == 0.0 or eta == 0.0:
            return var, sigma2, sigma2
        lam = ((1 - a_prev - sigma2).clamp_min(0) ** 0.5 - a_prev**0.5 * (1 - a_t) ** 0.5 / a_t**0.5) / (1 + k)
        return var, sigma2, torch.clamp(sigma2 - lam**2 * sq**2, min=0.0)

    # -- stepping -------------------------------------------------------------------------------
    def step(self, model_output: Tensor, timestep: Any, sample: Tensor, eta: float | None = None,
             generator: torch.Generator | None = None, return_dict: bool = True, **kwargs: Any) -> Any:
        if self.kind == "flow":
            return self.scheduler.step(model_output, timestep, sample, generator=generator, return_dict=return_dict,
                                       **kwargs)
        if self.kind == "ddim":
            return self._ddim_step(model_output, timestep, sample, 0.0 if eta is None else float(eta), generator,
                                   return_dict, **kwargs)
        return self._ddpm_step(model_output, timestep, sample, generator, return_dict)

    def _ddim_step(self, model_output: Tensor, timestep: Any, sample: Tensor, eta: float,
                   generator: torch.Generator | None, return_dict: bool, **kwargs: Any) -> Any:
        if eta <= 0.0 or kwargs.get("variance_noise") is not None:
            return self.scheduler.step(model_output, timestep, sample, eta=eta, generator=generator,
                                       return_dict=return_dict, **kwargs)
        var, sigma2, new2 = self.ddim_variance(int(timestep), eta)
        if bool(new2 == sigma2):
            new_eta = eta
        else:
            new_eta = float((new2 / var).sqrt()) if float(var) > 0 else 0.0
        from diffusers.utils.torch_utils import randn_tensor

        # draw the noise here, as the wrapped step would, so the generator advances identically
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype)
        return self.scheduler.step(model_output, timestep, sample, eta=new_eta,
                                   variance_noise=noise if new_eta > 0 else None, return_dict=return_dict, **kwargs)

    def _ddpm_step(self, model_output: Tensor, timestep: Any, sample: Tensor, generator: torch.Generator | None,
                   return_dict: bool) -> Any:
        """diffusers' DDPMScheduler.step for ε prediction and fixed_small variance, with σ'_t."""
        from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
        from diffusers.utils.torch_utils import randn_tensor

        s = self.scheduler
        cfg = s.config
        t = int(timestep)
        if model_output.shape[1] != sample.shape[1]:
            raise UnsupportedSchedulerError(f"PTQD's DDPM step takes an ε prediction with the sample's "
                                            f"{sample.shape[1]} channels, got {model_output.shape[1]}")
        prev_t = s.previous_timestep(t)
        alpha_prod_t = s.alphas_cumprod[t]
        alpha_prod_t_prev = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        x0 = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        if cfg.clip_sample:
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        x0_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
        xt_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
        prev = x0_coeff * x0 + xt_coeff * sample
        if t > 0:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
            _, var = self.ddpm_variance(t)
            prev = prev + (var ** (0.5)) * noise
        if not return_dict:
            return (prev, x0)
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


def scheduler_for(qm: Any, scheduler: Any) -> Any:
    """``scheduler`` wrapped in ``PTQDScheduler`` with ``qm``'s statistics, when its recipe asks for the
    variance schedule (else, and for flow matching, ``scheduler`` itself)."""
    cfg = qm.recipe.ptqd
    stats = qm.program.state.ptqd
    if cfg is None or not cfg.variance or stats is None:
        return scheduler
    if scheduler_kind(scheduler) == "flow":
        log.info("PTQD: flow-matching sampling is deterministic; only the output correction applies")
        return scheduler
    return PTQDScheduler(scheduler, stats, correlated=cfg.correlated)
