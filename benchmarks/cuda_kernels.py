"""GEMV bandwidth and GEMM throughput of the CuPy kernels at DiT-XL/2's linear shapes.

    python benchmarks/cuda_kernels.py [--out docs/results/cuda_kernels.json]   # needs a CUDA device
    python benchmarks/cuda_kernels.py --dry-run                                # the operands + emulation, CPU

Shapes (K → N): 1152 → 1152 (attention projections), 1152 → 4608 (MLP up), 4608 → 1152 (MLP down);
rows M = 1, 2, 8, 32, 256. Per shape and M, median of CUDA-event timings (after warm-up) of:
torch fp16 F.linear (cuBLAS), stepq W8A8 (quantize + int8 GEMM + epilogue), W4A16 (int4, groups of
128), ternary base-3 and ternary 2-bit. Reported: µs, speed-up over fp16, and the achieved
bandwidth (weight bytes + activations + output / time) as a share of the device's peak HBM
bandwidth (2 · memory clock · bus width from cudaGetDeviceProperties, or $STEPQ_PEAK_GBPS).

Targets (issue #18): GEMV ≥ 70 % of peak for int4 and ternary at 4608 → 1152; W8A8 ≥ 1.5× fp16
at M ≥ 256.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from stepq.compiler import ops, ternary_ops
from stepq.cuda import emulate as E

SHAPES = [(1152, 1152), (1152, 4608), (4608, 1152)]
ROWS = [1, 2, 8, 32, 256]


def operands(k: int, n: int, device: str) -> dict:
    g = torch.Generator().manual_seed(k + n)
    w = torch.randn(n, k, generator=g) * 0.02
    wq8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    w8 = torch.zeros(E.pad_to(n, E.N_ALIGN), E.pad_to(k, E.K_ALIGN), dtype=torch.int8)
    w8[:n, :k] = wq8
    q4 = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    t3 = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    groups = -(-k // 128)
    d = {
        "fp16": w.half(),
        "w8a8": (w8, wq8.to(torch.int32).sum(1), torch.rand(n, generator=g) * 1e-3, torch.zeros(n),
                 torch.full((1000,), 0.02), torch.full((1000,), 128.0), torch.tensor([10])),
        "w4a16": (ops.pack(q4, 4, True), torch.rand(n * groups, generator=g) * 0.01, torch.zeros(n * groups),
                  "s4", groups, 128),
        "ternary-base3": (ternary_ops.pack_base3(t3), torch.full((n,), 0.02), torch.zeros(n), "base3", 1, 0),
        "ternary-2bit": (ops.pack(t3, 2, True), torch.full((n,), 0.02), torch.zeros(n), "s2", 1, 0),
    }
    return {key: (v.to(device) if isinstance(v, torch.Tensor) else
                  tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in v)) for key, v in d.items()}


def runner(kind: str, x: torch.Tensor, o: dict, k: int, n: int, impl):
    if kind == "fp16":
        return lambda: F.linear(x, o["fp16"])
    if kind == "w8a8":
        w8, rowsum, ws, b, s_tab, z_tab, idx = o["w8a8"]
        return lambda: impl.linear_w8a8(x, w8, rowsum, ws, b, s_tab, z_tab, idx, 0, 255, 128)
    packed, s, z, fmt, sn, gs = o[kind]
    return lambda: impl.linear_weight_only(x, packed, s, z, None, fmt, n, k, sn, gs)


def weight_bytes(kind: str, k: int, n: int) -> float:
    return {"fp16": 2 * n * k, "w8a8": n * k, "w4a16": n * k / 2 + 4 * n * -(-k // 128) * 2,
            "ternary-base3": n * k / 5, "ternary-2bit": n * k / 4}[kind]


def time_us(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def peak_gbps() -> float:
    if os.environ.get("STEPQ_PEAK_GBPS"):
        return float(os.environ["STEPQ_PEAK_GBPS"])
    import cupy

    p = cupy.cuda.runtime.getDeviceProperties(torch.cuda.current_device())
    return 2 * p["memoryClockRate"] * 1e3 * p["memoryBusWidth"] / 8 / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/results/cuda_kernels.json")
    ap.add_argument("--dry-run", action="store_true", help="build every operand and run the emulation at M=1 (CPU)")
    args = ap.parse_args()
    kinds = ["fp16", "w8a8", "w4a16", "ternary-base3", "ternary-2bit"]
    if args.dry_run:
        for k, n in SHAPES:
            o = operands(k, n, "cpu")
            x = torch.randn(1, k)
            for kind in kinds[1:]:
                y = runner(kind, x, o, k, n, E)()
                assert y.shape == (1, n) and torch.isfinite(y).all(), kind
        print(f"dry run: {len(SHAPES)} shapes x {len(kinds) - 1} kernels built and emulated at M=1")
        return
    from stepq.cuda import runtime

    runtime.require_device()
    peak = peak_gbps()
    rows = []
    print(f"device {torch.cuda.get_device_name()}, peak HBM {peak:.0f} GB/s (from device properties)")
    print("| K→N | M | kernel | µs | × fp16 | GB/s | % peak |\n|---|---|---|---|---|---|---|")
    for k, n in SHAPES:
        o = operands(k, n, "cuda")
        for m in ROWS:
            x = torch.randn(m, k, device="cuda").half()
            base = None
            for kind in kinds:
                us = time_us(runner(kind, x, o, k, n, runtime))
                base = us if kind == "fp16" else base
                gbs = (weight_bytes(kind, k, n) + 2 * m * (k + n)) / us / 1e3
                row = {"K": k, "N": n, "M": m, "kernel": kind, "us": round(us, 2), "speedup_vs_fp16": round(base / us, 3),
                       "GBps": round(gbs, 1), "pct_peak": round(100 * gbs / peak, 1)}
                rows.append(row)
                print(f"| {k}→{n} | {m} | {kind} | {us:.1f} | {base / us:.2f} | {gbs:.0f} | {100 * gbs / peak:.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "peak_GBps": peak, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
