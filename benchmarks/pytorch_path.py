"""The PyTorch path of a QuantizedModel against the FP model it came from, on the digits models.

For each model and recipe: ``collect`` records ``--samples`` DDIM trajectories of ``--steps`` steps
(20 calls of batch 16 by default; the DiT's guidance makes its calls batch 32), the model is compiled
with the recipe on them, and ``--repeats`` rounds time, interleaved, the forward over every recorded
call of:

* ``fp``: the FP model (diffusers, eager);
* ``reference``: the QuantizedModel as converted (every weight dequantized on every call);
* ``cached``: the same model after ``cache_dequantized()`` (bit for bit the same outputs, checked);
* ``cached, no act. quantizers``: a diagnostic, not a usable model: the cached graph with every
  activation fake-quant removed, to show what the activation quantizers cost.

The table gives the median over the rounds as a ratio to ``fp`` (one process, ``--threads``).

    python benchmarks/pytorch_path.py [--models ddpm,dit] [--recipes w8a8,w4a8,w4a8-tdq] [--repeats 7]

Writes docs/results/pytorch_path.md/.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import stepq
from stepq import zoo
from stepq.calibration import collect
from stepq.compiler import ops

warnings.filterwarnings("ignore")
MODELS = {"ddpm": "digits-ddpm", "dit": "digits-dit"}


def _without_activation_quantizers(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    out = torch.fx.GraphModule(gm, gm.graph.__deepcopy__())
    for n in list(out.graph.nodes):
        if n.op == "call_function" and n.target is ops.FAKE_QUANT:
            n.replace_all_uses_with(n.args[0])
            out.graph.erase_node(n)
    out.recompile()
    return out


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)


def measure(short: str, recipes: list[str], samples: int, steps: int, repeats: int) -> list[dict[str, Any]]:
    name = MODELS[short]
    model, entry = zoo.load(name), zoo.entry(name)
    data = collect(model, entry.make_scheduler("ddim"), num_samples=samples, num_inference_steps=steps,
                   sample_shape=entry.sample_shape, conditions=entry.conditions, uncond=entry.uncond,
                   guidance_scale=entry.guidance_scale, eta=0.0, channels=entry.sample_shape[0], progress=False)
    calls = list(data)
    rows = []
    for recipe in recipes:
        qm = stepq.quantize(model, calls[0], recipe, calibration=data, progress=False)
        ref = [_first(qm(**c)) for c in calls[:2]]
        cached = stepq.quantize(model, calls[0], recipe, calibration=data, progress=False).cache_dequantized()
        exact = all(torch.equal(a, _first(cached(**c))) for a, c in zip(ref, calls[:2], strict=True))
        bare = _without_activation_quantizers(cached._cached)

        def bare_call(c: dict[str, Any], bare: torch.fx.GraphModule = bare, qm: Any = cached) -> Any:
            return bare(**qm.program.bind((), c))

        fns = {"fp": lambda c: model(**c), "reference": lambda c, qm=qm: qm(**c),
               "cached": lambda c, qm=cached: qm(**c), "cached, no act. quantizers": bare_call}
        times: dict[str, list[float]] = {k: [] for k in fns}
        with torch.inference_mode():
            for fn in fns.values():  # warm-up
                for c in calls:
                    fn(c)
            for _ in range(repeats):
                for k, fn in fns.items():
                    t0 = time.perf_counter()
                    for c in calls:
                        fn(c)
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"model": name, "recipe": recipe, "calls": len(calls), "batch": int(calls[0][next(iter(calls[0]))].shape[0]),
               "bit_exact": exact, "weights_cached": int(sum(1 for k in cached._cached.state_dict() if "dequantized" in k)),
               "ratio": {k: round(v / med["fp"], 3) for k, v in med.items()}}
        print(f"{name} {recipe}: " + ", ".join(f"{k} {v:.2f}x" for k, v in row["ratio"].items())
              + f" (bit-exact {exact})", flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="ddpm,dit")
    ap.add_argument("--recipes", default="w8a8,w4a8,w4a8-tdq")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/results/pytorch_path")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for short in args.models.split(","):
        rows += measure(short, args.recipes.split(","), args.samples, args.steps, args.repeats)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "rows": rows},
                                                   indent=1))
    cols = list(rows[0]["ratio"])
    lines = ["# The PyTorch path: QuantizedModel forward / FP model forward", "",
             f"{rows[0]['calls']} calls per round (DDIM-{args.steps} trajectories of {args.samples} samples), "
             f"median of {args.repeats} interleaved rounds, {args.threads} threads; ratios measured in one run.", "",
             "| model | recipe | weights cached | bit-exact | " + " | ".join(cols) + " |",
             "|---|---|---|---|" + "---|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['recipe']} | {r['weights_cached']} | {r['bit_exact']} | "
                     + " | ".join(f"{r['ratio'][c]:.2f}×" for c in cols) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
