"""Fit on one sampler, sample with another: does a timestep-indexed method hold off its calibration grid?

stepq's tables (TDQ step sizes, the free per-step table, PTQD's k_t, b_t, σ_q(t)) are indexed by the
integer training timestep, so one compiled model serves every schedule. This benchmark measures whether
the *quality* follows: each row is calibrated (and fitted) on FP trajectories of sampler A and sampled
with sampler B, for every chosen pair, on the shipped digits models.

Samplers (all over the model's own β schedule, ``stepq.zoo.ZooEntry.make_scheduler``):
DDPM-100, DDIM-20 and DDIM-50 (η = 0), DPM-Solver++ 20 (``DPMSolverMultistepScheduler``) and Euler
ancestral 30 (``EulerAncestralDiscreteScheduler``, float timesteps). PTQD's variance schedule wraps
DDPM and DDIM only; with the other two the row keeps the output correction and records
``variance_schedule: false``.

Every cell: FD against the held-out digits in the classifier's feature space, class accuracy (DiT),
PSNR vs the FP samples of the same sampler and seed; ``--seeds`` draws each cell with several
sampling seeds, and the spread (std over seeds) is reported beside every mean, so a difference is
read against it. Calibration: ``--calib-samples`` FP trajectories of A (seed 12345, as
benchmarks/quality.py).

    python benchmarks/cross_sampler.py --models dit --fit ddim20 --sample ddim20 dpmpp20 --n 1000
    python benchmarks/cross_sampler.py --report-only      # tables and heat maps from the JSON

Writes docs/results/cross_sampler.json (cells merged across runs, keyed by model / row / A / B /
seed), cross_sampler.md, and a heat map per method and model: cross_sampler_<model>_<method>.png,
FD(method) − FD(baseline) over A × B (negative: the method is closer to the real digits).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from safetensors.torch import load_file, save_file

import stepq
from stepq import metrics, zoo
from stepq.calibration import CalibrationData, collect
from stepq.data import load_digits_images
from stepq.methods.ptqd.scheduler import UnsupportedSchedulerError, scheduler_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality

warnings.filterwarnings("ignore")
OUT = Path("docs/results")

#: name: (scheduler kind for ZooEntry.make_scheduler, steps, eta)
SAMPLERS: dict[str, tuple[str, int, float | None]] = {
    "ddpm100": ("ddpm", 100, None),
    "ddim20": ("ddim", 20, 0.0),
    "ddim50": ("ddim", 50, 0.0),
    "dpmpp20": ("dpmsolver++", 20, None),
    "eulera30": ("euler_a", 30, None),
}


def _preset(name: str, **section_changes: dict[str, Any]) -> Callable[[], stepq.Recipe]:
    """A preset with fields of its sections replaced, e.g. ``ptqd={"bias": False}``."""
    def make() -> stepq.Recipe:
        r = stepq.get_preset(name)
        return r.replace(**{sec: getattr(r, sec).replace(**ch) for sec, ch in section_changes.items()})
    return make


#: row label -> recipe factory. "before #19" rows keep the estimators of the issue's measurement.
ROWS: dict[str, Callable[[], stepq.Recipe]] = {
    "static W4A4": _preset("w4a4"),
    "table W4A4": _preset("w4a4-steptable"),
    "TDQ W4A4": _preset("w4a4-tdq"),
    "static W8A4": _preset("w8a4"),
    "TDQ W8A4": _preset("w8a4-tdq"),
    "W4A8": _preset("w4a8"),
    "PTQD W4A8": _preset("w4a8-ptqd"),
    "PTQD W4A8 no bias": _preset("w4a8-ptqd", ptqd={"bias": False}),
}
#: heat maps: method row -> the row it is read against
BASELINES = {"table W4A4": "static W4A4", "TDQ W4A4": "static W4A4", "TDQ W8A4": "static W8A4",
             "PTQD W4A8": "W4A8", "PTQD W4A8 no bias": "W4A8"}


def _baseline(row: str) -> str | None:
    if row in BASELINES:
        return BASELINES[row]
    for method, base in BASELINES.items():  # variants: "TDQ W4A4 (…)" reads against static W4A4
        if row.startswith(method + " "):
            return base
    return None


def calibration(model: torch.nn.Module, entry: zoo.ZooEntry, sampler: str, n: int, seed: int) -> CalibrationData:
    kind, steps, eta = SAMPLERS[sampler]
    return collect(model, entry.make_scheduler(kind), num_samples=n, num_inference_steps=steps, seed=seed,
                   sample_shape=entry.sample_shape, conditions=entry.conditions, uncond=entry.uncond,
                   guidance_scale=entry.guidance_scale, eta=eta, channels=entry.sample_shape[0], progress=False)


def _key(c: dict[str, Any]) -> tuple[Any, ...]:
    return c["model"], c["row"], c["fit"], c["sample"], c["seed"], c["n"]


def load_cells(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["cells"] if path.is_file() else []


def save_cells(cells: list[dict[str, Any]], path: Path) -> None:
    """Write atomically (a crash mid-run loses nothing that was measured before)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"samplers": {k: list(v) for k, v in SAMPLERS.items()}, "cells": cells}, indent=1))
    tmp.replace(path)


