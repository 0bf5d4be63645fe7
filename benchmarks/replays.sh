#!/usr/bin/env bash
# Every replay the README quotes, into benchmarks/replays/<name>/ (peers-*: about 40 minutes on 2 cores).
# Usage: benchmarks/replays.sh [name ...]   (no name: all of them; two run at a time)
set -euo pipefail
cd "$(dirname "$0")/.."
T=.venv/bin/throttllem
OUT=benchmarks/replays
COMMON=(--slo mlperf-server --start 600 --loads 0.5,0.9)
LONG=(--duration 300)
SHORT=(--duration 150)  # the peer replays: seven policies, the bound and hindsight at each load
ALL_POLICIES=max,static:750,static:900,static:1050,reactive,throttllem,throttllem-exact
SOURCED_POLICIES=max,static:900,static:1050,reactive,throttllem,throttllem-exact  # A100: nothing below 855 MHz
# Every peer beside throttllem; the length predictor is told the trace's class, as a deployment is.
PEERS_CONV=max,throttllem:learned:conv,throttllem-exact,ecofreq,greenllm,powercap:250,dynamollm:learned:conv
PEERS_CODE=max,throttllem:learned:code,throttllem-exact,ecofreq,greenllm,powercap:250,dynamollm:learned:code
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
  [peers-conv-a100-sxm4-80gb-llama3-8b]="${SHORT[*]} ${CONV[*]} ${A80[*]} --policies $PEERS_CONV"
  [peers-code-a100-sxm4-80gb-llama3-8b]="${SHORT[*]} ${CODE[*]} ${A80[*]} --policies $PEERS_CODE"
  [peers-burst-a100-sxm4-80gb-llama3-8b]="${SHORT[*]} --trace burst(azure-conv,9) ${A80[*]} --policies $PEERS_CONV"
  [peers-gamma-a100-sxm4-80gb-llama3-8b]="${SHORT[*]} --trace gamma(azure-conv,4) ${A80[*]} --policies $PEERS_CONV"
  [peers-mix-a100-sxm4-80gb-llama3-8b]="${SHORT[*]} --trace mix(azure-conv,azure-code) ${A80[*]} --policies $PEERS_CONV"
  [peers-shift-a100-sxm4-80gb-llama3-8b]="${SHORT[*]} --trace shift(azure-conv,137) ${A80[*]} --policies $PEERS_CONV"
  [peers-conv-a100-sxm4-40gb-llama2-13b]="${SHORT[*]} ${CONV[*]} ${A40[*]} --policies $PEERS_CONV"
  [peers-code-a100-sxm4-40gb-llama2-13b]="${SHORT[*]} ${CODE[*]} ${A40[*]} --policies $PEERS_CODE"
  [main-conv-a100-sxm4-80gb-llama3-8b]="${LONG[*]} ${CONV[*]} ${A80[*]} --policies $ALL_POLICIES"
  [sourced-conv-a100-sxm4-80gb-llama3-8b]="${LONG[*]} ${CONV[*]} ${A80[*]} --policies $SOURCED_POLICIES --clock-range sourced"
  [main-conv-a100-sxm4-40gb-llama2-13b]="${LONG[*]} ${CONV[*]} ${A40[*]} --policies $ALL_POLICIES"
  [sourced-conv-a100-sxm4-40gb-llama2-13b]="${LONG[*]} ${CONV[*]} ${A40[*]} --policies $SOURCED_POLICIES --clock-range sourced"
  [main-code-a100-sxm4-80gb-llama3-8b]="${LONG[*]} ${CODE[*]} ${A80[*]} --policies $ALL_POLICIES"
  [sourced-code-a100-sxm4-80gb-llama3-8b]="${LONG[*]} ${CODE[*]} ${A80[*]} --policies $SOURCED_POLICIES --clock-range sourced"
  [main-code-a100-sxm4-40gb-llama2-13b]="${LONG[*]} ${CODE[*]} ${A40[*]} --policies $ALL_POLICIES"
  [sourced-code-a100-sxm4-40gb-llama2-13b]="${LONG[*]} ${CODE[*]} ${A40[*]} --policies $SOURCED_POLICIES --clock-range sourced"
  [lenerr-conv-a100-sxm4-80gb-llama3-8b]="${LONG[*]} ${CONV[*]} ${A80[*]} --policies max,throttllem --length-error 0,15,30"
  [lenerr-conv-a100-sxm4-40gb-llama2-13b]="${LONG[*]} ${CONV[*]} ${A40[*]} --policies max,throttllem --length-error 0,15,30"
  [lenerr-code-a100-sxm4-80gb-llama3-8b]="${LONG[*]} ${CODE[*]} ${A80[*]} --policies max,throttllem --length-error 0,15,30"
  [guard-conv]="${LONG[*]} ${CONV[*]} ${A80[*]} --policies max,throttllem --ips-optimism 15"
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
