#!/usr/bin/env bash
# Run the shared suite for each named backend on a GPU machine whose Python already holds
# torch (and triton / cupy): installs the packages in place without touching any registry.
#   scripts/gpu_check.sh [backend ...]        (default: reference cuda triton cupy)
# Logs and JUnit XML go to $OUT (or ./gpu-check-logs); a summary table prints last.
# SUITE_TESTS picks test files or node ids (default: tests), SUITE_TIMEOUT limits each run.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check-logs}; mkdir -p "$out"
backends=("$@"); [ ${#backends[@]} -gt 0 ] || backends=(reference cuda triton cupy)

folders=(packages/core)
for b in "${backends[@]}"; do [ -d "packages/backend_$b" ] && folders+=("packages/backend_$b"); done
if [ -n "${GPU_CHECK_NO_INSTALL:-}" ]; then :  # the caller installed them (parallel runs)
elif ! python3 -m pip install -q --no-deps --no-build-isolation --no-index \
     $(printf -- '-e %s ' "${folders[@]}") >"$out/install.log" 2>&1; then
  echo "pip install failed (see $out/install.log)"; tail -5 "$out/install.log"; exit 1
fi
python3 -m fused3d info | tee "$out/info.txt"

summary=()
for b in "${backends[@]}"; do
  log="$out/suite-$b.log"
  FUSED3D_BACKEND=$b timeout "${SUITE_TIMEOUT:-900}" python3 -m pytest ${SUITE_TESTS:-tests} -q -p no:cacheprovider \
      --junitxml="$out/suite-$b.xml" >"$log" 2>&1
  code=$?
  summary+=("$(printf '%-10s exit %-3s %s' "$b" "$code" "$(tail -n 1 "$log")")")
  grep -E "^(FAILED|ERROR)" "$log" | head -n 15
done
echo "== suite summary =="
printf '%s\n' "${summary[@]}"
