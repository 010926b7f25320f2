"""stepq demo: the shipped digits DiT at W8A8, at W4A4 with static steps and with TDQ, and in ONNX Runtime.

The model is a diffusers DiTTransformer2DModel (class-conditional, classifier-free guidance 1.5)
trained by stepq on scikit-learn's handwritten digits (16x16), shipped in stepq.zoo. The demo

1. records calibration inputs along real DDIM-20 trajectories of the FP model;
2. compiles it at W8A8, and at W4A4 twice from one calibrated program: converted as calibrated
   (static activation steps: TDQ's step generators start exactly at them) and after the TDQ fit
   (timestep-dependent steps, a fixed number of Adam steps: deterministic, no wall-clock budget);
3. samples the same seeds from FP and each compiled model (DDIM 20 steps) and prints FD (digit
   classifier features vs held-out real digits), class accuracy and PSNR against FP, beside the
   figures measured at N = 1000 in docs/RESULTS.md;
4. exports the W8A8 model to ONNX, counts the integer kernels ONNX Runtime runs, and times it
   against the FP32 ONNX export of the same model, in this run;
5. writes the sample grid, TDQ's step-vs-timestep and per-layer SQNR plots into --out.

Nothing is written outside --out. Every default is a step count, so two runs print the same
quality figures (timings vary with the machine).

    python examples/demo.py [--n 100] [--fit-steps 100] [--calib-samples 16] [--threads T] [--out out/demo]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from stepq.console import quiet_third_party

quiet_third_party()  # before diffusers / torchao print their import-time notes; stepq's warnings stay visible

import numpy as np  # noqa: E402
import torch  # noqa: E402

import stepq  # noqa: E402
from stepq import metrics, zoo  # noqa: E402
from stepq.calibration import collect  # noqa: E402
from stepq.calibration.samplers import model_output  # noqa: E402
from stepq.data import load_digits_images  # noqa: E402
from stepq.methods.tdq.fit import fit_scale_source  # noqa: E402

#: docs/RESULTS.md, digits DiT, N = 1000, DDIM-20, guidance 1.5 (32 DDIM-50 calibration trajectories,
#: TDQ fit 300 steps): (FD, class accuracy, PSNR vs FP)
SHIPPED = {"fp32": (2.167, 0.992, None), "w8a8": (2.211, 0.991, 34.95), "w4a4 static": (12.640, 0.808, 19.45),
           "w4a4 TDQ": (4.792, 0.930, 23.44)}


class Clock:
    """Wall time per phase, and the process's CPU time (user + sys) at the end."""

    def __init__(self) -> None:
        self.t0, self.cpu0, self.phases = time.perf_counter(), os.times(), {}

    def lap(self, name: str, since: float) -> float:
        self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - since
        return time.perf_counter() - since

    def cpu(self) -> float:
        now = os.times()
        return (now.user - self.cpu0.user) + (now.system - self.cpu0.system)


def fd_noise(images: torch.Tensor, real: torch.Tensor, classifier: torch.nn.Module, rounds: int = 20) -> float:
    """Std of the FD of ``images`` against ``real`` over bootstrap resamples of ``images``: the noise
    of one FD figure at this N."""
    fa, fb = metrics.extract_features(images, classifier), metrics.extract_features(real, classifier)
    rng = np.random.default_rng(0)
    return float(np.std([metrics.frechet_distance(fa[rng.integers(0, len(fa), len(fa))], fb) for _ in range(rounds)]))


def file_mb(path: Path) -> float:
    """Size of an ONNX file with its external-data file, if any."""
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.exists()) / 1e6


