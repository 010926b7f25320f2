"""One denoiser step of a DiT-XL/2-size model: fp16 PyTorch vs stepq's CuPy kernels (W8A8, W4A16,
ternary) vs the W8A8 ONNX file on ONNX Runtime's CUDA provider.

    python benchmarks/cuda_dit_step.py [--batch 2] [--out docs/results/cuda_dit_step.json]   # CUDA device
    python benchmarks/cuda_dit_step.py --dry-run        # a 1-block, hidden-16 DiT through the same code, CPU

Model: diffusers DiTTransformer2DModel with DiT-XL/2's config (28 blocks, 16 heads × 72, patch 2,
32×32×4 latents, 1000 classes), random weights. Each stepq model is compiled on the CPU (calibration:
2 batches of 2 at t = 900, 100), lowered with the cupy backend, moved to the device in fp16 and timed
(median of CUDA-event timings after warm-up) at one timestep. Reported: ms, speed-up over fp16, the
output's relative L2 distance to the fp16 model's, the weight bytes.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from cuda_kernels import time_us
from cuda_partition import TERNARY, W4A16, dit_inputs
from diffusers import DiTTransformer2DModel

import stepq
from stepq.backends import get_backend

warnings.filterwarnings("ignore")
BE = get_backend("cupy")


def time_ms(fn, iters: int) -> float:
    """Median CUDA-event time of ``fn`` after warm-up (benchmarks/cuda_kernels.time_us), in ms."""
    return time_us(fn, iters) / 1e3


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--out", default="docs/results/cuda_dit_step.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = dict(num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=8) if args.dry_run else \
        dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=32)
    model = DiTTransformer2DModel(in_channels=4, out_channels=8, patch_size=2, num_embeds_ada_norm=1000, **cfg).eval()
    device = "cpu" if args.dry_run else "cuda"
    x = dit_inputs(model.config, args.batch, 500, 7, 1000)

    def on_device(d: dict, half: bool) -> dict:
        return {k: (v.to(device).half() if half and v.is_floating_point() else v.to(device))
                if isinstance(v, torch.Tensor) else v for k, v in d.items()}

    rows = []
    half = not args.dry_run
    fp = copy.deepcopy(model).to(device)
    fp = fp.half() if half else fp
    xd = on_device(x, half)  # the inputs already on the device: the timings are the model's alone
    with torch.no_grad():
        y_fp = fp(**xd)[0]
        if not args.dry_run:
            ms = time_ms(lambda fp=fp: fp(**xd), args.iters)
            rows.append({"model": "fp16 PyTorch", "ms": round(ms, 2), "speedup": 1.0, "rel_l2_vs_fp16": 0.0})
    base = rows[0]["ms"] if rows else None
    del fp
    qm_w8a8 = None
    for recipe in ("w8a8", W4A16, TERNARY):
        name = recipe if isinstance(recipe, str) else recipe.name
        t0 = time.perf_counter()
        calib = [dit_inputs(model.config, 2, 900, 1, 1000), dit_inputs(model.config, 2, 100, 2, 1000)]
        qm = stepq.quantize(model, calib[0], recipe, calibration=calib, progress=False)
        compile_s = time.perf_counter() - t0
        cm = BE.model(qm, device=device)
        if half:
            cm.gm.half()
        with torch.no_grad():
            y = cm(**xd)[0]
            row = {"model": f"stepq cupy {name}", "compile_s": round(compile_s, 1), "counts": cm.counts,
                   "weight_MB": round(qm.weight_bytes() / 2**20, 1), "rel_l2_vs_fp16": round(rel(y, y_fp), 4)}
            if not args.dry_run:
                ms = time_ms(lambda cm=cm: cm(**xd), args.iters)
                row.update(ms=round(ms, 2), speedup=round(base / ms, 3))
        rows.append(row)
        print(row, flush=True)
        if name == "w8a8":
            qm_w8a8 = qm
        del cm
    if not args.no_onnx and qm_w8a8 is not None:
        import onnxruntime as ort

        import stepq.backends.onnx as sx

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if not args.dry_run else ["CPUExecutionProvider"]
        with tempfile.TemporaryDirectory() as d:
            qm_w8a8.export("onnx", Path(d) / "dit.onnx")
            sess = sx.load(Path(d) / "dit.onnx", providers=providers)
            y = torch.as_tensor(sess(**x)[0] if isinstance(sess(**x), (list, tuple)) else sess(**x))
            row = {"model": "ONNX W8A8 " + providers[0], "rel_l2_vs_fp16": round(rel(y.to(y_fp.device), y_fp), 4),
                   "ort": ort.__version__}
            if not args.dry_run:
                t = []
                for i in range(args.iters + 3):
                    t0 = time.perf_counter()
                    sess(**x)
                    if i >= 3:
                        t.append((time.perf_counter() - t0) * 1e3)
                row.update(ms=round(statistics.median(t), 2), speedup=round(base / statistics.median(t), 3),
                           note="host inputs and outputs included")
            rows.append(row)
            print(row, flush=True)
    if not args.dry_run:
        print("\n| model | ms | × fp16 | rel. L2 vs fp16 |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r.get('ms', '-')} | {r.get('speedup', '-')} | {r['rel_l2_vs_fp16']} |")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "batch": args.batch, "rows": rows}, indent=1) + "\n")
    else:
        print(f"dry run: {len(rows)} rows")


if __name__ == "__main__":
    main()
