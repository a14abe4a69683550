#!/usr/bin/env bash
# One command on a fresh NVIDIA H100 / H200 (no network needed), about 8 minutes:
#   OUT=/path/to/results bash examples/gpu_check.sh
# Checks the Pallas kernels against the XLA reference on the device, times the GEMMs (W4A4 nvfp4 / int4,
# W4A16, XLA bf16 / fp8, jax.nn.scaled_dot_general nvfp4) at M=64 and M=4608, and a FLUX.1-dev-shaped
# forward (random weights, 1024x1024) in bf16 and NVFP4 W4A4.  Tables: $OUT/bench.md; logs beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
pip install --no-deps --no-build-isolation -q -e . >"$OUT/pip.log" 2>&1 || echo "pip install failed (see $OUT/pip.log); using the checkout on PYTHONPATH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/gpu.txt" 2>&1 || true
: >"$OUT/bench.md"
# kernels vs reference, GEMM timings, FLUX blocks; then the whole forward (longest compile) on its own budget
timeout 450 python -m pallas_kernels.bench --only check gemm flux --out "$OUT/bench.md" 2>&1 | tee "$OUT/bench.log"
timeout 120 python -m pallas_kernels.bench --only forward --out "$OUT/bench.md" 2>&1 | tee -a "$OUT/bench.log"
echo "results: $OUT/bench.md"
