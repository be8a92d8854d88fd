#!/usr/bin/env bash
# Runs every fuzz target for a fixed time, one after the other, with one libFuzzer job each, and
# prints one summary line per target (executions per second, coverage, corpus, crashes).
#
#   fuzz/run-all.sh [SECONDS] [TARGET...]     # default 60 s, all targets
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Each target starts
# from its checked-in seeds (`seeds/<target>/`) plus what earlier runs left in the ignored
# `corpus/<target>/`; crashes land in `artifacts/<target>/` of its fuzz crate, and the script
# exits non-zero if any target crashed. Logs go to fuzz/logs/<target>.log.
set -uo pipefail

secs=${1:-60}
shift || true
root=$(cd "$(dirname "$0")/.." && pwd)

# target -> fuzz crate directory (relative to the repository root)
declare -A crate=(
  [node_messages]=protocol/fuzz
  [client_messages]=protocol/fuzz
  [frame_header]=protocol/fuzz
  [input_datagram]=protocol/fuzz
  [openai_request]=protocol/fuzz
  [whep_offer]=fuzz
  [trickle_sdpfrag]=fuzz
  [config_load]=fuzz
)
all=(node_messages client_messages frame_header input_datagram openai_request whep_offer
  trickle_sdpfrag config_load)
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${all[@]}"); fi

mkdir -p "$root/fuzz/logs"
# Build each fuzz crate the selected targets need, once.
for dir in $(for t in "${targets[@]}"; do echo "${crate[$t]:?unknown target $t}"; done | sort -u); do
  (cd "$root/$dir" && cargo +nightly fuzz build -O) || exit 1
done

failed=0
printf '%-16s %6s %10s %8s %8s %12s %s\n' target secs execs/s cov ft corpus crashes
for t in "${targets[@]}"; do
  dir=$root/${crate[$t]:?unknown target $t}
  log=$root/fuzz/logs/$t.log
  mkdir -p "$dir/corpus/$t" "$dir/artifacts/$t"
  before=$(ls "$dir/artifacts/$t" | wc -l)
  (cd "$dir" && cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -timeout=10 -print_final_stats=1) >"$log" 2>&1
  rc=$?
  crashes=$(( $(ls "$dir/artifacts/$t" | wc -l) - before ))
  last=$(grep -E '^#[0-9]+' "$log" | tail -n 1)
  cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
  ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
  corp=$(sed -nE 's/.* corp: ([0-9]+\/[0-9]+[a-zA-Z]*).*/\1/p' <<<"$last")
  eps=$(sed -nE 's/^stat::average_exec_per_sec: *([0-9]+).*/\1/p' "$log" | tail -n 1)
  printf '%-16s %6s %10s %8s %8s %12s %s\n' "$t" "$secs" "${eps:-?}" "${cov:-?}" "${ft:-?}" \
    "${corp:-?}" "$crashes"
  if [ "$rc" -ne 0 ] || [ "$crashes" -gt 0 ]; then
    failed=1
    echo "  $t failed (exit $rc); see $log and $dir/artifacts/$t" >&2
  fi
done
exit $failed
