"""Which PTQD term hurts when the statistics come from another sampler, and does the new estimator help?

digits UNet (``digits-ddpm``), W4A8 (the quality benchmark's calibration: 32 DDIM-50 trajectories).
PTQD's statistics are fitted on FP trajectories of DDIM-20 (η = 0, ``--fit-samples`` of them, the
"calibration" sampler of the measured problem) and, for reference, of DDPM-100 with other seeds
(the sampler the images are drawn with). They are scored on held-out DDPM-100 FP trajectories
(other seeds): at every recorded step the FP ε and the W4A8 ε̂ on the same input, and

    relative MSE = Σ ‖y − ε‖² / Σ ‖ε‖²,      y = (ε̂ − b_t)/(1 + k_t)      (correct_noise's formula)

for no correction, k only, b only, k + b, under the plain per-timestep estimator and the new ones
(kernel shrinkage, bias shrinkage toward 0, the gate). Also per band of t. The variance schedule
(σ_q) does not enter a prediction's MSE; it is reported as the mean σ_q on the held-out steps.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/ptqd_transfer.py       # writes docs/results/ptqd_transfer.{json,md}

``--trajectories N`` instead samples N DDPM-100 images per configuration from the same seeds
(FP; W4A8 with none, +k, +k+b, +k+b+variance schedule, each under the plain and the new
estimator, statistics fitted on the DDIM-20 trajectories through ``stepq.ptqd.apply``) and reports
PSNR and MSE against the FP images: the whole sampler, variance schedule included
(docs/results/ptqd_transfer_trajectories.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import stepq
from stepq import metrics, ptqd, zoo
from stepq.calibration import collect
from stepq.methods.ptqd import ErrorAccumulator, Estimator, PTQDStats, predictions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import calibration_for

warnings.filterwarnings("ignore")

ESTIMATORS: dict[str, Estimator] = {
    "plain": Estimator(),
    "kernel": Estimator(shrinkage="kernel"),
    "gate2": Estimator(gate_z=2.0),
    "bias-js": Estimator(bias_shrinkage="zero"),
    "kernel+gate2": Estimator(shrinkage="kernel", gate_z=2.0),
    "kernel+bias-js+gate2": Estimator(shrinkage="kernel", bias_shrinkage="zero", gate_z=2.0),
}
TERMS = {"none": (False, False), "k": (True, False), "b": (False, True), "k+b": (True, True)}
BANDS = ((0, 100), (100, 300), (300, 600), (600, 1000))


def _pairs(model: Any, qm: Any, data: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    items = list(data)
    eps = predictions(model, items, channels=1)
    eps_hat = predictions(qm, items, channels=1)
    t = [torch.as_tensor(it["timestep"]).reshape(-1).long().expand(e.shape[0]) for it, e in zip(items, eps)]
    return torch.cat(t), torch.cat(eps).double(), torch.cat(eps_hat).double()


def _accumulate(t: torch.Tensor, eps: torch.Tensor, eps_hat: torch.Tensor) -> ErrorAccumulator:
    acc = ErrorAccumulator(1000, eps.shape[1], normality_samples=None)
    for i in range(0, t.numel(), 64):
        acc.add(t[i:i + 64], eps[i:i + 64], eps_hat[i:i + 64])
    return acc


def _score(st: PTQDStats, terms: tuple[bool, bool], t: torch.Tensor, eps: torch.Tensor,
           eps_hat: torch.Tensor) -> dict[str, float]:
    k = st.k.double()[t] if terms[0] else torch.zeros(t.numel(), dtype=torch.float64)
    b = st.bias.double()[t] if terms[1] else torch.zeros(t.numel(), eps.shape[1], dtype=torch.float64)
    y = (eps_hat - b[:, :, None, None]) / (1 + k[:, None, None, None])
    err, ref = ((y - eps) ** 2).flatten(1).sum(1), (eps**2).flatten(1).sum(1)
    out = {"all": float(err.sum() / ref.sum())}
    for lo, hi in BANDS:
        m = (t >= lo) & (t < hi)
        out[f"t{lo}-{hi}"] = float(err[m].sum() / ref[m].sum()) if bool(m.any()) else float("nan")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--fit-samples", type=int, default=32, help="FP trajectories the statistics are fitted on")
    ap.add_argument("--test-samples", type=int, default=16, help="held-out DDPM-100 FP trajectories")
    ap.add_argument("--recipe", default="w4a8")
    ap.add_argument("--out", default="docs/results/ptqd_transfer")
    ap.add_argument("--trajectories", type=int, default=0, help="sample this many DDPM-100 images per config instead")
    args = ap.parse_args(argv)
    if args.trajectories:
        return trajectories(args)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    name = "digits-ddpm"
    model, entry = zoo.load(name), zoo.entry(name)
    calib = calibration_for(name, model, entry, args.calib_samples, seed=12345)
    qm = stepq.quantize(model, calib[0], args.recipe, calibration=calib, progress=False)
    kw: dict[str, Any] = dict(sample_shape=entry.sample_shape, channels=1, progress=False)
    fits = {
        "ddim20": collect(model, entry.make_scheduler("ddim"), num_samples=args.fit_samples, num_inference_steps=20,
                          seed=777, eta=0.0, **kw),
        "ddpm100": collect(model, entry.make_scheduler("ddpm"), num_samples=args.fit_samples,
                           num_inference_steps=100, seed=778, **kw),
    }
    test = collect(model, entry.make_scheduler("ddpm"), num_samples=args.test_samples, num_inference_steps=100,
                   seed=999, **kw)
    tt, te, teh = _pairs(model, qm, test)
    print(f"data and {args.recipe} model in {time.perf_counter() - t0:.0f}s", flush=True)
    result: dict[str, Any] = {"model": name, "recipe": args.recipe, "fit_samples": args.fit_samples,
                              "test_samples": args.test_samples, "rows": []}
    for fit_name, data in fits.items():
        acc = _accumulate(*_pairs(model, qm, data))
        for est_name, est in ESTIMATORS.items():
            st = acc.finalize(normality=False, estimator=est)
            v = st.visited
            gated_k = float(st.k_gated[v].double().mean()) if st.k_gated is not None else 0.0
            gated_b = float(st.bias_gated[v].double().mean()) if st.bias_gated is not None else 0.0
            for term, flags in TERMS.items():
                if term == "none" and est_name != "plain":
                    continue
                row = {"fit": fit_name, "estimator": est_name, "terms": term,
                       "rel_mse": _score(st, flags, tt, te, teh), "k_gated": gated_k, "b_gated": gated_b,
                       "sigma_mean_test": float(st.sigma[tt].mean()), "k_mean_test": float(st.k[tt].mean()),
                       "b_mean_test": float(st.bias[tt].mean()),
                       "k_se_median": float(st.k_se[v].median()) if st.k_se is not None else None,
                       "b_se_median": float(st.bias_se[v].median()) if st.bias_se is not None else None}
                result["rows"].append(row)
                print(f"  fit {fit_name:8s} {est_name:22s} {term:5s} relMSE {row['rel_mse']['all']:.6f}  "
                      + "  ".join(f"{b} {row['rel_mse'][b]:.5f}" for b in row["rel_mse"] if b != "all")
                      + f"  gated k {gated_k:.2f} b {gated_b:.2f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    write_md(result, out.with_suffix(".md"))
    print(f"done in {time.perf_counter() - t0:.0f}s", flush=True)
    return result


FLAGS = {"none": (False, False, False), "+k": (True, False, False), "+k+b": (True, True, False),
         "+k+b+var": (True, True, True)}
NEW = {"shrinkage": "kernel", "bias_shrinkage": "zero", "gate_z": 2.0}


def trajectories(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    name = "digits-ddpm"
    model, entry = zoo.load(name), zoo.entry(name)
    calib = calibration_for(name, model, entry, args.calib_samples, seed=12345)
    fit = collect(model, entry.make_scheduler("ddim"), num_samples=args.fit_samples, num_inference_steps=20, seed=777,
                  eta=0.0, sample_shape=entry.sample_shape, channels=1, progress=False)
    n, seed = args.trajectories, 4242
    fp, _ = zoo.generate(model, entry, n, num_inference_steps=100, scheduler="ddpm", seed=seed)
    result: dict[str, Any] = {"model": name, "recipe": args.recipe, "n": n, "fit": "ddim20", "rows": []}
    for est_name, est in (("plain", {}), ("kernel+bias-js+gate2", NEW)):
        qm = stepq.quantize(model, calib[0], args.recipe, calibration=calib, progress=False)
        ptqd.apply(qm, model, fit, config=stepq.PTQDConfig(**est))  # type: ignore[arg-type]
        for label, (c, b, v) in FLAGS.items():
            if label == "none" and est_name != "plain":
                continue
            q = ptqd.with_config(qm, qm.recipe.ptqd.replace(correlated=c, bias=b, variance=v))
            images, _ = zoo.generate(q, entry, n, num_inference_steps=100, seed=seed,
                                     scheduler=ptqd.scheduler_for(q, entry.make_scheduler("ddpm")))
            row = {"estimator": est_name, "config": label, "psnr_vs_fp": metrics.psnr(images, fp),
                   "mse_vs_fp": float(((images - fp) ** 2).mean())}
            result["rows"].append(row)
            print(f"  {est_name:22s} {label:10s} PSNR {row['psnr_vs_fp']:.3f} dB  MSE {row['mse_vs_fp']:.6f}  "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    out = Path(args.out + "_trajectories.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


def write_md(result: dict[str, Any], path: Path) -> None:
    bands = [f"t{lo}-{hi}" for lo, hi in BANDS]
    lines = ["# PTQD statistics that transfer: which term hurts", "",
             f"Generated by `benchmarks/ptqd_transfer.py`. {result['model']}, {result['recipe']}; statistics fitted on "
             f"{result['fit_samples']} FP trajectories of the `fit` sampler, scored on {result['test_samples']} held-out "
             "DDPM-100 FP trajectories: relative MSE Σ‖y − ε‖²/Σ‖ε‖² of the corrected prediction "
             "y = (ε̂ − b_t)/(1 + k_t) against FP (lower is better), overall and per band of t.", "",
             "| fit | estimator | terms | rel. MSE | " + " | ".join(bands) + " | k gated | b gated |",
             "|---|---|---|---|" + "---|" * len(bands) + "---|---|"]
    for r in result["rows"]:
        m = r["rel_mse"]
        lines.append(f"| {r['fit']} | {r['estimator']} | {r['terms']} | {m['all']:.6f} | "
                     + " | ".join(f"{m[b]:.5f}" for b in bands) + f" | {r['k_gated']:.2f} | {r['b_gated']:.2f} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
