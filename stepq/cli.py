"""Command line: quantize a shipped model or a diffusers folder, sample it, inspect the passes, export ONNX.

    stepq presets                                    every recipe preset, one line each (cost included)
    stepq quantize digits-ddpm w4a8 out/m            calibrate on FP sampler trajectories, quantize, save
    stepq quantize path/to/pipeline w8a8 out/m       a diffusers pipeline folder (model_index.json) or a
                                                     model folder (save_pretrained of a UNet / DiT)
    stepq quantize digits-dit my_recipe.json out/m   a recipe as JSON (stepq.Recipe.to_dict's format)
    stepq sample out/m grid.png                      FP row and quantized row from the same seeds
    stepq inspect digits-dit w4a4-tdq                the graph after every pass (the pipeline's dump)
    stepq report out/m                               the per-layer table of a saved model
    stepq export-onnx out/m out/m.onnx               quantized ONNX for ONNX Runtime

Every error is one line, ``stepq: error: ...``: exit 2 for a bad argument, a bad recipe or a
model stepq cannot take (typed stepq errors), 1 for anything else (an unreadable file...).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

from stepq.compiler.errors import StepqError

__all__ = ["CLIError", "build_parser", "describe_recipe", "main"]

#: the file ``stepq quantize`` writes beside the artefact: which model and sampler it came from
SOURCE_FILE = "stepq-source.json"


class CLIError(StepqError):
    """A command-line request stepq refuses before doing any work (the message says why)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with every error as the one line ``stepq: error: ...`` (no usage block), exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"stepq: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def describe_recipe(recipe: Any) -> str:
    """One line: what ``recipe`` quantizes, how its steps are found, and what it costs beyond calibration."""
    d = recipe.default
    if d is not None and d.weight is not None:
        bits = f"W{getattr(d.weight, 'bits', '?')}A{d.activation.bits if d.activation is not None else 'fp'}"
    else:
        bits = "weights per rule"
    if any(type(r.spec.weight).__name__ == "TernarySpec" for r in recipe.rules if r.spec is not None and r.spec.weight):
        bits = "ternary block linears (1.6 bits), other layers 8-bit"
    parts = [bits]
    if recipe.tdq is not None:
        kind = "TDQ step MLP of t" if recipe.tdq.method == "mlp" else "a free step per timestep"
        parts.append(f"{kind}" + ("" if recipe.qat is not None else
                                  f", fitted in PTQ ({recipe.tdq.fit_steps} Adam steps on calibration data)"))
    else:
        parts.append("static activation steps")
    if recipe.qat is not None:
        q = recipe.qat
        what = "ternary QAT (TerDiT)" if recipe.terdit is not None else "LSQ QAT"
        parts.append(f"trains: {what}, {q.steps} steps × batch {q.batch_size} real images")
    if recipe.qalora is not None:
        q = recipe.qalora
        parts.append(f"trains: QALoRA r={q.rank} by data-free distillation, {q.steps} steps × {q.batch_size} "
                     "FP trajectories" + (", TALSQ" if q.talsq else ""))
    if recipe.ptqd is not None:
        p = recipe.ptqd
        mixed = tuple(p.mixed_bits) if p.mixed_bits else None
        parts.append("PTQD correction" + (f", A{mixed[0]}/A{mixed[1]} chosen per step" if mixed else "")
                     + " (statistics: one pass over the calibration data)")
    return "; ".join(parts)


def _presets(_: argparse.Namespace) -> int:
    import stepq

    names = stepq.preset_names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:{width}s}  {describe_recipe(stepq.get_preset(name))}")
    return 0


