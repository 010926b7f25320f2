"""PTQD ablation on the digits models: noise correction and step-aware mixed precision.

For each digits model (DDPM UNet, class-conditional DiT with CFG) and each sampler (DDPM 100 steps,
DDIM 20 steps with η = 1 and η = 0), N seeded samples per configuration:

* W4A8 and W4A4: none / +correlated-noise correction (CNC) / +bias correction (BC) / +variance
  schedule (VSC, the PTQDScheduler wrapper; identical to +BC at η = 0, so not re-run there);
* mixed precision (W4, activations 4 or 8 bits chosen per timestep), without and with the full
  correction, with its share of 4-bit steps and BOPs against W8A8;
* FD against the held-out digits and PSNR against the FP model's samples from the same seeds.

Calibration is the quality benchmark's (``calibration_for``: 32 DDIM-50 FP trajectories); the PTQD
statistics and the SNR^Q curves are measured on other FP trajectories (DDPM, 100 steps, another
seed), with the FP and quantized models on the same inputs (the guidance-combined ε for the DiT).

    python benchmarks/ptqd.py --models ddpm --n 500      # one model (results merge per model)
    python benchmarks/ptqd.py --report-only              # rebuild docs/results/ptqd.md from the JSON

Writes docs/results/ptqd_<model>.json, docs/results/ptqd.md and PNG plots (k_t and σ_q(t); k_t and
b̄_t with their ±2 se bands, raw estimates, gated terms and the measured timesteps, per base; SNR^Q per
width against SNR^F with the chosen bits). ``--shrinkage kernel --gate-z 2 --bias-shrinkage zero`` run
the rows with the estimator of docs/PTQD.md "Statistics that transfer"; ``--stats-scheduler ddim
--stats-steps 20`` measures the statistics on DDIM-20 (η = 0) trajectories instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import stepq
from stepq import metrics, ptqd, zoo
from stepq.calibration import collect
from stepq.data import load_digits_images

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import calibration_for

warnings.filterwarnings("ignore")

SAMPLERS: dict[str, tuple[str, int, float | None]] = {
    "ddpm100": ("ddpm", 100, None),
    "ddim20-eta1": ("ddim", 20, 1.0),
    "ddim20-eta0": ("ddim", 20, 0.0),
}
# name -> (base, PTQD flags (correlated, bias, variance) or None)
VARIANTS: dict[str, tuple[str, tuple[bool, bool, bool] | None]] = {
    "none": ("", None),
    "+CNC": ("", (True, False, False)),
    "+CNC+BC": ("", (True, True, False)),
    "+CNC+BC+VSC": ("", (True, True, True)),
}
RESULTS = Path("docs/results")
#: mixed-precision bases: the paper's rule (SNR^Q > SNR^F) and stricter ones (``mixed-mM``: SNR^Q > M·SNR^F)
MIXED = ("mixed", "mixed-m10", "mixed-m100", "mixed-m1000")


def _configs(names: list[str]) -> list[tuple[str, str, tuple[bool, bool, bool] | None]]:
    out = []
    for base in ("w4a8", "w4a4"):
        for v, (_, flags) in VARIANTS.items():
            out.append((f"{base} {v}", base, flags))
    for base in MIXED:
        out.append((f"{base} none", base, (False, False, False)))
        out.append((f"{base} +CNC+BC+VSC", base, (True, True, True)))
    return [c for c in out if not names or c[0] in names or c[1] in names]


def _margin(base: str) -> float:
    return float(base.split("-m", 1)[1]) if "-m" in base else 1.0


def _config(cfg: stepq.PTQDConfig, base: str, flags: tuple[bool, bool, bool] | None) -> stepq.PTQDConfig:
    """The PTQD settings of a row: mixed bases switch A4/A8 with their SNR margin."""
    c, b, v = flags if flags is not None else (True, True, True)
    if base.startswith("mixed"):
        return cfg.replace(correlated=c, bias=b, variance=v, mixed_bits=(4, 8), snr_margin=_margin(base))
    return cfg.replace(correlated=c, bias=b, variance=v)


def _stats_summary(qm: stepq.QuantizedModel) -> dict[str, Any]:
    st: ptqd.PTQDStats = qm.program.state.ptqd
    v = st.visited
    out: dict[str, Any] = {
        "k_mean": float(st.k[v].mean()), "k_max": float(st.k[v].max()),
        "slope_min": float(st.slope[v].min()), "sigma_mean": float(st.sigma[v].mean()),
        "bias_abs_mean": float(st.bias[v].abs().mean()), "timesteps": int(v.sum()),
        "k_se_median": float(st.k_se[v].median()) if st.k_se is not None else None,
        "k_gated": float(st.k_gated[v].double().mean()) if st.k_gated is not None else None,
        "bias_gated": float(st.bias_gated[v].double().mean()) if st.bias_gated is not None else None,
        "curves": {"t": v.nonzero().reshape(-1).tolist(), "k": st.k[v].tolist(), "slope": st.slope[v].tolist(),
                   "sigma": st.sigma[v].tolist(), "snr": st.snr[v].tolist()},
    }
    if st.normality is not None:
        out["normality"] = st.normality.summary(0.01)
    return out


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def _plots(name: str, stats: dict[str, dict[str, Any]], mps: dict[str, ptqd.MixedPrecision],
           out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, s in stats.items():
        c = s["curves"]
        axes[0].plot(c["t"], c["k"], label=label)
        axes[1].plot(c["t"], c["sigma"], label=label)
    axes[0].set(title=f"{name}: k_t (clipped slope of ε̂−ε on ε)", xlabel="training timestep t", ylabel="k_t")
    axes[1].set(title=f"{name}: σ_q(t) (residual std)", xlabel="training timestep t", ylabel="σ_q")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    files.append(_save(fig, out_dir / f"ptqd_{name}_k_sigma.png"))
    for base, mp in mps.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        t = torch.arange(mp.snr_f.numel())
        for j, b in enumerate(mp.bits):
            vis = mp.visited
            ax.plot(t[vis], mp.snr_q[j][vis], ".-", ms=3, label=f"SNR^Q at A{b}")
        ax.plot(t, mp.snr_f, "k--", label="SNR^F = ᾱ/(1−ᾱ)")
        if mp.margin != 1.0:
            ax.plot(t, mp.margin * mp.snr_f, "k:", label=f"{mp.margin:g}·SNR^F (the threshold)")
        low = mp.table == mp.bits[0]
        ax.fill_between(t, 1e-3, 1e5, where=low.numpy(), color="tab:green", alpha=0.12, label=f"chosen: A{mp.bits[0]}")
        ax.set(yscale="log", ylim=(1e-2, 1e4), xlabel="training timestep t", ylabel="SNR",
               title=f"{name} {base}: step-aware activation bits")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        files.append(_save(fig, out_dir / f"ptqd_{name}_{base}_snr_bits.png"))
    return files


def run_model(short: str, args: argparse.Namespace, classifier: torch.nn.Module, test_x: torch.Tensor) -> dict[str, Any]:
    name = f"digits-{short}"
    model, entry = zoo.load(name), zoo.entry(name)
    t0 = time.perf_counter()
    calib = calibration_for(name, model, entry, args.calib_samples, seed=args.seed + 12345)
    stats_data = collect(model, entry.make_scheduler(args.stats_scheduler), num_samples=args.stats_samples,
                         num_inference_steps=args.stats_steps, seed=args.seed + 777, sample_shape=entry.sample_shape,
                         eta=0.0 if args.stats_scheduler == "ddim" else None,
                         conditions=entry.conditions, uncond=entry.uncond, guidance_scale=entry.guidance_scale,
                         channels=entry.sample_shape[0], progress=False)
    print(f"{name}: calibration {len(calib)} batches, statistics {len(stats_data)} batches "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    json_path = RESULTS / f"ptqd_{short}.json"
    result: dict[str, Any] = {"model": short, "n": args.n, "guidance_scale": entry.guidance_scale, "rows": [],
                              "stats": {}, "bops": {}}
    if args.merge and json_path.exists():  # keep the rows of an earlier run that this one does not redo
        result = json.loads(json_path.read_text())
        result["bops"] = {k: v for k, v in result["bops"].items() if k not in SAMPLERS}  # an older layout
        result["plots"] = [f for f in result.get("plots", []) if (RESULTS / f).exists()]
    models: dict[str, Any] = {}
    cfg = stepq.PTQDConfig(guidance_scale=entry.guidance_scale, shrinkage=args.shrinkage, gate_z=args.gate_z,
                           bias_shrinkage=args.bias_shrinkage)
    for base in sorted({c[1] for c in _configs(args.configs)}):
        t1 = time.perf_counter()
        recipe = stepq.get_preset("w4a8" if base.startswith("mixed") else base)
        qm = stepq.quantize(model, calib[0], recipe, calibration=calib, progress=False)
        ptqd.apply(qm, model, stats_data, config=_config(cfg, base, None), scheduler=entry.scheduler)
        models[base] = qm
        result["stats"][base] = _stats_summary(qm)
        print(f"  built {base} + statistics in {time.perf_counter() - t1:.0f}s; "
              f"k mean {result['stats'][base]['k_mean']:.4f}, σ_q mean {result['stats'][base]['sigma_mean']:.4f}",
              flush=True)
    mps = {b: m.program.state.ptqd_bits for b, m in models.items() if b.startswith("mixed")}
    for base, mp in mps.items():
        costs = ptqd.layer_costs(models[base], calib[0])
        result["bops"][base] = {}
        for sampler, (kind, steps, _) in SAMPLERS.items():
            sched = entry.make_scheduler(kind)
            sched.set_timesteps(steps)
            ts = sched.timesteps
            b = ptqd.bit_operations(costs, mp.table, ts)
            b.update(share_a4=mp.share(ts), w4a8_saved_vs_w8a8=ptqd.bit_operations(costs, torch.full((1000,), 8), ts)
                     ["saved_vs_w8a8"], w4a4_saved_vs_w8a8=ptqd.bit_operations(costs, torch.full((1000,), 4), ts)
                     ["saved_vs_w8a8"])
            result["bops"][base][sampler] = b
            print(f"  {base} {sampler}: {100 * b['share_a4']:.0f}% of steps at A4, BOPs saved vs W8A8 "
                  f"{100 * b['saved_vs_w8a8']:.1f}% (W4A8 {100 * b['w4a8_saved_vs_w8a8']:.1f}%, W4A4 "
                  f"{100 * b['w4a4_saved_vs_w8a8']:.1f}%)", flush=True)
    if args.fd_noise_seeds:  # how much FD moves between seeds at this N (FP model, DDIM-20 η = 1)
        fds = [metrics.fd(zoo.generate(model, entry, args.n, num_inference_steps=20, scheduler="ddim", seed=s,
                                       eta=1.0)[0], test_x, classifier) for s in range(args.fd_noise_seeds)]
        result["fd_seed_std"] = {"sampler": "ddim20-eta1", "seeds": len(fds), "fd": fds,
                                 "std": float(torch.tensor(fds).std())}
    plots = _plots(short, dict(result["stats"]), mps, RESULTS)
    for base, qm in models.items():  # k_t and b̄_t with their uncertainty, the measured grid, the gated terms
        f = RESULTS / f"ptqd_{short}_{base}_k_bias_se.png"
        ptqd.plot_statistics(qm.program.state.ptqd, f, title=f"digits-{short} {base}: PTQD statistics")
        plots.append(f.name)
    result["plots"] = sorted(set(result.get("plots", [])) | set(plots))
    fp_images: dict[str, torch.Tensor] = {}
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    rows = [("fp32", "", None), *_configs(args.configs)]
    for sampler in args.samplers:
        kind, steps, eta = SAMPLERS[sampler]
        done: dict[tuple[str, tuple[bool, bool, bool] | None], dict[str, Any]] = {}
        for label, base, flags in rows:
            t1 = time.perf_counter()
            if base == "":
                denoiser, sched = model, entry.make_scheduler(kind)
            else:
                qm = ptqd.with_config(models[base], _config(cfg, base, flags or (False, False, False)))
                denoiser, sched = qm, ptqd.scheduler_for(qm, entry.make_scheduler(kind))
            # the variance schedule does nothing at η = 0: reuse the +BC samples
            key = (base, (flags[0], flags[1], flags[2] and eta != 0.0) if flags else flags)
            fp_file = cache / f"fp_{short}_{sampler}_n{args.n}_s{args.seed}.safetensors"
            if key in done:
                row = dict(done[key], config=label, reused=True)
            else:
                if base == "" and fp_file.exists():
                    saved = load_file(fp_file)
                    images, labels = saved["images"], saved.get("labels")
                else:
                    images, labels = zoo.generate(denoiser, entry, args.n, num_inference_steps=steps,
                                                  scheduler=sched, seed=args.seed, eta=eta)
                if base == "":
                    fp_images[sampler] = images
                    save_file({"images": images.contiguous()} | ({} if labels is None else {"labels": labels}),
                              str(fp_file))
                row = {"model": short, "config": label, "sampler": sampler,
                       "fd": metrics.fd(images, test_x, classifier),
                       "psnr_vs_fp": metrics.psnr(images, fp_images[sampler]) if base else None,
                       "accuracy": metrics.class_accuracy(images, labels, classifier) if labels is not None else None,
                       "sample_s": round(time.perf_counter() - t1, 1)}
                done[key] = row
            result["rows"] = [r for r in result["rows"] if (r["config"], r["sampler"]) != (label, sampler)] + [row]
            print(f"  {sampler:12s} {label:20s} FD {row['fd']:7.3f}  PSNR {_fmt(row['psnr_vs_fp'], '.2f'):>6s}  "
                  f"acc {_fmt(row['accuracy'], '.3f')}  ({row['sample_s']}s{' reused' if row.get('reused') else ''})",
                  flush=True)
            json_path.write_text(json.dumps(result, indent=1))
    return result


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def write_report(floor: float) -> Path:
    lines = ["# PTQD on the digits models", "",
             "Generated by `benchmarks/ptqd.py`. FD: Fréchet distance to the held-out digits in the digit "
             f"classifier's feature space (floor, train vs held-out: {floor:.3f}); PSNR: against the FP model's "
             "samples from the same seeds (dB). CNC: correlated-noise correction (÷(1+k_t)); BC: bias correction "
             "(−b_t); VSC: variance schedule (PTQDScheduler). At η = 0 VSC does nothing (rows reuse +BC).", ""]
    for path in sorted(RESULTS.glob("ptqd_*.json")):
        res = json.loads(path.read_text())
        short = res["model"]
        lines += [f"## digits-{short}", "", f"N = {res['n']} samples per row; guidance scale {res['guidance_scale']}."]
        if "fd_seed_std" in res:
            fs = res["fd_seed_std"]
            lines.append(f"FD of the FP model over {fs['seeds']} seeds ({fs['sampler']}): "
                         f"{', '.join(format(f, '.2f') for f in fs['fd'])} (std {fs['std']:.2f}); rows share seeds, so "
                         "differences between rows are paired, but differences below this spread are not conclusive.")
        lines.append("")
        with_acc = any(r.get("accuracy") is not None for r in res["rows"])
        samplers = list(dict.fromkeys(r["sampler"] for r in res["rows"]))
        configs = list(dict.fromkeys(r["config"] for r in res["rows"]))
        table = {(r["config"], r["sampler"]): r for r in res["rows"]}
        cols = ["FD", "PSNR", "acc"] if with_acc else ["FD", "PSNR"]
        lines.append("| config | " + " | ".join(f"{s} {c}" for s in samplers for c in cols) + " |")
        lines.append("|---|" + "---|" * (len(cols) * len(samplers)))
        for c in configs:
            cells = []
            for s in samplers:
                r = table.get((c, s))
                if r is None:
                    cells += ["-"] * len(cols)
                    continue
                cells += [_fmt(r["fd"], ".3f"), _fmt(r["psnr_vs_fp"], ".2f")]
                if with_acc:
                    cells.append(_fmt(r["accuracy"], ".3f"))
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        if res.get("bops"):
            lines += ["", "Mixed precision (W4; activations A4 or A8 per step; io / time-embedding layers stay W8A8; "
                      "`mixed`: SNR^Q > SNR^F, the paper's rule; `mixed-mM`: SNR^Q > M·SNR^F):", "",
                      "| config | sampler | steps at A4 | BOPs saved vs W8A8 | (W4A8: saved) | (W4A4: saved) | × vs FP32 |",
                      "|---|---|---|---|---|---|---|"]
            for base, per in res["bops"].items():
                for s, b in per.items():
                    lines.append(f"| {base} | {s} | {100 * b['share_a4']:.0f}% | {100 * b['saved_vs_w8a8']:.1f}% | "
                                 f"{100 * b['w4a8_saved_vs_w8a8']:.1f}% | {100 * b['w4a4_saved_vs_w8a8']:.1f}% | "
                                 f"{b['x_vs_fp32']:.1f}× |")
        lines += ["", "Statistics (measured on DDPM-100 FP trajectories; normality: scipy normaltest per measured "
                  "timestep, α = 0.01):", "",
                  "| model | mean k_t | max k_t | min raw slope | mean σ_q | mean abs b_t | normality rejected | "
                  "K² median | skew (p10/med/p90) | excess kurtosis (p10/med/p90) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for base, st in res["stats"].items():
            nm = st.get("normality", {})
            sk = nm.get("skew_p10_median_p90", [math.nan] * 3)
            ku = nm.get("excess_kurtosis_p10_median_p90", [math.nan] * 3)
            stat = nm.get("statistic_p10_median_p90", [math.nan] * 3)
            lines.append(f"| {base} | {st['k_mean']:.4f} | {st['k_max']:.4f} | {st['slope_min']:.4f} | "
                         f"{st['sigma_mean']:.4f} | {st['bias_abs_mean']:.4f} | "
                         f"{100 * nm.get('rejected_fraction', math.nan):.0f}% of {nm.get('timesteps', 0)} | "
                         f"{stat[1]:.1f} | {sk[0]:.2f} / {sk[1]:.2f} / {sk[2]:.2f} | "
                         f"{ku[0]:.2f} / {ku[1]:.2f} / {ku[2]:.2f} |")
        lines += [""] + [f"![{p}]({p})" for p in res.get("plots", [])] + [""]
    out = RESULTS / "ptqd.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    global RESULTS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["ddpm", "dit"], choices=["ddpm", "dit"])
    ap.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    ap.add_argument("--configs", nargs="*", default=[], help="config labels or bases (w4a8, w4a4, mixed, mixed-m10, mixed-m100); default all")
    ap.add_argument("--n", type=int, default=500, help="samples per row")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--stats-samples", type=int, default=32, help="FP trajectories the PTQD statistics are measured on")
    ap.add_argument("--stats-steps", type=int, default=100)
    ap.add_argument("--stats-scheduler", default="ddpm", choices=["ddpm", "ddim"],
                    help="sampler of the statistics' FP trajectories (ddim: η = 0)")
    ap.add_argument("--shrinkage", default="none", choices=["none", "kernel"], help="PTQDConfig.shrinkage")
    ap.add_argument("--gate-z", type=float, default=0.0, help="PTQDConfig.gate_z")
    ap.add_argument("--bias-shrinkage", default="none", choices=["none", "zero", "pooled"],
                    help="PTQDConfig.bias_shrinkage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fd-noise-seeds", type=int, default=0,
                    help="also sample the FP model with this many seeds to show FD's seed-to-seed spread")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--merge", action="store_true", help="merge into the model's existing JSON instead of replacing it")
    ap.add_argument("--cache-dir", default="/tmp/stepq_ptqd_cache", help="FP samples cached here between runs")
    ap.add_argument("--out", default="docs/results", help="directory of the JSON, the report and the plots")
    args = ap.parse_args(argv)
    RESULTS = Path(args.out)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    RESULTS.mkdir(parents=True, exist_ok=True)
    classifier = zoo.load("digits-classifier")
    train_x, _ = load_digits_images("train")
    test_x, _ = load_digits_images("test")
    floor = metrics.fd(train_x, test_x, classifier)
    if not args.report_only:
        for short in args.models:
            run_model(short, args, classifier, test_x)
    print(write_report(floor).read_text())


if __name__ == "__main__":
    main()
