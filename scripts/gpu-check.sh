#!/usr/bin/env bash
# The checks that need a CUDA device, in one run (each step has a timeout; 8 minutes at most in all):
#   1. the gpu-marked tests: every kernel against its CPU emulation (bit for bit where the emulation
#      follows the kernel's order), no host synchronisation, lowered models against the reference;
#   2. benchmarks/cuda_kernels.py: GEMV bandwidth vs the device's peak and GEMM vs torch fp16 at
#      DiT-XL/2's shapes (1152→1152, 1152→4608, 4608→1152; M = 1, 2, 8, 32, 256);
#   3. benchmarks/cuda_dit_step.py: one denoiser step of a DiT-XL/2-size model, fp16 PyTorch vs stepq
#      cupy at W8A8, W4A16 and ternary, and the W8A8 ONNX file on ONNX Runtime's CUDA provider.
# Results go to $OUT (default ./gpu-check-out): the pytest log, two JSON files, the tables in summary.md.
# Needs: a CUDA build of torch, cupy-cuda13x (or 12x), onnxruntime-gpu (pip install -e ".[gpu]").
#
#   OUT=/tmp/gpu scripts/gpu-check.sh            # PYTHON=... to pick the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - <<'PY'
import sys, torch
from stepq.cuda import runtime
if not runtime.device_available():
    try:
        runtime.require_device()
    except Exception as e:
        sys.exit(f"gpu-check: no usable CUDA device: {e}")
print(f"gpu-check: {torch.cuda.get_device_name()}, torch {torch.__version__}")
PY

status=0
echo "== 1/3 gpu tests"
timeout 180 "$PYTHON" -m pytest tests/test_cuda_gpu.py -m gpu -q -p no:cacheprovider -x \
    --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log" | tail -5 || status=1

echo "== 2/3 kernel benchmark"
timeout 90 "$PYTHON" benchmarks/cuda_kernels.py --out "$OUT/cuda_kernels.json" 2>&1 | tee "$OUT/cuda_kernels.md" || status=1

echo "== 3/3 DiT-XL/2 step"
(cd benchmarks && timeout 210 "$PYTHON" cuda_dit_step.py --out "../$OUT/cuda_dit_step.json") 2>&1 \
    | grep -v "Failed to load\|Unable to import" | tee "$OUT/cuda_dit_step.md" || status=1

{ echo "# gpu-check"; echo; cat "$OUT/cuda_kernels.md"; echo; grep '^|' "$OUT/cuda_dit_step.md" || true; } > "$OUT/summary.md"
echo "gpu-check: done (status $status), results in $OUT"
exit $status
