"""Wall time and peak memory of stepq's compile steps on a DiT-XL/2-size DiTTransformer2DModel.

Config: depth 28, 16 heads x 72 = hidden 1152, patch 2, 32x32x4 input, 1000 classes (diffusers'
class: 749.8M parameters, the per-block timestep/class embedders included), random weights.
Steps timed: capture (torch.export), prepare (annotate + quantizers), calibrate (2 batches of 2 at two
timesteps: the compile path, not a quality setting), convert (integer weights + report); optionally
the ONNX export. Peak memory is the process's peak resident set size (VmHWM).

    python benchmarks/compile_dit_xl.py [--recipe w8a8] [--onnx out/dit_xl.onnx]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import warnings
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel

import stepq

warnings.filterwarnings("ignore")


def peak_rss_gb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def current_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="w8a8")
    ap.add_argument("--onnx", default=None, help="also export ONNX to this path")
    ap.add_argument("--translator", default="auto", choices=["auto", "direct", "torch.onnx"])
    ap.add_argument("--out", default="docs/results/compile_dit_xl.json")
    args = ap.parse_args()

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                  num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000).eval()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f}M params, built in {build_s:.1f}s, RSS {current_rss_gb():.2f} GB")

    def inputs(b, t, seed):
        g = torch.Generator().manual_seed(seed)
        return {"hidden_states": torch.randn(b, 4, 32, 32, generator=g), "timestep": torch.full((b,), t),
                "class_labels": torch.randint(0, 1000, (b,), generator=g), "return_dict": False}

    rss_before = current_rss_gb()
    times: dict[str, float] = {}
    stages: dict[str, float] = {}
    t = time.perf_counter()
    prog = stepq.capture(model, inputs(2, 500, 0))
    times["capture_s"] = time.perf_counter() - t
    t = time.perf_counter()
    prog = stepq.prepare(prog, args.recipe, inplace=True)
    times["prepare_s"] = time.perf_counter() - t
    t = time.perf_counter()
    stepq.calibrate(prog, [inputs(2, 900, 1), inputs(2, 100, 2)], progress=False)
    times["calibrate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    qm = stepq.convert(prog, inplace=True)
    times["convert_s"] = time.perf_counter() - t
    times["capture_to_convert_s"] = sum(times.values())
    if args.onnx:
        t = time.perf_counter()
        res = qm.export_onnx(args.onnx, translator=args.translator)
        times["onnx_export_s"] = time.perf_counter() - t
        times["to_onnx_file_s"] = times["capture_to_convert_s"] + times["onnx_export_s"]
        stages = {f"onnx_{k}": round(v, 2) for k, v in res.stages.items()}
        stages["onnx_translator"] = res.translator  # type: ignore[assignment]
        stages["onnx_file_GB"] = round(res.file_bytes / 1024**3, 3)
    result = {
        "model": "DiTTransformer2DModel depth 28, hidden 1152, 16 heads, patch 2, 32x32x4",
        "params_M": round(n_params / 1e6, 1),
        "recipe": args.recipe,
        **{k: round(v, 2) for k, v in times.items()},
        **stages,
        "peak_rss_GB": round(peak_rss_gb(), 2),
        "rss_before_capture_GB": round(rss_before, 2),
        "fp32_weights_GB": round(n_params * 4 / 1024**3, 2),
        "quantized_bytes_GB": round(qm.weight_bytes() / 1024**3, 3),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