def _fp_images(model: torch.nn.Module, entry: zoo.ZooEntry, short: str, sampler: str, n: int, seed: int,
               cache: Path) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    p = cache / f"fp_{short}_{sampler}_n{n}_seed{seed}.safetensors"
    if p.is_file():
        saved = load_file(str(p))
        return saved["images"], saved.get("labels"), True
    kind, steps, eta = SAMPLERS[sampler]
    images, labels = zoo.generate(model, entry, n, num_inference_steps=steps, scheduler=kind, seed=seed, eta=eta)
    cache.mkdir(parents=True, exist_ok=True)
    save_file({"images": images.contiguous()} | ({} if labels is None else {"labels": labels.contiguous()}), str(p))
    return images, labels, False


def run(args: argparse.Namespace) -> None:
    path = Path(args.out).with_suffix(".json")
    cells = load_cells(path)
    done = {_key(c) for c in cells}
    classifier = zoo.load("digits-classifier")
    test_x, _ = load_digits_images("test")
    cache = Path(args.cache_dir)

    def put(cell: dict[str, Any]) -> None:
        nonlocal cells
        cells = [c for c in cells if _key(c) != _key(cell)] + [cell]
        save_cells(cells, path)

    for short in args.models:
        name = f"digits-{short}"
        model, entry = zoo.load(name), zoo.entry(name)
        fp: dict[tuple[str, int], torch.Tensor] = {}
        for b in args.sample:
            for seed in args.seeds:
                t0 = time.perf_counter()
                images, labels, cached = _fp_images(model, entry, short, b, args.n, seed, cache)
                fp[b, seed] = images
                cell = {"model": short, "row": "fp32", "fit": None, "sample": b, "seed": seed, "n": args.n,
                        "fd": metrics.fd(images, test_x, classifier),
                        "accuracy": metrics.class_accuracy(images, labels, classifier) if labels is not None else None}
                put(cell)
                print(f"{short} fp32 {b} seed {seed}: FD {cell['fd']:.3f}"
                      f"{'' if cached else f' ({time.perf_counter() - t0:.0f}s)'}", flush=True)
        for a in args.fit:
            todo = [r for r in args.rows if any((short, r, a, b, s, args.n) not in done or args.force
                                                for b in args.sample for s in args.seeds)]
            if not todo:
                continue
            t0 = time.perf_counter()
            calib = calibration(model, entry, a, args.calib_samples, seed=12345)
            print(f"{short}: calibration on {a}: {len(calib)} batches in {time.perf_counter() - t0:.0f}s", flush=True)
            ctx = quality.Context(name, model, entry, calib, calib[0], Path(args.cache_dir))
            for row in todo:
                t0 = time.perf_counter()
                qm, nbytes = quality.stepq_row(ROWS[row]())(ctx)
                build_s = time.perf_counter() - t0
                for b in args.sample:
                    kind, steps, eta = SAMPLERS[b]
                    sched, variance = entry.make_scheduler(kind), None
                    if qm.recipe.ptqd is not None and qm.recipe.ptqd.variance:
                        try:
                            sched, variance = scheduler_for(qm, sched), True
                        except UnsupportedSchedulerError:
                            variance = False  # DPM-Solver++, Euler ancestral: the output correction only
                    for seed in args.seeds:
                        if (short, row, a, b, seed, args.n) in done and not args.force:
                            continue
                        t1 = time.perf_counter()
                        images, labels = zoo.generate(qm, entry, args.n, num_inference_steps=steps, scheduler=sched,
                                                      seed=seed, eta=eta)
                        cell = {"model": short, "row": row, "fit": a, "sample": b, "seed": seed, "n": args.n,
                                "recipe": qm.recipe.name, "fd": metrics.fd(images, test_x, classifier),
                                "accuracy": (metrics.class_accuracy(images, labels, classifier)
                                             if labels is not None else None),
                                "psnr_vs_fp": metrics.psnr(images, fp[b, seed]), "weight_bytes": nbytes,
                                "build_s": round(build_s, 1), "sample_s": round(time.perf_counter() - t1, 1),
                                "variance_schedule": variance}
                        put(cell)
                        print(f"  {row:24s} fit {a:8s} sample {b:8s} seed {seed}: FD {cell['fd']:7.3f}  PSNR "
                              f"{cell['psnr_vs_fp']:.2f}  ({cell['sample_s']}s)", flush=True)
    report(cells, Path(args.out))


