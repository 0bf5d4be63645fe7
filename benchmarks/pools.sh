#!/usr/bin/env bash
# Every pool replay the README quotes, into benchmarks/pools/<name>/ (about 35 minutes on 2 cores).
# Usage: benchmarks/pools.sh [name ...]   (no name: all of them; two run at a time)
set -euo pipefail
cd "$(dirname "$0")/.."
T=.venv/bin/throttllem
OUT=benchmarks/pools
POOL=(--gpu a100-sxm4-40gb --model llama2-13b --slo mlperf-server)
SIZES=(--sizes 1,2,4)
CODE=(--trace azure-code --chunked-context --max-num-tokens 512)
LENERR=(--policies fixed:max,fixed:throttllem,autoscale:throttllem --length-error 0,30)

run() {  # name, then replay arguments
  local name=$1; shift
  rm -rf "${OUT:?}/$name"
  "$T" replay "$@" "${POOL[@]}" --out "$OUT/$name" --json > /dev/null
  echo "$name done"
}

declare -A JOBS=(
  [conv-a100-sxm4-40gb-llama2-13b]="--trace azure-conv ${SIZES[*]}"
  [code-a100-sxm4-40gb-llama2-13b]="${CODE[*]} ${SIZES[*]}"
  [code-tp2-tp4-a100-sxm4-40gb-llama2-13b]="${CODE[*]} --sizes 2,4"
  [lenerr-conv-a100-sxm4-40gb-llama2-13b]="--trace azure-conv ${SIZES[*]} ${LENERR[*]}"
  [lenerr-code-a100-sxm4-40gb-llama2-13b]="${CODE[*]} ${SIZES[*]} ${LENERR[*]}"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${!JOBS[@]}")
for name in "${names[@]}"; do
  [ -n "${JOBS[$name]:-}" ] || { echo "unknown pool replay $name; known: ${!JOBS[*]}" >&2; exit 2; }
  # shellcheck disable=SC2086  # the job's arguments are words
  run "$name" ${JOBS[$name]} &
  while [ "$(jobs -rp | wc -l)" -ge 2 ]; do wait -n; done
done
wait
