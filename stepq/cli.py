"""Command line: quantize a shipped model, inspect an artefact, export it to ONNX.

    stepq presets                                    the recipe presets
    stepq quantize digits-ddpm w4a8-tdq out/m        calibrate on FP sampler trajectories, save
    stepq report out/m                               the per-layer table of a saved model
    stepq export-onnx out/m out/m.onnx               quantized ONNX for ONNX Runtime

``quantize`` takes a model from ``stepq.zoo`` (the shipped digits models); quantizing your own
model is the Python API (``stepq.quantize``), since it needs the model object.
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main"]


def _presets(_: argparse.Namespace) -> int:
    import stepq

    print("\n".join(stepq.preset_names()))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    import stepq
    from stepq import zoo
    from stepq.calibration import collect
    from stepq.compiler.api import resolve_recipe

    recipe = resolve_recipe(args.recipe)  # a wrong name fails before minutes of calibration
    model, entry = zoo.load(args.model), zoo.entry(args.model)
    t0 = time.perf_counter()
    calib = collect(model, entry.make_scheduler(args.sampler), num_samples=args.calib_samples,
                    num_inference_steps=args.steps, seed=args.seed, sample_shape=entry.sample_shape,
                    conditions=entry.conditions, uncond=entry.uncond, guidance_scale=entry.guidance_scale,
                    channels=entry.sample_shape[0], progress=not args.quiet)
    qm = stepq.quantize(model, calib[0], recipe, calibration=calib, progress=not args.quiet)
    qm.save(args.out)
    if not args.quiet:
        qm.report()
    print(f"{args.model} → {args.recipe}: {qm.weight_bytes() / 1e6:.2f} MB of weights, saved to {args.out} "
          f"({time.perf_counter() - t0:.0f}s)")
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="stepq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("presets", help="list the recipe presets").set_defaults(run=_presets)
    q = sub.add_parser("quantize", help="quantize a shipped model and save the artefact")
    q.add_argument("model", help="a stepq.zoo model (digits-ddpm, digits-dit)")
    q.add_argument("recipe", help="a preset name (see `stepq presets`)")
    q.add_argument("out", help="artefact directory to write")
    q.add_argument("--calib-samples", type=int, default=16, help="FP sampler trajectories to calibrate on")
    q.add_argument("--steps", type=int, default=50, help="sampler steps per calibration trajectory")
    q.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    q.add_argument("--seed", type=int, default=1234)
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(run=_quantize)
    r = sub.add_parser("report", help="print a saved model's per-layer report")
    r.add_argument("path")
    r.set_defaults(run=_report)
    e = sub.add_parser("export-onnx", help="write a saved model as quantized ONNX")
    e.add_argument("path")
    e.add_argument("out")
    e.set_defaults(run=_export)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from stepq.compiler.errors import StepqError

    try:
        return int(args.run(args))
    except StepqError as e:  # typed errors already name the layer / file / preset
        print(f"stepq: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