# -- report ------------------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> tuple[float, float | None]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), (float(t.std()) if len(values) > 1 else None)


def _fmt(mean: float | None, std: float | None = None) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def _table(cells: list[dict[str, Any]], short: str, n: int) -> dict[tuple[str, str | None, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str | None, str], list[dict[str, Any]]] = {}
    for c in cells:
        if c["model"] == short and c["n"] == n:
            out.setdefault((c["row"], c["fit"], c["sample"]), []).append(c)
    return out


def report(cells: list[dict[str, Any]], out: Path) -> None:
    lines = ["# Cross-sampler quality (fit on A, sample with B)", "",
             "Generated by benchmarks/cross_sampler.py. Each cell: FD (mean ± std over the sampling seeds drawn; "
             "no ± where one seed was drawn), calibrated on 32 FP trajectories of the row's sampler A. Rows are "
             "A (fit), columns B (sample). Samplers: " + ", ".join(
                 f"{k} = {v[0]} {v[1]} steps" + ("" if v[2] is None else f" η={v[2]}") for k, v in SAMPLERS.items())
             + ".", ""]
    fig_paths = []
    for short in sorted({c["model"] for c in cells}):
        for n in sorted({c["n"] for c in cells if c["model"] == short}):
            tab = _table(cells, short, n)
            samples = [s for s in SAMPLERS if any(k[2] == s for k in tab)]
            fits = [s for s in SAMPLERS if any(k[1] == s for k in tab)]
            rows = list(dict.fromkeys(c["row"] for c in cells if c["model"] == short and c["n"] == n and c["fit"]))
            lines += [f"## digits-{short}, N = {n}", "", "| FP32 | " + " | ".join(samples) + " |",
                      "|---|" + "---|" * len(samples),
                      "| FD | " + " | ".join(_fmt(*_stats([c["fd"] for c in tab.get(("fp32", None, b), [])]))
                                            if tab.get(("fp32", None, b)) else "–" for b in samples) + " |", ""]
            for row in rows:
                base = _baseline(row)
                lines += [f"**{row}** (FD; in brackets FD − FD({base}) on the same seeds)" if base else f"**{row}** (FD)",
                          "", "| fit \\ sample | " + " | ".join(samples) + " |", "|---|" + "---|" * len(samples)]
                for a in fits:
                    vals = []
                    for b in samples:
                        got = tab.get((row, a, b), [])
                        if not got:
                            vals.append("–")
                            continue
                        s = _fmt(*_stats([c["fd"] for c in got]))
                        d = _paired_delta(tab, row, base, a, b) if base else None
                        vals.append(s + ("" if d is None else f" [{d[0]:+.2f}" + ("" if d[1] is None else f" ± {d[1]:.2f}")
                                                                  + "]"))
                    lines.append(f"| {a} | " + " | ".join(vals) + " |")
                lines.append("")
            for row in rows:
                base = _baseline(row)
                if base is None:
                    continue
                p = _heatmap(tab, short, n, row, base, fits, samples, out.parent)
                if p is not None:
                    fig_paths.append(p)
                    lines += [f"![{row} vs {base}, digits-{short}]({p.name})", ""]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("wrote", out.with_suffix(".md"), *fig_paths)


