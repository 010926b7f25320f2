"""TDQ smooth in t: W4A4 TDQ on the digits DiT, fitted on DDIM-20 calibration, scored by the relative
output error against FP on held-out trajectories of DDIM-20 (the calibration's sampler) and DDPM-100
(timesteps the fit never saw). Fast (no sampling of images, no FD); docs/TDQ.md "Smooth in t".

    OMP_NUM_THREADS=1 python benchmarks/tdq_smooth.py [--calib 16] [--eval 8] [--steps 300]
"""

from __future__ import annotations

import argparse
import time

import torch

import stepq
from stepq import zoo
from stepq.calibration import collect
from stepq.methods.tdq.fit import fit_scale_source

CONFIGS: dict[str, dict] = {
    "static": {},
    "TDQ (old: geometric)": dict(frequencies="geometric"),
    "geometric + smoothness 1": dict(frequencies="geometric", smoothness=1.0),
    "geometric + smoothness 10": dict(frequencies="geometric", smoothness=10.0),
    "geometric + holdout 0.2": dict(frequencies="geometric", holdout=0.2),
    "geometric + smoothness 1 + holdout 0.2": dict(frequencies="geometric", smoothness=1.0, holdout=0.2),
    "grid": dict(frequencies="grid"),
    "grid + smoothness 1": dict(frequencies="grid", smoothness=1.0),
    "grid + holdout 0.2": dict(frequencies="grid", holdout=0.2),
    "grid + smoothness 1 + holdout 0.2": dict(frequencies="grid", smoothness=1.0, holdout=0.2),
}


def _collect(model, entry, kind, steps, n, seed):
    return collect(model, entry.make_scheduler(kind), num_samples=n, num_inference_steps=steps, seed=seed,
                   sample_shape=entry.sample_shape, conditions=entry.conditions, uncond=entry.uncond,
                   guidance_scale=entry.guidance_scale, eta=0.0, channels=entry.sample_shape[0], progress=False)


@torch.no_grad()
def rel_error(qm, model, data) -> float:
    """Mean over the calls of ‖ε̂_q − ε_fp‖² / ‖ε_fp‖² (the first output)."""
    errs = []
    for x in data:
        ref = model(**x)
        ref = ref[0] if isinstance(ref, tuple) else getattr(ref, "sample", ref)
        q = qm(**x)
        q = q[0] if isinstance(q, tuple) else getattr(q, "sample", q)
        errs.append(float(((q - ref) ** 2).mean() / ref.pow(2).mean()))
    return sum(errs) / len(errs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="digits-dit")
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--eval", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    args = ap.parse_args()
    torch.manual_seed(0)
    model, entry = zoo.load(args.model), zoo.entry(args.model)
    calib = _collect(model, entry, "ddim", 20, args.calib, seed=12345)
    evals = {"DDIM-20": _collect(model, entry, "ddim", 20, args.eval, seed=777),
             "DDPM-100": _collect(model, entry, "ddpm", 100, args.eval, seed=778)}
    base = stepq.get_preset("w4a4-tdq")
    recipe = base.replace(tdq=base.tdq.replace(fit_steps=0))
    prog0 = stepq.calibrate(stepq.prepare(stepq.capture(model, calib[0]), recipe), calib, progress=False)
    print(f"{args.model} W4A4, calibration DDIM-20 x {args.calib}, fit {args.steps} steps; relative output error "
          f"vs FP on held-out trajectories ({args.eval} samples each)", flush=True)
    print("| config | " + " | ".join(evals) + " | fit s |\n|---|" + "---|" * (len(evals) + 1), flush=True)
    for name in args.configs:
        t0 = time.perf_counter()
        prog = prog0.copy()
        extra = ""
        if name != "static":
            cfg = base.tdq.replace(**CONFIGS[name])
            fit = fit_scale_source(prog, list(calib), steps=args.steps, lr=cfg.fit_lr, batch=cfg.fit_batch,
                                   rows=cfg.fit_rows, seed=cfg.seed, objective=cfg.fit_objective, progress=False,
                                   frequencies=cfg.frequencies, smoothness=cfg.smoothness, holdout=cfg.holdout,
                                   holdout_every=cfg.holdout_every)
            if fit.holdout_curve:
                extra = f" (best held-out at step {fit.best_step}, held out t = {fit.holdout_timesteps})"
        fit_s = time.perf_counter() - t0
        qm = stepq.convert(prog)
        errs = [rel_error(qm, model, d) for d in evals.values()]
        print(f"| {name} | " + " | ".join(f"{e:.4f}" for e in errs) + f" | {fit_s:.0f} |{extra}", flush=True)


if __name__ == "__main__":
    main()
