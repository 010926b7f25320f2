"""Sample quality of quantized digits models: FD, class accuracy, PSNR vs FP, weight bytes.

For each shipped digits model (DDPM UNet, class-conditional DiT) and each configuration (FP32,
stepq recipes, ONNX Runtime's quantize_static, PT2E W8A8), draw N seeded samples with real diffusers
schedulers and score them with the digit classifier (``stepq.metrics``):

* FD: Fréchet distance between the samples and the held-out real digits in the classifier's
  penultimate feature space (lower is better); the floor is FD(train, held-out);
* class accuracy (DiT): the classifier's prediction equals the requested label;
* PSNR vs FP: against the FP model's samples from the same initial and sampler noise.

All configurations are calibrated on the same data: the inputs the FP model's denoiser sees along
``--calib-samples`` DDIM trajectories of 50 steps (another seed than the evaluation).

    python benchmarks/quality.py --models ddpm --out docs/results/quality_ddpm   # one model's table, 1000 samples
    python benchmarks/quality.py --models ddpm --n 200 --configs fp32 "stepq w8a8"
    python benchmarks/quality.py --configs "ONNX stepq w8a8-tdq" --merge   # the ONNX model in ORT

Writes ``--out``.md and .json (default docs/results/quality) and PNG grids of FP vs quantized samples.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import stepq
from stepq import metrics, zoo
from stepq.calibration import CalibrationData, collect
from stepq.data import load_digits_images

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import OrtDenoiser, export_fp_onnx, ort_quantize_static, pt2e_w8a8

warnings.filterwarnings("ignore")

SAMPLERS: dict[str, tuple[str, int, float | None]] = {
    # name: (scheduler kind, steps, eta)
    "ddpm100": ("ddpm", 100, None),
    "ddim20": ("ddim", 20, 0.0),
    "ddim100": ("ddim", 100, 0.0),
    "ddim50": ("ddim", 50, 0.0),
    "ddim10": ("ddim", 10, 0.0),
}


@dataclass
class Context:
    name: str
    model: torch.nn.Module
    entry: zoo.ZooEntry
    calibration: CalibrationData
    example: dict[str, Any]
    workdir: Path
    cache: dict[str, Any] = field(default_factory=dict)


Row = Callable[[Context], tuple[Callable[..., Any], int]]


def _fp(ctx: Context) -> tuple[Callable[..., Any], int]:
    return ctx.model, sum(p.numel() * 4 for p in ctx.model.parameters())


def train_batches(ctx: Context, batch_size: int, seed: int = 0):
    """Denoising-loss batches from the real digits training set (for QAT recipes)."""
    from stepq.calibration.samplers import default_make_inputs
    from stepq.methods.qat import denoising_batches

    x0, y = load_digits_images("train")
    cond = {"class_labels": y} if ctx.entry.conditions is not None else None
    drop = ("class_labels", ctx.entry.null_class, 0.1) if cond else None
    return denoising_batches(x0, ctx.entry.scheduler, default_make_inputs(ctx.model), batch_size=batch_size,
                             cond=cond, cond_dropout=drop, seed=seed)


def stepq_row(recipe: str | stepq.Recipe) -> Row:
    def build(ctx: Context) -> tuple[Callable[..., Any], int]:
        r = stepq.compiler.api.resolve_recipe(recipe)
        if r.ptqd is not None and ctx.entry.conditions is not None:  # statistics on the guided ε
            r = r.replace(ptqd=dataclasses.replace(r.ptqd, guidance_scale=ctx.entry.guidance_scale))
        train = train_batches(ctx, r.qat.batch_size, r.qat.seed) if r.qat is not None else None
        qm = stepq.quantize(ctx.model, ctx.example, r, calibration=ctx.calibration, train_data=train,
                            progress=False)
        ctx.cache[f"qm:{qm.recipe.name}"] = qm
        return qm, qm.weight_bytes()

    return build


def onnx_row(recipe: str) -> Row:
    """A stepq recipe lowered to ONNX and sampled in ONNX Runtime (the deployed form of the reference rows)."""

    def build(ctx: Context) -> tuple[Callable[..., Any], int]:
        qm = ctx.cache.get(f"qm:{recipe}")
        if qm is None:
            qm, _ = stepq_row(recipe)(ctx)
        path = ctx.workdir / f"{ctx.name}_stepq_{recipe}.onnx"
        qm.export_onnx(str(path))
        return OrtDenoiser(path), qm.weight_bytes()

    return build


def _fp_onnx(ctx: Context) -> Path:
    if "fp_onnx" not in ctx.cache:
        ctx.cache["fp_onnx"] = export_fp_onnx(ctx.model, ctx.example, ctx.workdir / f"{ctx.name}_fp.onnx")
    return ctx.cache["fp_onnx"]


def ort_row(method: str, op_types: list[str] | None = None) -> Row:
    def build(ctx: Context) -> tuple[Callable[..., Any], int]:
        tag = method + ("_gemm" if op_types else "")
        out = ort_quantize_static(_fp_onnx(ctx), ctx.workdir / f"{ctx.name}_ort_{tag}.onnx", ctx.calibration,
                                  method=method, op_types=op_types)
        return OrtDenoiser(out), out.stat().st_size

    return build


def _float_timestep(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v.float() if k == "timestep" and isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _pt2e(ctx: Context) -> tuple[Callable[..., Any], int]:
    """PT2E W8A8, X86InductorQuantizer. On diffusers' UNet2DModel its histogram observer fails on the
    integer timestep (``timesteps * torch.ones(...)`` is annotated and observed as Long); the UNet takes
    a float timestep, so the model is then captured, calibrated and called with a float32 timestep
    (the same values). The XNNPACK-style quantizer is the last resort."""
    cast = False
    try:
        gm = pt2e_w8a8(ctx.model, ctx.example, ctx.calibration, quantizer="x86")
        which = "x86"
    except Exception as e:
        print(f"  PT2E X86InductorQuantizer failed on {ctx.name} ({type(e).__name__}: {str(e)[:80]}); "
              "retrying with a float32 timestep", flush=True)
        try:
            gm = pt2e_w8a8(ctx.model, _float_timestep(ctx.example), [_float_timestep(c) for c in ctx.calibration],
                           quantizer="x86")
            which, cast = "x86, float timestep", True
        except Exception as e2:
            print(f"  failed again ({type(e2).__name__}: {str(e2)[:80]}); using the XNNPACK-style quantizer",
                  flush=True)
            gm = pt2e_w8a8(ctx.model, ctx.example, ctx.calibration, quantizer="xnnpack")
            which = "xnnpack"
    ctx.cache["pt2e_quantizer"] = which
    tensors = {id(t): t for t in list(gm.state_dict().values()) + [v for v in vars(gm).values() if isinstance(v, torch.Tensor)]}
    return _Chunked(gm, _batch_size(ctx.example), cast_timestep=cast), sum(
        t.numel() * t.element_size() for t in tensors.values())


def _batch_size(inputs: dict[str, Any]) -> int:
    return next(int(v.shape[0]) for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() >= 1)


class _Chunked:
    """Calls ``fn`` on batch slices of at most ``size``: torch.export's Dim.AUTO (used for PT2E) guards
    the batch to the range it saw at capture (``sample.size()[0] <= 63`` for a calibration batch of 32)."""

    def __init__(self, fn: Callable[..., Any], size: int, cast_timestep: bool = False):
        self.fn, self.size, self.cast = fn, size, cast_timestep
        self.forward = getattr(fn, "forward", fn)  # its parameter names tell the sampler how to call it

    def __call__(self, **kw: Any) -> tuple[torch.Tensor]:
        from stepq.calibration.samplers import model_output

        n = _batch_size(kw)
        if self.cast:
            kw = _float_timestep(kw)
        outs = [model_output(self.fn(**{k: v[i:i + self.size] if isinstance(v, torch.Tensor) and v.dim() >= 1
                                        and v.shape[0] == n else v for k, v in kw.items()}))
                for i in range(0, n, self.size)]
        return (torch.cat(outs),)


ROWS: dict[str, Row] = {
    "fp32": _fp,
    "stepq w8a8": stepq_row("w8a8"),
    "stepq w4a8": stepq_row("w4a8"),
    "stepq w4a4": stepq_row("w4a4"),
    "ORT quantize_static minmax": ort_row("minmax"),
    "ORT quantize_static percentile": ort_row("percentile"),
    # the same, quantizing only what stepq quantizes (ORT's default also quantizes Mul/Add/…)
    "ORT quantize_static minmax, Conv/MatMul/Gemm": ort_row("minmax", ["Conv", "MatMul", "Gemm"]),
    "ORT quantize_static percentile, Conv/MatMul/Gemm": ort_row("percentile", ["Conv", "MatMul", "Gemm"]),
    "PT2E W8A8 (torchao)": _pt2e,
}


def calibration_for(name: str, model: torch.nn.Module, entry: zoo.ZooEntry, n: int, seed: int) -> CalibrationData:
    return collect(model, entry.make_scheduler("ddim"), num_samples=n, num_inference_steps=50, seed=seed,
                   sample_shape=entry.sample_shape, conditions=entry.conditions, uncond=entry.uncond,
                   guidance_scale=entry.guidance_scale, eta=0.0, channels=entry.sample_shape[0], progress=False)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["ddpm", "dit"], choices=["ddpm", "dit"])
    ap.add_argument("--configs", nargs="+", default=list(ROWS), help=f"rows to run; known: {list(ROWS)}")
    ap.add_argument("--samplers", nargs="+", default=["ddpm100", "ddim20"], choices=list(SAMPLERS))
    ap.add_argument("--n", type=int, default=1000, help="samples per row (>= 1000 for FD)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/results/quality")
    ap.add_argument("--grids", default="docs/results/grids")
    ap.add_argument("--merge", action="store_true",
                    help="merge the rows into the existing results (same model/config/sampler replaced)")
    ap.add_argument("--cache-dir", default="/tmp/stepq_quality_cache",
                    help="FP samples are kept here (safetensors) so later --merge runs score PSNR against them")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json and exit")
    args = ap.parse_args(argv)
    if args.report_only:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        args.merge = False
        write_results(saved["rows"], args, saved["floor"], saved["noise_fd"], saved.get("n", args.n))
        return saved["rows"]
    for c in args.configs:  # "stepq <preset>" works for every preset
        if c not in ROWS and c.startswith("stepq ") and c.removeprefix("stepq ") in stepq.preset_names():
            ROWS[c] = stepq_row(c.removeprefix("stepq "))
        if c not in ROWS and c.startswith("ONNX stepq ") and c.removeprefix("ONNX stepq ") in stepq.preset_names():
            ROWS[c] = onnx_row(c.removeprefix("ONNX stepq "))
    unknown = [c for c in args.configs if c not in ROWS]
    if unknown:
        ap.error(f"unknown configs {unknown}; known: {list(ROWS)} and 'stepq <preset>' for {stepq.preset_names()}")

    torch.manual_seed(args.seed)
    classifier = zoo.load("digits-classifier")
    train_x, _ = load_digits_images("train")
    test_x, test_y = load_digits_images("test")
    floor = metrics.fd(train_x, test_x, classifier)
    noise = torch.rand((args.n, *test_x.shape[1:]), generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise_fd = metrics.fd(noise, test_x, classifier)
    print(f"FD floor (train vs held-out): {floor:.3f}; uniform noise vs held-out: {noise_fd:.1f}; "
          f"classifier held-out accuracy {metrics.class_accuracy(test_x, test_y, classifier):.4f}", flush=True)
    rows: list[dict[str, Any]] = []
    grid_dir = Path(args.grids)
    grid_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for short in args.models:
            name = f"digits-{short}"
            model = zoo.load(name)
            entry = zoo.entry(name)
            t0 = time.perf_counter()
            calib = calibration_for(name, model, entry, args.calib_samples, seed=args.seed + 12345)
            example = calib[0]
            print(f"{name}: {len(calib)} calibration batches ({calib.num_samples} denoiser inputs) in "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)
            ctx = Context(name, model, entry, calib, example, Path(tmp))
            fp_cache = _load_fp_cache(args, short)  # sampler -> (images, labels)
            fp_samples: dict[str, torch.Tensor] = {k: v[0] for k, v in fp_cache.items()}
            for config in args.configs:
                t0 = time.perf_counter()
                try:
                    denoiser, nbytes = ROWS[config](ctx)
                except Exception as e:
                    print(f"  {config}: FAILED to build: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    rows.append({"model": short, "config": config, "error": f"{type(e).__name__}: {str(e)[:120]}"})
                    continue
                build_s = time.perf_counter() - t0
                for sampler in args.samplers:
                    kind, steps, eta = SAMPLERS[sampler]
                    t1 = time.perf_counter()
                    try:
                        if config == "fp32" and sampler in fp_cache:  # cached by an earlier run
                            images, labels = fp_cache[sampler]
                        else:
                            images, labels = zoo.generate(denoiser, entry, args.n, num_inference_steps=steps,
                                                          scheduler=kind, seed=args.seed, eta=eta)
                    except Exception as e:  # a peer that cannot sample fails its row, not the run
                        print(f"  {config}: FAILED to sample ({sampler}): {type(e).__name__}: {str(e)[:200]}",
                              flush=True)
                        rows.append({"model": short, "config": config, "sampler": sampler,
                                     "error": f"{type(e).__name__}: {str(e)[:120]}"})
                        continue
                    if config == "fp32":
                        fp_samples[sampler] = images
                        _save_fp_cache(args, short, sampler, images, labels)
                    row = {
                        "model": short, "config": config, "sampler": sampler,
                        "fd": metrics.fd(images, test_x, classifier),
                        "accuracy": metrics.class_accuracy(images, labels, classifier) if labels is not None else None,
                        "psnr_vs_fp": (metrics.psnr(images, fp_samples[sampler])
                                       if sampler in fp_samples and config != "fp32" else None),
                        "weight_bytes": nbytes, "build_s": round(build_s, 1),
                        "sample_s": round(time.perf_counter() - t1, 1),
                    }
                    rows.append(row)
                    print(f"  {config:32s} {sampler:8s} FD {row['fd']:7.3f}  acc "
                          f"{'-' if row['accuracy'] is None else format(row['accuracy'], '.3f')}  PSNR "
                          f"{'-' if row['psnr_vs_fp'] is None else format(row['psnr_vs_fp'], '.2f')}  "
                          f"{nbytes / 1e6:.2f} MB  ({row['sample_s']}s)", flush=True)
                    safe = re.sub(r"[^A-Za-z0-9.+-]+", "_", config).strip("_")  # "Conv/MatMul" is no folder
                    metrics.save_grid(images[:100], grid_dir / f"{short}_{sampler}_{safe}.png", nrow=10)
                    write_results(rows, args, floor, noise_fd, args.n, quiet=True)  # a crash loses nothing
    write_results(rows, args, floor, noise_fd, args.n)
    return rows


def _fp_cache_path(args: argparse.Namespace, short: str, sampler: str) -> Path:
    return Path(args.cache_dir) / f"{short}_{sampler}_n{args.n}_seed{args.seed}.safetensors"


def _load_fp_cache(args: argparse.Namespace, short: str) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    from safetensors.torch import load_file

    out = {}
    for sampler in args.samplers:
        p = _fp_cache_path(args, short, sampler)
        if p.is_file():
            saved = load_file(p)
            out[sampler] = (saved["images"], saved.get("labels"))
    return out


def _save_fp_cache(args: argparse.Namespace, short: str, sampler: str, images: torch.Tensor,
                   labels: torch.Tensor | None) -> None:
    from safetensors.torch import save_file

    p = _fp_cache_path(args, short, sampler)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": images.contiguous()} | ({} if labels is None else {"labels": labels.contiguous()}), str(p))


def _merge(rows: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """The rows of the results at ``path`` with ``rows`` replacing those of the same model/config/sampler."""
    if not path.is_file():
        return rows
    key = lambda r: (r["model"], r["config"], r.get("sampler"))  # noqa: E731
    new = {key(r) for r in rows}
    old = [r for r in json.loads(path.read_text())["rows"] if key(r) not in new]
    order = {"ddpm": 0, "dit": 1}
    # stable: FP first, then run order within a model
    return sorted(old + rows, key=lambda r: (order.get(r["model"], 2), r["config"] != "fp32"))


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def write_results(rows: list[dict[str, Any]], args: argparse.Namespace, floor: float, noise_fd: float, n: int,
                  quiet: bool = False) -> None:
    out = Path(args.out)
    if args.merge:
        rows = _merge(rows, out.with_suffix(".json"))
    lines = [
        "# Digits quality benchmark",
        "",
        f"N = {n} samples per row (seed {args.seed}); calibration: {args.calib_samples} DDIM-50 FP trajectories "
        "(another seed). FD against the held-out real digits in the digit classifier's feature space.",
        f"Floor: FD(real train, real held-out) = {floor:.3f}; uniform noise images: FD = {noise_fd:.1f}.",
        "",
        "| model | config | sampler | FD | class acc | PSNR vs FP (dB) | weight MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['config']} | - | failed: {r['error']} | | | |")
            continue
        psnr = None if r["config"] == "fp32" else r["psnr_vs_fp"]
        lines.append(f"| {r['model']} | {r['config']} | {r['sampler']} | {_fmt(r['fd'], '.3f')} | "
                     f"{_fmt(r['accuracy'], '.3f')} | {_fmt(psnr, '.2f')} | "
                     f"{r['weight_bytes'] / 1e6:.3f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"floor": floor, "noise_fd": noise_fd, "n": n, "rows": rows}, indent=1))
    if not quiet:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
