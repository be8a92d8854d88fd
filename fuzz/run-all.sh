#!/usr/bin/env bash
# Runs every fuzz target for a fixed time, one after the other, with one libFuzzer job each, and
# prints one summary line per target: wall and CPU seconds, executions (total and per second),
# coverage, features, corpus, and what libFuzzer wrote to artifacts/ (crashes, timeouts, OOMs,
# slow units).
#
#   fuzz/run-all.sh [SECONDS] [TARGET...]     # default 60 s, all targets
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Each target starts
# from its checked-in seeds (`seeds/<target>/`) plus what earlier runs left in the ignored
# `corpus/<target>/`; crashes land in `artifacts/<target>/` of its fuzz crate, and the script
# exits non-zero if any target crashed. Logs go to fuzz/logs/<target>.log, and each summary line
# is also appended (with the date) to fuzz/logs/summary.tsv.
#
# The fuzzer binary runs directly (not through `cargo fuzz run`) under /usr/bin/time, so the CPU
# seconds are the fuzzer's own: on a shared machine, or under `nice`, wall time overstates the
# work done, and CPU seconds say how much fuzzing a figure stands for.
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
  [audio_datagram]=protocol/fuzz
  [whep_offer]=fuzz
  [trickle_sdpfrag]=fuzz
  [config_load]=fuzz
  [client_addr]=fuzz
)
all=(node_messages client_messages frame_header input_datagram openai_request audio_datagram
  whep_offer trickle_sdpfrag config_load client_addr)
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${all[@]}"); fi

mkdir -p "$root/fuzz/logs"
# Build each fuzz crate the selected targets need, once.
for dir in $(for t in "${targets[@]}"; do echo "${crate[$t]:?unknown target $t}"; done | sort -u); do
  (cd "$root/$dir" && cargo +nightly fuzz build -O) || exit 1
done

failed=0
fmt='%-16s %6s %6s %11s %8s %6s %6s %14s %7s %8s %4s %4s\n'
printf "$fmt" target wall_s cpu_s execs execs/s cov ft corpus crashes timeouts oom slow
for t in "${targets[@]}"; do
  dir=$root/${crate[$t]:?unknown target $t}
  bin=$dir/target/x86_64-unknown-linux-gnu/release/$t
  log=$root/fuzz/logs/$t.log
  times=$root/fuzz/logs/$t.time
  mkdir -p "$dir/corpus/$t" "$dir/artifacts/$t"
  count() { find "$dir/artifacts/$t" -maxdepth 1 -name "$1*" | wc -l; }
  c0=$(( $(count crash-) + $(count leak-) )); t0=$(count timeout-); o0=$(count oom-)
  s0=$(count slow-unit-)
  start=$(date +%s)
  (cd "$dir" && /usr/bin/time -f '%e %U %S' -o "$times" "$bin" \
    -artifact_prefix="$dir/artifacts/$t/" -max_total_time="$secs" -timeout=10 \
    -print_final_stats=1 "corpus/$t" "seeds/$t") >"$log" 2>&1
  rc=$?
  wall=$(( $(date +%s) - start ))
  cpu=$(awk 'END { printf "%d", $2 + $3 }' "$times" 2>/dev/null)
  crashes=$(( $(count crash-) + $(count leak-) - c0 )); timeouts=$(( $(count timeout-) - t0 ))
  ooms=$(( $(count oom-) - o0 )); slow=$(( $(count slow-unit-) - s0 ))
  last=$(grep -E '^#[0-9]+' "$log" | tail -n 1)
  cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
  ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
  corp=$(sed -nE 's/.* corp: ([0-9]+\/[0-9]+[a-zA-Z]*).*/\1/p' <<<"$last")
  execs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+).*/\1/p' "$log" | tail -n 1)
  eps=$(sed -nE 's/^stat::average_exec_per_sec: *([0-9]+).*/\1/p' "$log" | tail -n 1)
  line=$(printf "$fmt" "$t" "$wall" "${cpu:-?}" "${execs:-?}" "${eps:-?}" "${cov:-?}" "${ft:-?}" \
    "${corp:-?}" "$crashes" "$timeouts" "$ooms" "$slow")
  echo "$line"
  printf '%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$secs" "$(tr -s ' ' '\t' <<<"$line")" \
    >>"$root/fuzz/logs/summary.tsv"
  if [ "$rc" -ne 0 ] || [ "$crashes" -gt 0 ] || [ "$timeouts" -gt 0 ] || [ "$ooms" -gt 0 ]; then
    failed=1
    echo "  $t failed (exit $rc); see $log and $dir/artifacts/$t" >&2
  fi
done
exit $failed
