"""Calibration time against the FP forward time of the same calls, on the digits models.

For each model: ``collect`` records ``--samples`` DDIM trajectories of ``--steps`` steps (20 calls of
batch 16 by default; the DiT's classifier-free guidance makes its calls batch 32), the model is
captured and prepared with each recipe, and then ``--repeats`` rounds each time, in turn, the FP
model's forward over every recorded call and ``stepq.calibrate`` of a fresh copy of the prepared
program on the same calls (observers, then the frozen scales: everything ``calibrate`` runs, TDQ's
fit aside: the recipes here have none). The table gives the medians and their ratio.

    python benchmarks/calibration_speed.py [--models ddpm,dit] [--recipes w8a8,w4a8] [--repeats 3]

Run it against another tree (the ratio before a change) with ``PYTHONPATH=<tree>``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import stepq
from stepq import zoo
from stepq.calibration import collect

warnings.filterwarnings("ignore")

MODELS = {"ddpm": "digits-ddpm", "dit": "digits-dit"}


def calls(name: str, samples: int, steps: int) -> list[dict]:
    model, entry = zoo.load(name), zoo.entry(name)
    data = collect(model, entry.make_scheduler("ddim"), num_samples=samples, num_inference_steps=steps,
                   sample_shape=entry.sample_shape, conditions=entry.conditions, uncond=entry.uncond,
                   guidance_scale=entry.guidance_scale, eta=0.0, channels=entry.sample_shape[0], progress=False)
    return list(data)


def measure(name: str, recipe: str, data: list[dict], repeats: int) -> dict[str, float]:
    model = zoo.load(name)
    prepared = stepq.prepare(stepq.capture(model, data[0]), recipe)
    fp, cal = [], []
    with torch.no_grad():
        for it in data[:2]:  # warm-up
            model(**it)
        for _ in range(repeats):
            t0 = time.perf_counter()
            for it in data:
                model(**it)
            fp.append(time.perf_counter() - t0)
            prog = prepared.copy()
            t0 = time.perf_counter()
            stepq.calibrate(prog, data, progress=False)
            cal.append(time.perf_counter() - t0)
    f, c = statistics.median(fp), statistics.median(cal)
    return {"fp_s": f, "calibrate_s": c, "ratio": c / f}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="ddpm,dit")
    ap.add_argument("--recipes", default="w8a8")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(f"stepq from {stepq.__file__}; torch threads {torch.get_num_threads()}")
    print("| model | recipe | calls × batch | FP forward (s) | calibrate (s) | calibrate / FP |")
    print("|---|---|---|---|---|---|")
    for key in args.models.split(","):
        name = MODELS[key]
        data = calls(name, args.samples, args.steps)
        batch = int(next(v for v in data[0].values() if isinstance(v, torch.Tensor) and v.dim() == 4).shape[0])
        for recipe in args.recipes.split(","):
            r = measure(name, recipe, data, args.repeats)
            print(f"| {name} | {recipe} | {len(data)} × {batch} | {r['fp_s']:.3f} | {r['calibrate_s']:.3f} "
                  f"| {r['ratio']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
