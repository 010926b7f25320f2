"""stepq demo: quantize the shipped digits DDPM, sample from it, compare with the FP model.

The model is a diffusers UNet2DModel trained by stepq on scikit-learn's handwritten digits (16x16),
shipped in stepq/zoo. The demo

1. records calibration inputs along real DDIM trajectories of the FP model,
2. compiles it with stepq at W8A8, W4A8 and W4A8 + TDQ (timestep-dependent activation scales),
3. samples the same seeds from FP and each compiled model (DDIM, 20 steps),
4. prints FD (digit-classifier features, vs held-out real digits), PSNR against the FP samples and
   the weight bytes, one per-layer report, and writes a PNG grid (FP row, then each recipe's rows),
5. saves the W4A8 model (safetensors + JSON) and loads it back.

    python examples/demo.py [--n 250] [--out out/demo] [--fit-budget 90]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

import stepq
from stepq import metrics, zoo
from stepq.calibration import collect
from stepq.data import load_digits_images

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=250, help="samples per model")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--fit-budget", type=float, default=90.0, help="seconds for the TDQ step-size fit")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    model = zoo.load("digits-ddpm")
    entry = zoo.entry("digits-ddpm")
    classifier = zoo.load("digits-classifier")
    test_x, _ = load_digits_images("test")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"digits-ddpm: diffusers UNet2DModel, {n_params / 1e6:.2f}M parameters, 16x16 digits")

    t0 = time.perf_counter()
    calib = collect(model, entry.make_scheduler("ddim"), num_samples=16, num_inference_steps=50, seed=1234,
                    eta=0.0, progress=False)
    print(f"calibration: {len(calib)} denoiser calls along 16 DDIM-50 trajectories ({time.perf_counter() - t0:.1f}s)")

    models: dict[str, tuple[object, int]] = {"fp32": (model, n_params * 4)}
    tdq = stepq.get_preset("w4a8-tdq")
    tdq = tdq.replace(tdq=tdq.tdq.replace(time_budget_s=args.fit_budget))  # the PTQ fit is the slow step
    for recipe in ("w8a8", "w4a8", tdq):
        t0 = time.perf_counter()
        qm = stepq.quantize(model, calib[0], recipe, calibration=calib, progress=False)
        models[f"stepq {qm.recipe.name}"] = (qm, qm.weight_bytes())
        print(f"compiled {qm.recipe.name} in {time.perf_counter() - t0:.1f}s")

    rows, grids = [], []
    fp_images = None
    for name, (m, nbytes) in models.items():
        t0 = time.perf_counter()
        images, _ = zoo.generate(m, entry, args.n, num_inference_steps=args.steps, scheduler="ddim", seed=0, eta=0.0)
        if fp_images is None:
            fp_images = images
        rows.append((name, metrics.fd(images, test_x, classifier),
                     None if name == "fp32" else metrics.psnr(images, fp_images), nbytes, time.perf_counter() - t0))
        grids.append(images[:20])

    print(f"\n{args.n} samples each, DDIM {args.steps} steps, same seeds")
    print(f"{'model':18s} {'FD (lower=better)':>18s} {'PSNR vs FP':>11s} {'weights':>10s} {'sampling':>9s}")
    for name, fd, psnr, nbytes, secs in rows:
        psnr_s = "-" if psnr is None else f"{psnr:.2f} dB"
        print(f"{name:18s} {fd:18.3f} {psnr_s:>11s} {nbytes / 1e6:8.2f}MB {secs:8.1f}s")
    print(f"(floor: FD of real train vs held-out digits = {metrics.fd(load_digits_images('train')[0], test_x, classifier):.3f})")

    qm = models["stepq w4a8"][0]
    print()
    qm.report()
    grid = out / "samples.png"
    metrics.save_grid(torch.cat(grids), grid, nrow=20)
    print(f"\nsample grid (rows: {', '.join(models)}): {grid}")

    path = out / "digits-ddpm-w4a8"
    qm.save(path)
    loaded = stepq.load(path)
    x = calib[10]
    same = torch.equal(loaded(**x)[0], qm(**x)[0])
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"saved {path} ({size / 1e6:.2f} MB, safetensors + JSON); reloaded model matches bit for bit: {same}")


if __name__ == "__main__":
    main()
