#!/usr/bin/env bash
# Measure and verify on a lent H100 in device calls of under 10 minutes each:
#   FUSED3D_GIT_COMMIT=<sha> bash scripts/h100_run.sh bench    # ~6 min: the benchmark
#   bash scripts/h100_run.sh suites                            # ~6 min: the suite per backend
# bench: batch 16 with every implementation (torch.compile max-autotune included), all
# precisions and modes; then batches 1, 4, 64 with TF32 (merged into the same file).
# $OUT keeps at most three files (the device tool returns eight): bench_cuda.csv, .json and
# logs.tgz, which is rewritten after every stage so a run cut short still returns its logs.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-bench}
out=${OUT:-h100-run}; logs=$(mktemp -d); mkdir -p "$out"
export PYTHONUNBUFFERED=1
pack_logs() { tar czf "$out/logs.tgz" -C "$logs" . ; }

python3 -m pip install -q --no-deps --no-build-isolation --no-index -e packages/core \
  -e packages/backend_cuda -e packages/backend_triton -e packages/backend_cupy \
  >"$logs/install.log" 2>&1 || { tail -5 "$logs/install.log"; pack_logs; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$logs/gpu.txt"

case "$stage" in
  bench)
    main_s=${BENCH_MAIN_S:-330}; sweep_s=${BENCH_SWEEP_S:-180}
    timeout -s INT "$main_s" python3 -m fused3d.bench --out "$out" --batches 16 \
      --time-budget "$((main_s - 40))" 2>"$logs/bench-main.err" | tee "$logs/bench-main.txt"
    pack_logs
    timeout -s INT "$sweep_s" python3 -m fused3d.bench --out "$out" --batches 1,4,64 \
      --precisions tf32 --baselines eager,compile --merge --time-budget "$((sweep_s - 30))" \
      2>"$logs/bench-sweep.err" | tee "$logs/bench-sweep.txt"
    ;;
  suites)
    for backend in reference cuda triton cupy; do  # pack after each: a cut run keeps its logs
      OUT="$logs/$backend" SUITE_TIMEOUT=${SUITE_TIMEOUT:-130} bash scripts/gpu_check.sh "$backend" \
        | tail -n 2
      pack_logs
    done
    ;;
  *) echo "usage: $0 bench|suites" >&2; exit 2 ;;
esac
pack_logs