def onnx_rows(qm: stepq.QuantizedModel, model: torch.nn.Module, example: dict, out: Path, rounds: int) -> dict:
    """Export ``qm`` and the FP model to ONNX, count ORT's kernels, time both (interleaved medians)."""
    import onnxruntime as ort

    from stepq.backends import onnx as sx

    q_path, fp_path = out / "dit-w8a8.onnx", out / "dit-fp32.onnx"
    qm.export_onnx(q_path)
    dyn = {k: ({0: torch.export.Dim.AUTO} if isinstance(v, torch.Tensor) and v.dim() >= 1 else None)
           for k, v in example.items()}
    torch.onnx.export(model, (), str(fp_path), kwargs=dict(example), dynamic_shapes=dyn, dynamo=True,
                      opset_version=21, verbose=False, optimize=True)
    counts = sx.count_kernels(q_path)
    q_sess = sx.load(q_path, threads=2)  # stepq's session: the same graph optimisations count_kernels saw
    fp_sess = ort.InferenceSession(str(fp_path), sx.session_options(threads=2), providers=["CPUExecutionProvider"])
    q_feeds = q_sess.feeds(q_sess.bind((), example))
    fp_feeds = {i.name: q_feeds[i.name] for i in fp_sess.get_inputs()}
    ref = model_output(qm(**example))
    diff = float((torch.as_tensor(q_sess.run_raw(q_feeds)[0]) - ref).abs().max())
    runs = {"fp32": lambda: fp_sess.run(None, fp_feeds), "w8a8": lambda: q_sess.run_raw(q_feeds)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in [*runs.values()] * 3:  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"counts": counts, "ms": med, "diff": diff, "q_mb": file_mb(q_path), "fp_mb": file_mb(fp_path)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="samples per model (docs/RESULTS.md: 1000)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps when sampling")
    ap.add_argument("--calib-samples", type=int, default=16, help="FP DDIM-20 calibration trajectories")
    ap.add_argument("--fit-steps", type=int, default=100, help="TDQ fit: Adam steps (the preset: 300)")
    ap.add_argument("--onnx-rounds", type=int, default=20, help="timed ONNX Runtime runs per model")
    ap.add_argument("--onnx-batch", type=int, default=64, help="batch of the timed ONNX Runtime runs")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--out", default="out/demo")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    torch.manual_seed(0)

    model, entry, classifier = zoo.load("digits-dit"), zoo.entry("digits-dit"), zoo.load("digits-classifier")
    test_x, _ = load_digits_images("test")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"digits-dit: diffusers DiTTransformer2DModel, {n_params / 1e6:.2f}M parameters, 16x16 digits, "
          f"10 classes, guidance {entry.guidance_scale}")

    t = time.perf_counter()
    calib = collect(model, entry.make_scheduler("ddim"), num_samples=args.calib_samples, num_inference_steps=20,
                    seed=1234, sample_shape=entry.sample_shape, conditions=entry.conditions, uncond=entry.uncond,
                    guidance_scale=entry.guidance_scale, eta=0.0, channels=entry.sample_shape[0], progress=False)
    print(f"calibration: {len(calib)} denoiser calls (batch {calib[0]['hidden_states'].shape[0]}, cond + uncond) "
          f"along {args.calib_samples} DDIM-20 trajectories ({clock.lap('calibration data', t):.1f}s)")

    models: dict[str, torch.nn.Module] = {"fp32": model}
    t = time.perf_counter()
    models["w8a8"] = stepq.quantize(model, calib[0], "w8a8", calibration=calib, progress=False)
    print(f"compiled w8a8 ({clock.lap('compile', t):.1f}s)")

    t = time.perf_counter()
    recipe = stepq.get_preset("w4a4-tdq")
    recipe = recipe.replace(tdq=recipe.tdq.replace(fit_steps=0))  # fitted below, after the static model is taken
    prog = stepq.calibrate(stepq.prepare(stepq.capture(model, calib[0]), recipe), calib, progress=False)
    models["w4a4 static"] = stepq.convert(prog)  # a copy: the generators still give the calibrated static steps
    print(f"compiled w4a4, static activation steps ({clock.lap('compile', t):.1f}s)")
    t = time.perf_counter()
    cfg = recipe.tdq
    curve = fit_scale_source(prog, list(calib), steps=args.fit_steps, lr=cfg.fit_lr, batch=cfg.fit_batch,
                             rows=cfg.fit_rows, seed=cfg.seed, progress=False).curve
    models["w4a4 TDQ"] = tdq = stepq.convert(prog)
    k = max(1, len(curve) // 10)  # one minibatch's error is noisy (its timesteps vary): average a tenth
    print(f"fitted TDQ: {len(curve)} Adam steps, relative output error {sum(curve[:k]) / k:.4f} (first {k} steps) "
          f"-> {sum(curve[-k:]) / k:.4f} (last {k}) ({clock.lap('TDQ fit', t):.1f}s)")

    rows, grids, fp_images = [], [], None
    t = time.perf_counter()
    for name, m in models.items():
        images, labels = zoo.generate(m, entry, args.n, num_inference_steps=args.steps, scheduler="ddim", seed=0,
                                      eta=0.0)
        if fp_images is None:
            fp_images = images
        rows.append((name, metrics.fd(images, test_x, classifier), metrics.class_accuracy(images, labels, classifier),
                     None if name == "fp32" else metrics.psnr(images, fp_images)))
        grids.append(images[:20])
    clock.lap("sampling", t)
    assert fp_images is not None
    noise = fd_noise(fp_images, test_x, classifier)

    print(f"\n{args.n} samples per model, DDIM {args.steps} steps, guidance {entry.guidance_scale}, same seeds "
          f"({clock.phases['sampling']:.1f}s); beside them the figures at N = 1000 (docs/RESULTS.md)")
    print(f"{'model':12s} {'FD':>7s} {'acc':>6s} {'PSNR vs FP':>11s}   | {'FD N=1000':>9s} {'acc':>6s} {'PSNR':>9s}")
    for name, fd, acc, psnr in rows:
        s_fd, s_acc, s_psnr = SHIPPED[name]
        print(f"{name:12s} {fd:7.3f} {acc:6.3f} {'-' if psnr is None else f'{psnr:.2f} dB':>11s}   | "
              f"{s_fd:9.3f} {s_acc:6.3f} {'-' if s_psnr is None else f'{s_psnr:.2f} dB':>9s}")
    fd = {name: v for name, v, _, _ in rows}
    print(f"FD noise at N = {args.n} (bootstrap std of the FP row): ±{noise:.2f}; FD is biased upwards at small N, "
          f"so compare rows of one column")
    print(f"  w8a8 - fp32 = {fd['w8a8'] - fd['fp32']:+.2f} FD ({abs(fd['w8a8'] - fd['fp32']) / noise:.1f} noise std); "
          f"TDQ brings W4A4 {fd['w4a4 static'] / max(fd['w4a4 TDQ'], 1e-9):.1f}x closer in FD "
          f"({fd['w4a4 static']:.2f} -> {fd['w4a4 TDQ']:.2f})")

    t = time.perf_counter()
    call = calib[len(calib) // 2]  # one calibration call (cond + uncond at one timestep), repeated to the batch
    reps = max(1, args.onnx_batch // call["hidden_states"].shape[0])
    example = {k: torch.cat([v] * reps) if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    ox = onnx_rows(models["w8a8"], model, example, out, args.onnx_rounds)  # type: ignore[arg-type]
    clock.lap("onnx", t)
    c = ox["counts"]
    batch = example["hidden_states"].shape[0]
    print(f"\nONNX Runtime, W8A8 ({ox['q_mb']:.1f} MB vs FP32 {ox['fp_mb']:.1f} MB): {c.n_integer} integer kernels "
          f"({', '.join(f'{k} {v}' for k, v in sorted(c.integer.items()))}), {c.n_float} float, "
          f"{len(c.quantized_in_float)} quantized layers left in float; max |ORT - stepq reference| {ox['diff']:.2e}")
    print(f"  batch {batch}, 2 threads, median of {args.onnx_rounds} interleaved runs: FP32 {ox['ms']['fp32']:.2f} ms, "
          f"W8A8 {ox['ms']['w8a8']:.2f} ms: {ox['ms']['fp32'] / ox['ms']['w8a8']:.2f}x ({clock.phases['onnx']:.1f}s)")

    grid = metrics.save_grid(torch.cat(grids), out / "samples.png", nrow=20)
    plots = tdq.plot(out / "plots")
    print(f"\nsample grid (rows: {', '.join(models)}): {grid}")
    print("plots: " + ", ".join(str(p) for p in plots.values()))
    wall, cpu = time.perf_counter() - clock.t0, clock.cpu()
    print(f"\ntime: {wall:.0f}s wall, {cpu:.0f}s CPU (user + sys) on {torch.get_num_threads()} threads; "
          + ", ".join(f"{k} {v:.0f}s" for k, v in clock.phases.items()))


if __name__ == "__main__":
    main()
