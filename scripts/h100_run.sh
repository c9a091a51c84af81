#!/usr/bin/env bash
# One device call that measures and verifies everything (about 9 minutes on the H100):
# the benchmark (batch 16: every implementation incl. torch.compile max-autotune, all
# precisions and modes; then batches 1, 4, 64 with TF32), then the shared suite per backend.
# Results: $OUT/bench_cuda.csv|json, $OUT/suite-*.log; copy the bench files into plots/.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-h100-run}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e packages/core \
  -e packages/backend_cuda -e packages/backend_triton -e packages/backend_cupy \
  >"$out/install.log" 2>&1 || { tail -5 "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
timeout -s INT "${BENCH_MAIN_S:-180}" python3 -m fused3d.bench --out "$out" --batches 16 \
  --time-budget "$(( ${BENCH_MAIN_S:-180} - 25 ))" 2>"$out/bench-main.err" | tee "$out/bench-main.txt"
timeout -s INT "${BENCH_SWEEP_S:-90}" python3 -m fused3d.bench --out "$out" --batches 1,4,64 \
  --precisions tf32 --baselines eager,compile --merge \
  --time-budget "$(( ${BENCH_SWEEP_S:-90} - 20 ))" 2>"$out/bench-sweep.err" | tail -n 30
SUITE_TIMEOUT=${SUITE_TIMEOUT:-75} bash scripts/gpu_check.sh reference cuda triton cupy
# The device tool returns at most 8 files: keep the data, pack the logs.
(cd "$out" && tar czf logs.tgz --remove-files -- *.log *.xml *.txt *.err 2>/dev/null; ls)
