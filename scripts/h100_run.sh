#!/usr/bin/env bash
# Measure and verify on a lent H100 in device calls of under 10 minutes each:
#   FUSED3D_GIT_COMMIT=<sha> bash scripts/h100_run.sh bench    # ~14 min: split with BENCH_PARTS
#   bash scripts/h100_run.sh suites                            # ~6 min: the suites, in parallel
#   SUITE_BACKENDS="reference cuda" bash scripts/h100_run.sh suites   # some backends only
#   bash scripts/h100_run.sh profile                           # ncu of the cuda/cupy kernels
#   bash scripts/h100_run.sh nox                               # nox -s bench -- --quick, plots
#     (nox from wheels in .whl/, carried; see plots/README.md)
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
    # Parts (BENCH_PARTS, default all three; each merges into bench_cuda.csv after the first,
    # and the first too when $OUT already holds bench_cuda.json from an earlier call):
    #   main: batch 16, TF32, every implementation incl. torch.compile max-autotune and the
#         backends as CUDA graphs;
    #   precisions: batch 16, IEEE fp32 and bf16, eager and torch.compile as baselines;
    #   sweep: batches 1, 4, 64, TF32, eager and torch.compile as baselines, CUDA graphs too.
    merge=(); [ -f "$out/bench_cuda.json" ] && merge=(--merge)  # continue an earlier call's file
    # Backends also timed as CUDA graphs (make_graphed_callables): their GPU time without the
    # host's per-call work, beside the eager rows (BENCH_GRAPHED="" for none).
    graphed=${BENCH_GRAPHED-cuda,cupy,triton}
    for part in ${BENCH_PARTS:-main precisions sweep}; do
      case "$part" in
        main) part_args=(--batches 16 --precisions tf32 --cudagraphs "$graphed")
              budget=${BENCH_MAIN_S:-380} ;;
        precisions) part_args=(--batches 16 --precisions fp32,bf16 --baselines eager,compile)
                    budget=${BENCH_PRECISIONS_S:-250} ;;
        sweep) part_args=(--batches 1,4,64 --precisions tf32 --baselines eager,compile
                          --cudagraphs "$graphed")
               budget=${BENCH_SWEEP_S:-300} ;;
        *) echo "unknown bench part $part" >&2; exit 2 ;;
      esac
      timeout -s INT "$budget" python3 -m fused3d.bench --out "$out" "${part_args[@]}" "${merge[@]}" \
        --time-budget "$((budget - 40))" 2>"$logs/bench-$part.err" | tee "$logs/bench-$part.txt" \
        | tail -n 30
      merge=(--merge)
      pack_logs
    done
    ;;
  suites)
    # One pytest process per backend, all at once (correctness only, no timings: sharing the
    # GPU is harmless and the wall time is the slowest suite's, triton's kernel compiles).
    # triton's suite compiles many kernels: its tests run round-robin in six processes (a
    # parametrized id with a space in it runs as its whole function).
    for backend in ${SUITE_BACKENDS:-reference cuda triton cupy}; do
      shards=(tests)
      if [ "$backend" = triton ]; then
        FUSED3D_BACKEND=triton python3 -m pytest tests --collect-only -q -p no:cacheprovider \
          2>/dev/null | grep '::' | sed -E 's/\[([^]]* [^]]*)?\]$//' | awk '!seen[$0]++' \
          >"$logs/triton-ids.txt"
        split -n r/6 -d "$logs/triton-ids.txt" "$logs/triton-shard-"
        shards=(); for f in "$logs"/triton-shard-*; do shards+=("$(tr '\n' ' ' <"$f")"); done
      fi
      for i in "${!shards[@]}"; do
        OUT="$logs/$backend-$i" GPU_CHECK_NO_INSTALL=1 SUITE_TIMEOUT=${SUITE_TIMEOUT:-500} \
          SUITE_TESTS="${shards[$i]}" bash scripts/gpu_check.sh "$backend" \
          >"$logs/gpu-check-$backend-$i.txt" 2>&1 &
      done
    done
    wait
    cat "$logs"/gpu-check-*.txt | grep -E "^(FAILED|ERROR)" | head -n 30
    echo "== suite summary =="; cat "$logs"/gpu-check-*.txt | grep -E " exit "
    ;;
  profile)
    # Hardware counters of one training step (after warm-up) per backend and precision,
    # clocks left alone. Not yet run in this form (it used to skip the first 5 launches).
    sections=(--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis
              --section SchedulerStats --section WarpStateStats --section Occupancy --section LaunchStats)
    for backend in ${PROFILE_BACKENDS:-cuda cupy}; do
      for tf32 in on off; do
        timeout 150 ncu --clock-control none --profile-from-start off -k regex:'parity|general' \
          "${sections[@]}" python3 scripts/profile_step.py "$backend" --tf32 "$tf32" \
          >"$logs/ncu-$backend-tf32$tf32.txt" 2>&1
        grep -E "^  [a-z_:<>, 0-9A-Z]+\(|Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy|No Eligible|Issue Slots Busy" \
          "$logs/ncu-$backend-tf32$tf32.txt" | head -n 60
        pack_logs
      done
    done
    ;;
  nox)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/nox-site .whl/*.whl \
      >"$logs/nox-install.log" 2>&1 || { tail -3 "$logs/nox-install.log"; pack_logs; exit 1; }
    export PYTHONPATH=/tmp/nox-site${PYTHONPATH:+:$PYTHONPATH}
    timeout -s INT 330 python3 -m nox --no-venv -s bench -- --quick --out "$logs/quick" 2>&1 | tee "$logs/nox-bench.txt" | tail -n 25
    python3 -m nox --no-venv -s plots -- --data "$logs/quick/bench_cuda_quick.csv" \
      2>&1 | tee "$logs/nox-plots.txt" | tail -n 8
    ;;
  *) echo "usage: $0 bench|suites|profile|nox" >&2; exit 2 ;;
esac
pack_logs
