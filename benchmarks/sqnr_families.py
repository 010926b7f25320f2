"""Output SQNR of stepq (w8a8, w4a8) beside PT2E W8A8 (torchao's X86InductorQuantizer and its
XNNPACK-style test quantizer) on the six tiny diffusers families, same calibration and eval inputs.

Calibration: the denoiser inputs of 8 FP trajectories of the family's real scheduler (6 steps).
Evaluation: the inputs of 8 other trajectories (another seed); SQNR of the model output against FP
over all of them.

    python benchmarks/sqnr_families.py [--out docs/results/sqnr_families.md]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

import stepq
from stepq.calibration import collect
from stepq.calibration.probe import sqnr_db
from stepq.calibration.samplers import model_output
from stepq.testing.families import FAMILIES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import pt2e_w8a8

warnings.filterwarnings("ignore")


def _sqnr(fp, q, data) -> float:
    ref = torch.cat([model_output(fp(**d)).flatten() for d in data])
    out = torch.cat([model_output(q(**d)).flatten() for d in data])
    return sqnr_db(ref, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/results/sqnr_families.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, f in FAMILIES.items():
        m = f.model()
        kw = dict(make_inputs=f.make_inputs, conditions=f.conditions, sample_shape=f.sample_shape,
                  channels=f.channels, progress=False, num_inference_steps=6)
        calib = collect(m, f.scheduler(), num_samples=8, seed=0, **kw)
        evals = collect(m, f.scheduler(), num_samples=8, seed=1, **kw)  # same batch: PT2E graphs are static
        row = {"model": name, "params": sum(p.numel() for p in m.parameters())}
        for recipe in ("w8a8", "w4a8"):
            t0 = time.perf_counter()
            qm = stepq.quantize(m, calib[0], recipe, calibration=calib, timestep_scale=f.timestep_scale, progress=False)
            row[f"stepq {recipe}"] = f"{_sqnr(m, qm, evals):.1f}"
            row[f"t {recipe}"] = time.perf_counter() - t0
        for q in ("x86", "xnnpack"):
            try:
                qg = pt2e_w8a8(m, calib[0], calib, quantizer=q)
                row[f"PT2E {q} w8a8"] = f"{_sqnr(m, qg, evals):.1f}"
            except Exception as e:  # report the peer's failure, do not hide it
                row[f"PT2E {q} w8a8"] = f"FAIL ({type(e).__name__}: {str(e).splitlines()[0][:60]})"
        rows.append(row)
        print(row, flush=True)

    cols = ["model", "params", "stepq w8a8", "stepq w4a8", "PT2E x86 w8a8", "PT2E xnnpack w8a8"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) if c != "params" else f"{r[c] / 1e6:.2f}M" for c in cols) + " |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Output SQNR (dB) against FP, tiny diffusers families\n\n"
                   "Calibration: 8 FP trajectories x 6 steps of the family's scheduler; evaluation: 8 other "
                   "trajectories (batch 8). Higher is better.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