def _paired_delta(tab: dict[tuple[str, str | None, str], list[dict[str, Any]]], row: str, base: str, a: str,
                  b: str) -> tuple[float, float | None] | None:
    """FD(row) − FD(base) over the seeds both have (paired: the same initial and sampler noise)."""
    mine = {c["seed"]: c["fd"] for c in tab.get((row, a, b), [])}
    theirs = {c["seed"]: c["fd"] for c in tab.get((base, a, b), [])}
    common = sorted(set(mine) & set(theirs))
    if not common:
        return None
    return _stats([mine[s] - theirs[s] for s in common])


def _heatmap(tab: dict[tuple[str, str | None, str], list[dict[str, Any]]], short: str, n: int, row: str, base: str,
             fits: list[str], samples: list[str], folder: Path) -> Path | None:
    grid = torch.full((len(fits), len(samples)), float("nan"))
    for i, a in enumerate(fits):
        for j, b in enumerate(samples):
            d = _paired_delta(tab, row, base, a, b)
            if d is not None:
                grid[i, j] = d[0]
    if torch.isnan(grid).all():
        return None
    lim = float(grid.nan_to_num(0).abs().max()) or 1.0
    fig, ax = plt.subplots(figsize=(1.6 * len(samples) + 2, 1.0 * len(fits) + 1.6))
    im = ax.imshow(grid.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
    for i in range(len(fits)):
        for j in range(len(samples)):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:+.2f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(samples)), samples)
    ax.set_yticks(range(len(fits)), fits)
    ax.set(xlabel="sampled with (B)", ylabel="fitted on (A)",
           title=f"digits-{short}: FD({row}) − FD({base}), N={n}\n(blue: better than {base})")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    safe = re.sub(r"[^A-Za-z0-9.+-]+", "_", row).strip("_")
    p = folder / f"cross_sampler_{short}_{safe}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["ddpm", "dit"], choices=["ddpm", "dit"])
    ap.add_argument("--fit", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS), help="calibration samplers A")
    ap.add_argument("--sample", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS), help="sampling samplers B")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), help=f"rows to run; known: {list(ROWS)}")
    ap.add_argument("--n", type=int, default=1000, help="samples per cell (>= 1000 for FD)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="sampling seeds (>= 3 for the spread)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="re-run cells already in the JSON")
    ap.add_argument("--out", default=str(OUT / "cross_sampler"))
    ap.add_argument("--cache-dir", default="/tmp/stepq_cross_sampler_cache", help="FP samples (safetensors)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md and heat maps from the JSON")
    args = ap.parse_args(argv)
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {list(ROWS)}")
    if args.report_only:
        report(load_cells(Path(args.out).with_suffix(".json")), Path(args.out))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run(args)


if __name__ == "__main__":
    main()
