"""EfficientDM on the digits models: quality rows, the ablation, the cost of training, plots.

1. ``table``: FD / class accuracy / PSNR vs FP / weight bytes (benchmarks/quality.py rows, N samples,
   the same calibration as every other row) for QALoRA + TALSQ at W4A4, W4A8 and W2A8 and the
   ablation PTQ → +QALoRA → +scale-aware learning rate → +TALSQ at W4A4.
2. ``cost``: the two trainings side by side, each in its own process (peak RSS is per process):
   LSQ + TDQ QAT (``w4a4-tdq-qat``, 500 steps of batch 64 on the training set) and QALoRA + TALSQ
   distillation (``w4a4-qalora``); wall time of the training phase and peak RSS of the process.
   Each process also saves its loss curve and its activation step tables.
3. ``plots``: the distillation loss curve; the learned activation step vs timestep of a few layers,
   TALSQ beside TDQ (from the ``cost`` runs).

    python benchmarks/efficientdm.py --parts table --models dit --n 1000
    python benchmarks/efficientdm.py --parts cost plots --models dit ddpm

Writes docs/results/efficientdm.md/.json (quality rows), efficientdm_cost.json, efficientdm_*.png.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from safetensors.torch import load_file, save_file

import stepq
from stepq import zoo

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality

warnings.filterwarnings("ignore")
OUT = Path("docs/results")

#: the ablation of the paper's Table 3, at W4A4: each row adds one thing
ABLATION = {
    "stepq w4a4 (static PTQ)": "w4a4",
    "QALoRA, one LoRA lr (w4a4-qalora-no-talsq, scale_aware=False)": ("w4a4-qalora-no-talsq", {"scale_aware": False}),
    "QALoRA + scale-aware lr (w4a4-qalora-no-talsq)": "w4a4-qalora-no-talsq",
    "QALoRA + scale-aware lr + TALSQ (w4a4-qalora)": "w4a4-qalora",
}
BITS = ["w4a4-qalora", "w4a8-qalora", "w2a8-qalora"]
#: variant rows, run only when named in --configs: a longer distillation (how far more steps close the
#: gap to QAT) and the update order / LoRA rate of docs/EFFICIENTDM.md's diagnosis
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "QALoRA + TALSQ, 1600 steps (w4a4-qalora, steps=1600)": ("w4a4-qalora", {"steps": 1600}),
    **{f"{p} {o} lr {lr}": (p, {"order": o, "lora_lr": lr})
       for p in [*BITS, "w4a4-qalora-no-talsq"] for o in ("trajectory", "shuffled") for lr in (0.1, 0.02)},
    "w4a4-qalora-no-talsq shuffled lr 0.1 one rate": ("w4a4-qalora-no-talsq",
                                                     {"order": "shuffled", "lora_lr": 0.1, "scale_aware": False}),
}


def _recipe(spec: str | tuple[str, dict[str, Any]]) -> stepq.Recipe:
    if isinstance(spec, str):
        return stepq.get_preset(spec)
    name, changes = spec
    r = stepq.get_preset(name)
    tag = "-".join(f"{k.replace('_', '-')}-{v}" for k, v in changes.items())
    return r.replace(name=f"{name}-{tag}", qalora=r.qalora.replace(**changes))  # type: ignore[union-attr]


def part_table(n: int, models: list[str], samplers: list[str], configs: list[str]) -> None:
    rows = []
    for label, spec in ABLATION.items():
        if isinstance(spec, tuple):
            quality.ROWS[label] = quality.stepq_row(_recipe(spec))
            rows.append(label)
        else:
            rows.append(f"stepq {spec}")
    rows += [f"stepq {b}" for b in BITS]
    for label, spec in VARIANTS.items():
        if label in configs:
            quality.ROWS[label] = quality.stepq_row(_recipe(spec))
            rows.append(label)
    rows = [r for r in dict.fromkeys(rows) if not configs or r in configs or r.removeprefix("stepq ") in configs]
    quality.main(["--models", *models, "--configs", "fp32", *rows, "--samplers", *samplers, "--n", str(n),
                  "--out", str(OUT / "efficientdm"), "--grids", str(OUT / "grids_efficientdm"), "--merge"])


# -- cost: one training per process --------------------------------------------------------------------------


def _train_one(model_name: str, preset: str, out: Path) -> None:
    """In a fresh process: calibrate as benchmarks/quality.py does, then train ``preset``; writes the
    training phase's wall time, the process's peak RSS, the loss curve and the step tables."""
    torch.manual_seed(0)
    model, entry = zoo.load(model_name), zoo.entry(model_name)
    calib = quality.calibration_for(model_name, model, entry, 32, seed=12345)
    recipe = stepq.get_preset(preset)
    prog = stepq.capture(model, calib[0])
    prog = stepq.prepare(prog, recipe, inplace=True)
    stepq.calibrate(prog, calib, progress=False)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if recipe.qat is not None:
        ctx = quality.Context(model_name, model, entry, calib, calib[0], Path("/tmp"))
        stepq.train(prog, quality.train_batches(ctx, recipe.qat.batch_size, recipe.qat.seed), progress=False)
        curve = prog.state.qat_curve
    else:
        stepq.train(prog, fp_model=model, sampling=calib.sampling, progress=False)
        curve = prog.state.distill_curve
    train_s = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)  # robust to other load on the machine
    qm = stepq.convert(prog, inplace=True)
    tables = {k: v.scale for k, v in qm.program.state.timestep_tables.items()}
    save_file({k: v.contiguous() for k, v in tables.items()}, str(out.with_suffix(".safetensors")))
    out.write_text(json.dumps({
        "model": model_name, "preset": preset, "train_s": round(train_s, 1), "train_cpu_s": round(cpu_s, 1),
        "steps": len(curve or []),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_train_mb": round(rss_before / 1024, 1), "curve": curve,
        "threads": torch.get_num_threads()}))


def part_cost(models: list[str], presets: list[str]) -> list[dict[str, Any]]:
    results = []
    for short in models:
        for preset in presets:
            out = Path(f"/tmp/stepq_efficientdm_cost_{short}_{preset}.json")
            cmd = [sys.executable, __file__, "--train-one", f"digits-{short}", preset, str(out)]
            subprocess.run(cmd, check=True)
            r = json.loads(out.read_text())
            print(f"{short} {preset}: train {r['train_s']} s wall, {r['train_cpu_s']} CPU-s ({r['steps']} steps), "
                  f"peak RSS {r['peak_rss_mb']} MB",
                  flush=True)
            results.append(r)
    path = OUT / "efficientdm_cost.json"
    old = json.loads(path.read_text()) if path.exists() else []
    keep = [r for r in old if (r["model"], r["preset"]) not in {(x["model"], x["preset"]) for x in results}]
    path.write_text(json.dumps(keep + results, indent=1))
    return keep + results


def part_plots(models: list[str]) -> None:
    cost = json.loads((OUT / "efficientdm_cost.json").read_text())
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, short in zip(axes[0], models, strict=True):
        for r in cost:
            if r["model"] == f"digits-{short}" and r["preset"] == "w4a4-qalora":
                c = torch.tensor(r["curve"])
                k = 20
                smooth = torch.nn.functional.avg_pool1d(c[None, None], k, 1).reshape(-1) if len(c) > k else c
                ax.plot(c.numpy(), alpha=0.3, label="per step")
                ax.plot(range(k - 1, k - 1 + len(smooth)), smooth.numpy(), label=f"mean of {k}")
        ax.set(title=f"digits-{short}: QALoRA + TALSQ distillation (W4A4)", xlabel="optimiser step (= denoising step)",
               ylabel="MSE(ε_q, ε_FP)", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "efficientdm_loss.png", dpi=120)
    fig, axes = plt.subplots(len(models), 3, figsize=(15, 3.5 * len(models)), squeeze=False)
    for row, short in zip(axes, models, strict=True):
        talsq = _tables(short, "w4a4-qalora")
        tdq = _tables(short, "w4a4-tdq-qat")
        if not talsq or not tdq:
            continue
        common = [k for k in talsq if k in tdq]
        picks = [common[i] for i in (len(common) // 5, len(common) // 2, 4 * len(common) // 5)]
        for ax, name in zip(row, picks, strict=True):
            ax.plot(talsq[name].numpy(), label="TALSQ (EfficientDM, interpolated)")
            ax.plot(tdq[name].numpy(), label="TDQ (LSQ + TDQ QAT)")
            ax.set(title=f"{short}: {name}"[:60], xlabel="training timestep t", ylabel="activation step")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "efficientdm_steps.png", dpi=120)
    print("wrote", OUT / "efficientdm_loss.png", OUT / "efficientdm_steps.png")


def _tables(short: str, preset: str) -> dict[str, torch.Tensor]:
    p = Path(f"/tmp/stepq_efficientdm_cost_{short}_{preset}.safetensors")
    return load_file(str(p)) if p.exists() else {}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["table", "cost", "plots"], choices=["table", "cost", "plots"])
    ap.add_argument("--models", nargs="+", default=["ddpm", "dit"], choices=["ddpm", "dit"])
    ap.add_argument("--samplers", nargs="+", default=["ddim20"], choices=list(quality.SAMPLERS))
    ap.add_argument("--configs", nargs="*", default=[], help="table rows to run (default: all)")
    ap.add_argument("--cost-presets", nargs="+", default=["w4a4-tdq-qat", "w4a4-qalora"])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-one", nargs=3, metavar=("MODEL", "PRESET", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.train_one:
        _train_one(args.train_one[0], args.train_one[1], Path(args.train_one[2]))
        return
    if "table" in args.parts:
        part_table(args.n, args.models, args.samplers, args.configs)
    if "cost" in args.parts:
        part_cost(args.models, args.cost_presets)
    if "plots" in args.parts:
        part_plots(args.models)


if __name__ == "__main__":
    main()
