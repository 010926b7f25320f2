"""Real diffusers pipelines with a quantized denoiser: PSNR of their images against the FP pipeline's
from the same seeds (issue #14's closing table).

Each case of ``stepq.testing.pipelines`` (DDPM and DDIM on the digits UNet, DiT on the digits DiT,
StableDiffusion with a tiny UNet2DConditionModel + CLIP text encoder + VAE, StableDiffusion3 flow
matching with a tiny transformer + VAE; the tiny ones with random weights) is calibrated with
``stepq.quantize_pipeline`` on its own calls, then the FP and the quantized pipeline run the
comparison call with the same generator seed. PSNR over the output images in [0, 1].

    python benchmarks/diffusers_pipelines.py [--recipe w8a8] [--out docs/results/pipelines.md]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import stepq
from stepq.metrics import psnr
from stepq.pipelines import denoiser_of, record_calls
from stepq.testing import pipelines as tp

warnings.filterwarnings("ignore", category=FutureWarning)


def run(name: str, recipe: str) -> dict[str, object]:
    case = tp.CASES[name]
    pipe = tp.build(name)
    comp, model = denoiser_of(pipe)
    with record_calls(model) as rec:  # what the comparison run calls the denoiser with (batch)
        fp = tp.images(pipe, case)
    t0 = time.perf_counter()
    qpipe = stepq.quantize_pipeline(pipe, recipe, **case.calib)
    compile_s = time.perf_counter() - t0
    q = tp.images(qpipe, case)
    sample = rec.data[0][next(k for k in ("sample", "hidden_states") if k in rec.data[0])]
    calib = {k: v for k, v in case.calib.items() if k != "pipeline_kwargs"}
    return {"pipeline": type(pipe).__name__, "case": name, "denoiser": f"{comp}: {type(model).__name__}",
            "calibration": ", ".join(f"{k}={v}" for k, v in calib.items()),
            "run batch": int(sample.shape[0]), "steps": len(rec.data), "images": tuple(fp.shape),
            "PSNR (dB)": round(psnr(q, fp, data_range=1.0), 2), "calibrate+compile (s)": round(compile_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="w8a8")
    ap.add_argument("--cases", nargs="*", default=sorted(tp.CASES))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    for name in args.cases:
        row = run(name, args.recipe)
        print(row, flush=True)
        rows.append(row)
    cols = list(rows[0])
    lines = [f"# Diffusers pipelines with a {args.recipe} denoiser: PSNR against the FP pipeline", "",
             "`python benchmarks/diffusers_pipelines.py`; same seeds for FP and quantized; images in [0, 1]. "
             "\"run batch\" is the denoiser's batch in the comparison run (with CFG: twice the images).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