def _recipe(arg: str) -> Any:
    """A preset name, or a JSON file holding ``Recipe.to_dict()``'s format."""
    from stepq.compiler.api import resolve_recipe
    from stepq.recipe.specs import Recipe

    path = Path(arg)
    if arg.endswith(".json") or path.is_file():
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise CLIError(f"cannot read the recipe file {arg}: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise CLIError(f"the recipe file {arg} is not JSON: {e}") from None
        if not isinstance(data, dict):
            raise CLIError(f"the recipe file {arg} holds a {type(data).__name__}, not a recipe object")
        return Recipe.from_dict(data)
    return resolve_recipe(arg)  # a wrong name fails before minutes of calibration


def _check_trainable(recipe: Any, model: str) -> None:
    """Refuse, before any work, a QAT recipe (LSQ, TerDiT's ternary QAT) on a model the command line
    has no training images for (the zoo models train on the digits; QALoRA needs none: it distills)."""
    from stepq import zoo

    if recipe.qat is not None and model not in zoo.available():
        raise CLIError(f"recipe {recipe.name!r} trains on real images (QAT) and the command line has training "
                       f"images only for the stepq.zoo models; for {model} use the Python API "
                       "(stepq.quantize(..., train_data=stepq.methods.qat.denoising_batches(...)))")


def _collect(src: Any, args: argparse.Namespace) -> Any:
    from stepq.calibration import collect

    return collect(src.model, src.scheduler_of(args.sampler), num_samples=args.calib_samples,
                   num_inference_steps=args.steps, seed=args.seed, sample_shape=src.sample_shape,
                   conditions=src.conditions, uncond=src.uncond if src.guidance_scale != 1.0 else None,
                   guidance_scale=src.guidance_scale, channels=src.sample_shape[0], progress=not args.quiet)


def _train_data(recipe: Any, src: Any) -> Any:
    if recipe.qat is None:
        return None
    from stepq.calibration.samplers import default_make_inputs
    from stepq.methods.qat import denoising_batches

    x0, y = src.train_images()
    cond = {"class_labels": y} if y is not None else None
    drop = ("class_labels", src.null_class, 0.1) if cond is not None and src.null_class is not None else None
    return denoising_batches(x0, src.scheduler, default_make_inputs(src.model), batch_size=recipe.qat.batch_size,
                             cond=cond, cond_dropout=drop, seed=0)


def _quantize(args: argparse.Namespace) -> int:
    import stepq
    from stepq.cli_models import resolve_model

    recipe = _recipe(args.recipe)
    _check_trainable(recipe, args.model)
    src = resolve_model(args.model, prompt=args.prompt, guidance_scale=args.guidance)
    if not args.quiet:
        print(f"{src.name}: {type(src.model).__name__}; recipe {recipe.name}: {describe_recipe(recipe)}", flush=True)
    t0 = time.perf_counter()
    calib = _collect(src, args)
    qm = stepq.quantize(src.model, calib[0], recipe, calibration=calib, train_data=_train_data(recipe, src),
                        progress=not args.quiet)
    qm.save(args.out)
    (Path(args.out) / SOURCE_FILE).write_text(json.dumps(
        {"model": src.name if not Path(src.name).exists() else str(Path(src.name).resolve()),
         "sampler": args.sampler, "guidance_scale": src.guidance_scale, "prompt": args.prompt}, indent=1))
    if not args.quiet:
        qm.report()
    print(f"{src.name} → {recipe.name}: {qm.weight_bytes() / 1e6:.2f} MB of weights, saved to {args.out} "
          f"({time.perf_counter() - t0:.0f}s)")
    return 0


def _source_of(artefact: str, model: str | None) -> dict[str, Any]:
    path = Path(artefact) / SOURCE_FILE
    if model is not None:
        return {"model": model}
    if not path.is_file():
        raise CLIError(f"{artefact} does not say which model it came from (no {SOURCE_FILE}); pass --model")
    return dict(json.loads(path.read_text()))


def _sample(args: argparse.Namespace) -> int:
    import stepq
    from stepq.artifact.plots import plot_samples, sample_pair
    from stepq.calibration.collect import Sampling
    from stepq.cli_models import resolve_model

    qm = stepq.load(args.path)  # a missing or broken artefact fails before the FP model is loaded
    info = _source_of(args.path, args.model)
    src = resolve_model(info["model"], prompt=info.get("prompt") or "a photo",
                        guidance_scale=args.guidance if args.guidance is not None else info.get("guidance_scale"))
    sampler = args.sampler or info.get("sampler", "auto")
    sampling = Sampling(src.scheduler_of(sampler), args.steps, src.sample_shape, conditions=src.conditions,
                        uncond=src.uncond if src.guidance_scale != 1.0 else None, guidance_scale=src.guidance_scale,
                        eta=0.0, channels=src.sample_shape[0])
    fp, q = sample_pair(qm, src.model, sampling, args.n, seed=args.seed)
    plot_samples(fp, q, args.out, title=f"FP (top) vs stepq {qm.recipe.name} (bottom): {args.steps} steps, seed {args.seed}")
    print(f"wrote {args.out} ({args.n} FP and {args.n} quantized samples, same seeds)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import stepq
    from stepq.cli_models import resolve_model

    recipe = _recipe(args.recipe)
    if recipe.tdq is not None:  # the graph is the same; the fit only changes the tables' values
        recipe = recipe.replace(tdq=recipe.tdq.replace(fit_steps=0))
    src = resolve_model(args.model, prompt=args.prompt, guidance_scale=args.guidance)
    calib = _collect(src, args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dump) if args.dump else Path(tmp)
        prog = stepq.prepare(stepq.capture(src.model, calib[0]), recipe, dump=folder)
        if args.phase != "prepare":
            stepq.convert(stepq.calibrate(prog, calib, progress=False, dump=folder), inplace=True, dump=folder)
        files = sorted(folder.glob("[0-9][0-9][0-9]-*.txt"))
        print(f"# stepq inspect {args.model} {recipe.name}: {len(files)} passes dumped"
              + (" (TDQ fit skipped: it changes table values, not the graph)" if recipe.tdq is not None else "")
              + ("; training and PTQD statistics are not run by inspect" if recipe.qat or recipe.qalora or recipe.ptqd
                 else ""))
        print((folder / "index.txt").read_text())
        for f in files:
            if args.pass_name is None or args.pass_name in f.stem:
                print(f.read_text())
    return 0


def _report(args: argparse.Namespace) -> int:
    import stepq

    stepq.load(args.path).report()
    return 0


def _export(args: argparse.Namespace) -> int:
    import stepq

    stepq.load(args.path).export_onnx(args.out)
    print(f"wrote {args.out}")
    return 0


def _calibration_args(p: argparse.ArgumentParser, samples: int, steps: int) -> None:
    p.add_argument("model", help="a stepq.zoo model (digits-ddpm, digits-dit) or a diffusers model / pipeline folder")
    p.add_argument("recipe", help="a preset name (see `stepq presets`) or a recipe JSON file")
    p.add_argument("--calib-samples", type=int, default=samples, help="FP sampler trajectories to calibrate on")
    p.add_argument("--steps", type=int, default=steps, help="sampler steps per calibration trajectory")
    p.add_argument("--sampler", default="auto", choices=["auto", "ddim", "ddpm"],
                   help="auto: the pipeline folder's scheduler (zoo: DDIM; a model folder: a default DDIM)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (zoo DiT: 1.5)")
    p.add_argument("--prompt", default="a photo", help="the prompt of a text-conditioned pipeline")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--quiet", action="store_true")


def _positive(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="stepq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("presets", help="the recipe presets, one line each").set_defaults(run=_presets)
    q = sub.add_parser("quantize", help="quantize a zoo model or a diffusers folder and save the artefact")
    _calibration_args(q, 16, 50)
    q.add_argument("out", help="artefact directory to write")
    q.set_defaults(run=_quantize)
    s = sub.add_parser("sample", help="write a PNG grid: FP samples above the quantized model's, same seeds")
    s.add_argument("path", help="an artefact written by `stepq quantize`")
    s.add_argument("out", help="the PNG to write")
    s.add_argument("--model", default=None, help="the FP source (default: the one recorded by `stepq quantize`)")
    s.add_argument("--n", type=_positive, default=8)
    s.add_argument("--steps", type=_positive, default=20)
    s.add_argument("--sampler", default=None, choices=["auto", "ddim", "ddpm"])
    s.add_argument("--guidance", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(run=_sample)
    i = sub.add_parser("inspect", help="print the graph after every pass of a compile")
    _calibration_args(i, 1, 4)
    i.add_argument("--phase", default="convert", choices=["prepare", "convert"], help="the last phase to run")
    i.add_argument("--pass", dest="pass_name", default=None, help="print only the graphs of passes with this name")
    i.add_argument("--dump", default=None, help="keep the dump files in this folder")
    i.set_defaults(run=_inspect)
    r = sub.add_parser("report", help="print a saved model's per-layer report")
    r.add_argument("path")
    r.set_defaults(run=_report)
    e = sub.add_parser("export-onnx", help="write a saved model as quantized ONNX")
    e.add_argument("path")
    e.add_argument("out")
    e.set_defaults(run=_export)
    return ap


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Run the ``stepq`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status:
    0, 2 for a typed stepq error or a bad argument, 1 for any other error (one ``stepq: error:`` line)."""
    from stepq.console import quiet_third_party

    args = build_parser().parse_args(argv)
    quiet_third_party()
    try:
        return int(args.run(args))
    except StepqError as e:  # typed errors already name the layer / file / preset
        print(f"stepq: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        print(f"stepq: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
