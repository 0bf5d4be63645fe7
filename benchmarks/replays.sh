#!/usr/bin/env bash
# Every replay the README quotes, into benchmarks/replays/<name>/ (about 70 minutes on 2 cores).
# Usage: benchmarks/replays.sh [name ...]   (no name: all of them; two run at a time)
set -euo pipefail
cd "$(dirname "$0")/.."
T=.venv/bin/throttllem
OUT=benchmarks/replays
COMMON=(--slo mlperf-server --start 600 --duration 300 --loads 0.5,0.9)
ALL_POLICIES=max,static:750,static:900,static:1050,reactive,throttllem,oracle
SOURCED_POLICIES=max,static:900,static:1050,reactive,throttllem,oracle  # A100: nothing below 855 MHz
CODE=(--trace azure-code --chunked-context --max-num-tokens 512)
CONV=(--trace azure-conv)
A80=(--gpu a100-sxm4-80gb --model llama3-8b --tp 1)
A40=(--gpu a100-sxm4-40gb --model llama2-13b --tp 1)

run() {  # name, then replay arguments
  local name=$1; shift
  rm -rf "$OUT/$name"
  "$T" replay "$@" "${COMMON[@]}" --out "$OUT/$name" --json > /dev/null
  echo "$name done"
}

declare -A JOBS=(
  [main-conv-a100-sxm4-80gb-llama3-8b]="${CONV[*]} ${A80[*]} --policies $ALL_POLICIES"
  [sourced-conv-a100-sxm4-80gb-llama3-8b]="${CONV[*]} ${A80[*]} --policies $SOURCED_POLICIES --clock-range sourced"
  [main-conv-a100-sxm4-40gb-llama2-13b]="${CONV[*]} ${A40[*]} --policies $ALL_POLICIES"
  [sourced-conv-a100-sxm4-40gb-llama2-13b]="${CONV[*]} ${A40[*]} --policies $SOURCED_POLICIES --clock-range sourced"
  [main-code-a100-sxm4-80gb-llama3-8b]="${CODE[*]} ${A80[*]} --policies $ALL_POLICIES"
  [sourced-code-a100-sxm4-80gb-llama3-8b]="${CODE[*]} ${A80[*]} --policies $SOURCED_POLICIES --clock-range sourced"
  [main-code-a100-sxm4-40gb-llama2-13b]="${CODE[*]} ${A40[*]} --policies $ALL_POLICIES"
  [sourced-code-a100-sxm4-40gb-llama2-13b]="${CODE[*]} ${A40[*]} --policies $SOURCED_POLICIES --clock-range sourced"
  [lenerr-conv-a100-sxm4-80gb-llama3-8b]="${CONV[*]} ${A80[*]} --policies max,throttllem --length-error 0,15,30"
  [lenerr-conv-a100-sxm4-40gb-llama2-13b]="${CONV[*]} ${A40[*]} --policies max,throttllem --length-error 0,15,30"
  [lenerr-code-a100-sxm4-80gb-llama3-8b]="${CODE[*]} ${A80[*]} --policies max,throttllem --length-error 0,15,30"
  [guard-conv]="${CONV[*]} ${A80[*]} --policies max,throttllem --ips-optimism 15"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${!JOBS[@]}")
for name in "${names[@]}"; do
  [ -n "${JOBS[$name]:-}" ] || { echo "unknown replay $name; known: ${!JOBS[*]}" >&2; exit 2; }
  # shellcheck disable=SC2086  # the job's arguments are words
  run "$name" ${JOBS[$name]} &
  while [ "$(jobs -rp | wc -l)" -ge 2 ]; do wait -n; done
done
wait
