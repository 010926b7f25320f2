"""Diffusers denoiser classes beyond the tests' six (``stepq.testing.denoisers``: tiny configs, random
weights) through ``stepq.quantize`` at W8A8: the output SQNR against the float model, or the typed
error stepq raises with its reason.

Calibration: 4 random calls at timesteps spread over [0, 1000); evaluation: 3 other calls at
t = 100, 500, 900 (another seed), SQNR over all of them. Each class runs in its own subprocess (a
hard failure of one cannot hide the others), with a time limit.

    python benchmarks/denoisers.py [--out docs/results/denoisers.md] [--only NAME ...] [--timeout 300]

``--only`` merges its rows into the table already at ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

GOAL_DB = 20.0


def run_one(name: str, recipe: str = "w8a8") -> dict:
    import torch

    import stepq
    from stepq.calibration.probe import sqnr_db
    from stepq.calibration.samplers import model_output
    from stepq.compiler.errors import StepqError
    from stepq.testing.denoisers import CASES

    case = CASES[name]
    model = case.model()
    t0 = time.perf_counter()
    try:
        qm = stepq.quantize(model, case.inputs(2, 500.0, 0), recipe, calibration=case.calibration(), progress=False,
                            **case.capture_options)
    except StepqError as e:
        return {"name": name, "status": type(e).__name__, "detail": str(e).strip(), "seconds": time.perf_counter() - t0}
    except Exception as e:  # an untyped failure is a stepq bug worth its own row
        return {"name": name, "status": f"untyped {type(e).__name__}", "detail": str(e).strip()[:500],
                "seconds": time.perf_counter() - t0}
    evals = [case.inputs(2, t, 100 + i) for i, t in enumerate((100.0, 500.0, 900.0))]
    with torch.no_grad():
        ref = torch.cat([model_output(model(**d)).flatten() for d in evals])
        out = torch.cat([model_output(qm(**d)).flatten() for d in evals])
    db = sqnr_db(ref, out)
    zero = [r.layer for r in qm.program.state.report if getattr(r, "note", "")]
    return {"name": name, "status": "ok", "sqnr_db": db, "timestep_arg": qm.program.timestep_arg,
            "quantized_layers": len(qm.quantized_layers()), "seconds": time.perf_counter() - t0,
            "notes": zero}


def _row(r: dict) -> str:
    if r["status"] == "ok":
        verdict = "meets 20 dB" if r["sqnr_db"] >= GOAL_DB else "below 20 dB"
        result = f"{r['sqnr_db']:.1f} dB ({verdict}); {r['quantized_layers']} layers quantized, timestep `{r['timestep_arg']}`"
    else:
        lines = [ln.strip() for ln in r.get("detail", "").splitlines() if ln.strip()]
        result = f"{r['status']}: " + " ".join(lines)[:600].replace(
            "/work/main/.venv/lib/python3.11/site-packages/", "")
    return f"| {r['name']} | {result.replace('|', '/')} | {r['seconds']:.0f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/results/denoisers.md")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    from stepq.testing.denoisers import CASES

    rows = []
    for name in args.only or list(CASES):
        t0 = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                               timeout=args.timeout)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            r = json.loads(lines[-1]) if lines else {"name": name, "status": f"crashed (rc {p.returncode})",
                                                     "detail": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "",
                                                     "seconds": time.perf_counter() - t0}
        except subprocess.TimeoutExpired:
            r = {"name": name, "status": "timeout", "detail": f"more than {args.timeout:.0f} s", "seconds": args.timeout}
        rows.append(r)
        print(_row(r), flush=True)
    lines = {r["name"]: _row(r) for r in rows}
    if args.only and Path(args.out).exists():  # --only: merge into the table already written
        for ln in Path(args.out).read_text().splitlines():
            name = ln.split("|")[1].strip() if ln.startswith("| ") else ""
            if name in CASES and name not in lines:
                lines[name] = ln
    table = [lines[n] for n in CASES if n in lines]
    ok = sum("meets 20 dB" in ln for ln in table)
    text = "\n".join([
        "# Diffusers denoisers beyond the six: W8A8 through stepq",
        "",
        "Written by `benchmarks/denoisers.py` (tiny configs from `stepq.testing.denoisers`, random weights;",
        "4 random calibration calls, SQNR of the output over 3 evaluation calls at t = 100, 500, 900).",
        "",
        f"{ok} of {len(table)} classes reach the goal of {GOAL_DB:.0f} dB; the others say why.",
        "",
        "| class | W8A8 result | s |",
        "|---|---|---|",
        *table,
        "",
    ])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
