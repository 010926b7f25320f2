"""TDQ on the digits models: quality table, step-count generalisation, overhead, plots.

1. ``table``: FD / PSNR vs FP / class accuracy for static scales vs a free per-step table vs TDQ at
   W8A8, W8A4, W4A8 and W4A4 (PTQ), and LSQ vs LSQ + TDQ (QAT) at W4A4 (benchmarks/quality.py rows).
2. ``steps``: calibrate or train once, sample DDIM at 100, 50, 20 and 10 steps: FD of FP, static, TDQ.
3. ``overhead``: latency of a TDQ model (gathers from tables) vs the static model in the reference
   backend, median of interleaved runs, as a ratio.
4. ``plots``: activation step size vs timestep for several layers; the fraction of quantized layers
   whose activation range (max − min per timestep, from the calibration observers) correlates with t
   (|Pearson r| > 0.5 and > 0.7), on both models.

    python benchmarks/tdq.py [--parts table steps overhead plots] [--n 1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import stepq
from stepq import zoo

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality

warnings.filterwarnings("ignore")
OUT = Path("docs/results")


def part_table(n: int, models: list[str], bits: list[str], samplers: list[str], qat: bool) -> None:
    configs = ["fp32"]
    for b in bits:
        configs += [f"stepq {b}", f"stepq {b}-steptable", f"stepq {b}-tdq"]
    if qat:
        configs += ["stepq w4a4-qat", "stepq w4a4-tdq-qat"]
    quality.main(["--models", *models, "--configs", *configs, "--samplers", *samplers, "--n", str(n),
                  "--out", str(OUT / "tdq_table"), "--grids", str(OUT / "grids_tdq"), "--merge"])


STEP_CONFIGS = ["fp32", "stepq w4a4", "stepq w4a4-tdq", "stepq w4a4-qat", "stepq w4a4-tdq-qat"]


def part_steps(n: int, models: list[str], configs: list[str] | None = None) -> None:
    """Calibrate or train once per configuration, then sample DDIM at 100, 50, 20 and 10 steps."""
    quality.main(["--models", *models, "--configs", *(configs or STEP_CONFIGS), "--samplers", "ddim100", "ddim50",
                  "ddim20", "ddim10", "--n", str(n), "--out", str(OUT / "tdq_steps"),
                  "--grids", str(OUT / "grids_tdq_steps"), "--merge"])


def _calibrated(name: str, recipe: str) -> tuple[Any, Any, stepq.QuantizedModel]:
    model, entry = zoo.load(name), zoo.entry(name)
    calib = quality.calibration_for(name, model, entry, 32, seed=12345)
    return model, calib, stepq.quantize(model, calib[0], recipe, calibration=calib, progress=False)


def part_overhead(models: list[str], repeats: int = 60) -> dict[str, Any]:
    torch.set_num_threads(2)
    result = {}
    for short in models:
        name = f"digits-{short}"
        model, entry = zoo.load(name), zoo.entry(name)
        calib = quality.calibration_for(name, model, entry, 16, seed=12345)
        static = stepq.quantize(model, calib[0], "w8a8", calibration=calib, progress=False)
        recipe = stepq.get_preset("w8a8-tdq")
        recipe = recipe.replace(tdq=recipe.tdq.__class__(fit_steps=20))
        tdq = stepq.quantize(model, calib[0], recipe, calibration=calib, progress=False)
        x = calib[len(calib) // 2]
        times: dict[str, list[float]] = {"static": [], "tdq": []}
        with torch.no_grad():
            for _ in range(5):
                static(**x), tdq(**x)
            for _ in range(repeats):  # interleaved
                for key, m in (("static", static), ("tdq", tdq)):
                    t0 = time.perf_counter()
                    m(**x)
                    times[key].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        result[short] = {"batch": int(next(iter(x.values())).shape[0]), "repeats": repeats,
                         "tdq_over_static": med["tdq"] / med["static"],
                         "gathers": sum(1 for n in tdq.gm.graph.nodes if n.target is torch.ops.aten.index.Tensor)}
        print(f"{name}: TDQ / static latency (median of {repeats} interleaved runs, batch {result[short]['batch']}): "
              f"{result[short]['tdq_over_static']:.3f}", flush=True)
    (OUT / "tdq_overhead.json").write_text(json.dumps(result, indent=1))
    return result


def part_plots(models: list[str]) -> dict[str, Any]:
    from scipy.stats import pearsonr

    result = {}
    for short in models:
        name = f"digits-{short}"
        _, _, qm = _calibrated(name, "w4a4-tdq")
        tables = qm.program.state.timestep_tables
        stats = qm.program.state.activation_stats  # the calibration observers, per timestep
        rs = []
        for st in stats.values():
            ts = st.visited
            rng = (st.max[ts] - st.min[ts]).double()
            if ts.numel() > 2 and float(rng.std()) > 0:
                rs.append(abs(float(pearsonr(ts.double().numpy(), rng.numpy()).statistic)))
        frac = {"abs_r_gt_0.5": sum(r > 0.5 for r in rs) / len(rs), "abs_r_gt_0.7": sum(r > 0.7 for r in rs) / len(rs),
                "layers": len(rs)}
        result[short] = frac
        print(f"{name}: {frac['layers']} quantized activations; |r(t, range)| > 0.5: {frac['abs_r_gt_0.5']:.1%}, "
              f"> 0.7: {frac['abs_r_gt_0.7']:.1%}", flush=True)
        # step size vs t for the layers whose TDQ table varies most
        spread = sorted(tables.items(), key=lambda kv: float(kv[1].scale.max() / kv[1].scale.min()), reverse=True)
        fig, ax = plt.subplots(figsize=(7, 4))
        for q, tab in spread[:6]:
            ax.plot(tab.scale.numpy() / float(tab.scale.mean()), label=q, lw=1)
        ax.set_xlabel("training timestep t")
        ax.set_ylabel("step size s(t) / mean")
        ax.set_title(f"{name}: TDQ step sizes (W4A4), most time-varying layers")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(OUT / f"tdq_scales_{short}.png", dpi=120)
        plt.close(fig)
    (OUT / "tdq_correlation.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["plots", "overhead", "table", "steps"],
                    choices=["table", "steps", "overhead", "plots"])
    ap.add_argument("--models", nargs="+", default=["ddpm", "dit"], choices=["ddpm", "dit"])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--bits", nargs="+", default=["w8a8", "w8a4", "w4a8", "w4a4"], help="table: the bit-widths")
    ap.add_argument("--samplers", nargs="+", default=["ddim20", "ddpm100"], help="table: the samplers")
    ap.add_argument("--no-qat", action="store_true", help="table: leave out the QAT rows")
    ap.add_argument("--configs", nargs="+", default=None, help=f"steps: the rows (default {STEP_CONFIGS})")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for part in args.parts:
        {"table": lambda: part_table(args.n, args.models, args.bits, args.samplers, not args.no_qat), "steps": lambda: part_steps(args.n, args.models, args.configs),
         "overhead": lambda: part_overhead(args.models), "plots": lambda: part_plots(args.models)}[part]()


if __name__ == "__main__":
    main()
