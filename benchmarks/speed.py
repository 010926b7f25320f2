"""ONNX Runtime latency: FP32 ONNX vs stepq w8a8 vs stepq w8a8-tdq vs ORT quantize_static vs PT2E W8A8.

Models (random weights, built from a config):
* DiT-S/2 size: DiTTransformer2DModel, hidden 384 (6 heads × 64), depth 12, patch 2, 32×32×4 input,
  1000 classes;
* DDPM-CIFAR size: UNet2DModel, block_out_channels (128, 256, 256, 256), 2 layers per block,
  attention at 16×16, 32×32×3 input.

Variants, each an ONNX file run by onnxruntime (CPU, every graph optimisation on, the same thread count):
* ``fp32``: the FP model exported with the dynamo exporter (opset 21);
* ``stepq w8a8``: ``qm.export_onnx`` of stepq's w8a8 preset;
* ``stepq w8a8-tdq``: the same model with per-timestep activation tables (``--tdq tables``: synthetic
  tables, the graph form TDQ produces, so the latency is the same; ``--tdq preset``: the fitted preset);
* ``ort quantize_static``: ORT's QDQ quantization (per-channel int8 weights, uint8 activations, MinMax)
  of the FP32 ONNX file;
* ``pt2e w8a8``: torchao PT2E with the XNNPACK-style quantizer (X86's placement gives ORT no integer
  kernels on transformers, FACTS Q4), converted and exported to ONNX.

Every variant is calibrated on the same inputs (denoiser inputs at spread timesteps). Timing: the raw
``session.run`` of pre-built feeds, ``--repeats`` rounds that run every variant once in turn
(interleaved, so load changes hit all of them alike), median per variant. Run it on an idle machine.

    python benchmarks/speed.py [--models dit-s,ddpm-cifar] [--batches 2,8] [--repeats 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stepq
import stepq.backends.onnx as sx
from stepq.testing.onnx_cases import attach_synthetic_tables

warnings.filterwarnings("ignore")


def dit_s() -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8,
                                 num_layers=12, sample_size=32, patch_size=2, num_embeds_ada_norm=1000).eval()


def ddpm_cifar() -> torch.nn.Module:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                       layers_per_block=2,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")).eval()


def dit_inputs(batch: int, t: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, 32, 32, generator=g), "timestep": torch.full((batch,), t),
            "class_labels": torch.randint(0, 1000, (batch,), generator=g), "return_dict": False}


def unet_inputs(batch: int, t: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, 3, 32, 32, generator=g), "timestep": torch.full((batch,), t),
            "return_dict": False}


MODELS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[int, int, int], dict[str, Any]]]] = {
    "dit-s": (dit_s, dit_inputs),
    "ddpm-cifar": (ddpm_cifar, unet_inputs),
}


def file_mb(path: Path) -> float:
    extra = path.with_name(path.name + ".data")
    return (path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)) / 1e6


VARIANT_FILES = {"fp32": "fp32", "stepq w8a8": "w8a8", "stepq w8a8-tdq": "w8a8-tdq", "ort quantize_static": "qs",
                 "pt2e w8a8": "pt2e"}


def _ort_ok(path: Path) -> str | None:
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), sx.session_options(threads=1), providers=["CPUExecutionProvider"])
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return None


def build_variants(name: str, tmp: Path, calib_n: int, tdq: str, peers: bool, reuse: bool) -> dict[str, Path]:
    from peers import export_fp_onnx, ort_quantize_static, pt2e_w8a8

    if reuse:
        found = {k: tmp / f"{name}-{v}.onnx" for k, v in VARIANT_FILES.items() if (tmp / f"{name}-{v}.onnx").exists()}
        if {"fp32", "stepq w8a8", "stepq w8a8-tdq"} <= found.keys():
            print(f"  reusing {sorted(found)} from {tmp}", flush=True)
            return {k: p for k, p in found.items() if _ort_ok(p) is None}
    build, inputs = MODELS[name]
    model = build()
    calib = [inputs(2, t, i) for i, t in enumerate(np.linspace(980, 20, calib_n).astype(int).tolist())]
    paths: dict[str, Path] = {}
    t0 = time.perf_counter()
    paths["fp32"] = export_fp_onnx(model, calib[0], tmp / f"{name}-fp32.onnx")
    print(f"  fp32 export {time.perf_counter() - t0:.0f}s", flush=True)

    t0 = time.perf_counter()
    prog = stepq.calibrate(stepq.prepare(stepq.capture(model, calib[0]), "w8a8"), calib, progress=False)
    qm = stepq.convert(prog, report=False)
    qm.export_onnx(tmp / f"{name}-w8a8.onnx")
    paths["stepq w8a8"] = tmp / f"{name}-w8a8.onnx"
    print(f"  stepq w8a8 {time.perf_counter() - t0:.0f}s", flush=True)

    t0 = time.perf_counter()
    if tdq == "preset":
        qt = stepq.quantize(model, calib[0], "w8a8-tdq", calibration=calib, progress=False)
    else:
        attach_synthetic_tables(prog)
        qt = stepq.convert(prog, report=False)
    qt.export_onnx(tmp / f"{name}-w8a8-tdq.onnx")
    paths["stepq w8a8-tdq"] = tmp / f"{name}-w8a8-tdq.onnx"
    print(f"  stepq w8a8-tdq ({tdq}) {time.perf_counter() - t0:.0f}s", flush=True)

    if peers:
        t0 = time.perf_counter()
        try:
            qs = ort_quantize_static(paths["fp32"], tmp / f"{name}-qs.onnx", calib)
            why = _ort_ok(qs)
            if why is None:
                paths["ort quantize_static"] = qs
            else:
                print(f"  quantize_static model rejected by ORT: {why}")
        except Exception as e:
            print(f"  quantize_static FAILED: {type(e).__name__}: {e}")
        print(f"  quantize_static {time.perf_counter() - t0:.0f}s", flush=True)
        # XNNPACK-style placement first (output Q/DQ: ORT can fuse it); X86 if ORT rejects that file
        for quantizer in ("xnnpack", "x86"):
            t0 = time.perf_counter()
            try:
                gm = pt2e_w8a8(model, calib[0], calib, quantizer=quantizer)
                path = export_fp_onnx(gm, calib[0], tmp / f"{name}-pt2e.onnx")
                why = _ort_ok(path)
            except Exception as e:
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            print(f"  pt2e ({quantizer}) {time.perf_counter() - t0:.0f}s: {why or 'ok'}", flush=True)
            if why is None:
                paths["pt2e w8a8"] = path
                break
    return paths


def sessions(paths: dict[str, Path], threads: int) -> dict[str, Any]:
    import onnxruntime as ort

    out = {}
    for k, p in paths.items():
        if k.startswith("stepq"):
            out[k] = sx.load(p, threads=threads)
        else:
            opts = sx.session_options(threads=threads)
            out[k] = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
    return out


def feeds_for(sess: Any, kw: dict[str, Any]) -> tuple[Callable[[], Any], dict[str, np.ndarray]]:
    if isinstance(sess, sx.OnnxModel):
        f = sess.feeds(sess.bind((), kw))
        return (lambda: sess.run_raw(f)), f
    f = {}
    for i in sess.get_inputs():
        v = kw[i.name]
        f[i.name] = v.numpy().astype(np.int64 if i.type == "tensor(int64)" else np.float32)
    return (lambda: sess.run(None, f)), f


def time_interleaved(runs: dict[str, Callable[[], Any]], repeats: int, warmup: int = 3) -> dict[str, float]:
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="dit-s,ddpm-cifar")
    ap.add_argument("--batches", default="2,8")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--calib", type=int, default=8, help="calibration batches (batch 2, spread timesteps)")
    ap.add_argument("--tdq", default="tables", choices=["tables", "preset"])
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--workdir", default=None, help="keep the ONNX files here")
    ap.add_argument("--reuse", action="store_true", help="time the files already in --workdir")
    ap.add_argument("--out", default="docs/results/speed.md")
    args = ap.parse_args()
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    print(f"load average at start: {' '.join(load)}; threads {args.threads}", flush=True)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(args.workdir or tmpdir)
        tmp.mkdir(parents=True, exist_ok=True)
        for name in args.models.split(","):
            print(f"{name}: building variants", flush=True)
            paths = build_variants(name, tmp, args.calib, args.tdq, not args.no_peers, args.reuse)
            counts = {k: sx.count_kernels(p) for k, p in paths.items()}
            sess = sessions(paths, args.threads)
            _, inputs = MODELS[name]
            for batch in (int(b) for b in args.batches.split(",")):
                kw = inputs(batch, 500, 123)
                runs = {k: feeds_for(s, kw)[0] for k, s in sess.items()}
                med = time_interleaved(runs, args.repeats)
                for k, ms in med.items():
                    c = counts[k]
                    results.append({"model": name, "batch": batch, "variant": k, "ms": ms,
                                    "speedup vs fp32": med["fp32"] / ms, "MB": file_mb(paths[k]),
                                    "int kernels": c.n_integer, "float kernels": c.n_float,
                                    "quantized in float": len(c.quantized_in_float)})
                tdq_cost = med["stepq w8a8-tdq"] / med["stepq w8a8"] - 1
                vs_qs = med.get("ort quantize_static", float("nan")) / med["stepq w8a8-tdq"]
                print(f"  batch {batch}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items())
                      + f"; tdq gather cost {100 * tdq_cost:+.1f}%, quantize_static/stepq-tdq {vs_qs:.2f}", flush=True)
                results.append({"model": name, "batch": batch, "variant": "(ratios)", "tdq gather cost %": 100 * tdq_cost,
                                "quantize_static / stepq-tdq": vs_qs,
                                "fp32 / stepq-tdq": med["fp32"] / med["stepq w8a8-tdq"]})
            del sess
    end_load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    lines = ["| model | batch | variant | median ms | speedup vs FP32 | file MB | int kernels | float kernels | quantized in float |",
             "|---|---|---|---|---|---|---|---|---|"]
    ratios = ["| model | batch | FP32 / stepq w8a8-tdq | quantize_static / stepq w8a8-tdq | timestep Gather cost (tdq vs w8a8) |",
              "|---|---|---|---|---|"]
    for r in results:
        if r["variant"] == "(ratios)":
            ratios.append(f"| {r['model']} | {r['batch']} | {r['fp32 / stepq-tdq']:.2f}x | "
                          f"{r['quantize_static / stepq-tdq']:.2f}x | {r['tdq gather cost %']:+.1f}% |")
        else:
            lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['ms']:.1f} | {r['speedup vs fp32']:.2f}x | "
                         f"{r['MB']:.1f} | {r['int kernels']} | {r['float kernels']} | {r['quantized in float']} |")
    text = "\n".join(lines) + "\n\n" + "\n".join(ratios)
    print(text)
    header = (f"# ONNX Runtime latency (generated by benchmarks/speed.py)\n\nonnxruntime "
              f"{__import__('onnxruntime').__version__}, {args.threads} threads, {args.repeats} interleaved rounds, "
              f"median. Load average at start {' '.join(load)}, at end {' '.join(end_load)}. TDQ tables: {args.tdq}.\n\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + text + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
