"""TerDiT on the digits DiT: ternary QAT with and without the inserted RMSNorm, from the FP checkpoint
and from scratch, beside FP and W4 / W2 weight-only PTQ; FD, class accuracy, PSNR vs FP, bits per
weight, artefact / ONNX bytes, ORT latency, loss curves and adaLN modulation magnitudes.

    python benchmarks/terdit.py train --configs ckpt-rmsnorm ckpt-no-rmsnorm      # QAT runs (saved)
    python benchmarks/terdit.py eval --samplers ddim20 --n 1000                   # sample and score
    python benchmarks/terdit.py report                                            # tables + plots

``train`` keeps every trained model as a stepq artefact under ``--work`` (default /tmp/terdit_work)
with its loss curve; ``eval`` scores them (and FP, W4, W2 PTQ) and merges rows into
``docs/results/terdit.json``; ``report`` writes ``docs/results/terdit.md`` and the plots. Every
script run uses one thread (the machine is shared) and fixed seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import stepq
from stepq import zoo
from stepq.calibration.samplers import default_make_inputs
from stepq.data import load_digits_images
from stepq.methods.qat import denoising_batches
from stepq.recipe.presets import TERNARY_BLOCKS, ternary_recipe, weight_spec

warnings.filterwarnings("ignore")

RESULTS = Path("docs/results/terdit")
#: name: (preset, from scratch?, lr)
TRAINED: dict[str, tuple[str, bool, float]] = {
    "ckpt-rmsnorm": ("ternary-dit", False, 2e-4),
    "ckpt-no-rmsnorm": ("ternary-dit-no-rmsnorm", False, 2e-4),
    "scratch-rmsnorm": ("ternary-dit", True, 5e-4),
    "scratch-no-rmsnorm": ("ternary-dit-no-rmsnorm", True, 5e-4),
}
SAMPLERS = {"ddim20": ("ddim", 20, 0.0), "ddpm100": ("ddpm", 100, None)}


def weight_only_recipe(bits: int) -> stepq.Recipe:
    """W{bits} weight-only PTQ of the same layers TerDiT makes ternary (per-channel, MSE search)."""
    base = ternary_recipe(f"w{bits}-weight-only")
    rules = tuple(dataclasses.replace(r, spec=stepq.LayerSpec(weight=weight_spec(bits)), name=f"block-linears-w{bits}")
                  if r.pattern == TERNARY_BLOCKS else r for r in base.rules)
    return base.replace(rules=rules, qat=None, terdit=None)


def example(model: torch.nn.Module) -> dict[str, Any]:
    return default_make_inputs(model)(torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)),
                                      torch.tensor([500, 500]), {"class_labels": torch.tensor([1, 2])})


def batches(model: torch.nn.Module, entry: zoo.ZooEntry, batch_size: int, seed: int):
    x0, y = load_digits_images("train")
    return denoising_batches(x0, entry.scheduler, default_make_inputs(model), batch_size=batch_size,
                             cond={"class_labels": y}, cond_dropout=("class_labels", entry.null_class, 0.1), seed=seed)


def fp_model(scratch: bool) -> torch.nn.Module:
    if not scratch:
        return zoo.load("digits-dit")
    cfg = zoo.read_config("digits-dit")
    torch.manual_seed(0)
    return zoo.build_model(cfg["class"], cfg["config"]).eval()


def train(name: str, steps: int, work: Path) -> None:
    preset, scratch, lr = TRAINED[name]
    entry = zoo.entry("digits-dit")
    model = fp_model(scratch)
    recipe = stepq.get_preset(preset)
    recipe = recipe.replace(qat=dataclasses.replace(recipe.qat, steps=steps, lr=lr))
    t0 = time.perf_counter()
    qm = stepq.quantize(model, example(model), recipe, train_data=batches(model, entry, recipe.qat.batch_size, 0),
                        progress=True)
    wall = time.perf_counter() - t0
    out = work / name
    qm.save(str(out))
    (work / f"{name}.json").write_text(json.dumps({"name": name, "preset": preset, "scratch": scratch, "lr": lr,
                                                   "steps": steps, "wall_s": wall,
                                                   "curve": qm.program.state.qat_curve}))
    curve = qm.program.state.qat_curve or []
    print(f"{name}: {steps} steps in {wall:.0f}s; loss (mean of last 50) {sum(curve[-50:]) / max(1, len(curve[-50:])):.4f}",
          flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--configs", nargs="+", default=list(TRAINED), choices=list(TRAINED))
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--work", default="/tmp/terdit_work")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.cmd == "train":
        for name in args.configs:
            train(name, args.steps, work)


if __name__ == "__main__":
    main()
