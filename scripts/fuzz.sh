#!/usr/bin/env bash
# Runs each cargo-fuzz target (fuzz/fuzz_targets/) for SECONDS seconds (default 30),
# starting from the committed seeds (fuzz/seeds/<target>/) and the local corpus
# (fuzz/corpus/<target>/, not committed). Needs a nightly toolchain; without one it
# says so and exits 0, so CI machines with only stable Rust can call it safely. The
# seeds themselves are replayed on stable by `cargo test --test fuzz_seeds`.
#
#   scripts/fuzz.sh          # 30 s per target
#   scripts/fuzz.sh 300      # 5 min per target
#
# A finding is written to fuzz/artifacts/<target>/ and makes the script exit 1;
# reproduce it with `cargo +nightly fuzz run -s none <target> fuzz/artifacts/<target>/<file>`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds="${1:-30}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
  echo "usage: scripts/fuzz.sh [SECONDS]   (seconds per target, default 30)" >&2
  exit 2
fi

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz.sh: skipped: no nightly toolchain (cargo fuzz needs one; install it with" \
       "'rustup toolchain install nightly'). The seeds still run in 'cargo test --test fuzz_seeds'."
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

targets=(decide token config path)
# The code under test forbids unsafe code, so AddressSanitizer adds cost but no findings;
# libFuzzer's coverage guidance, panics, overflow checks and debug assertions remain.
build=(cargo +nightly fuzz build --sanitizer none)
echo "fuzz.sh: building ${targets[*]}"
"${build[@]}"

logs=fuzz/artifacts/logs
mkdir -p "$logs"
failed=()
summary=()
for target in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$target"
  echo "fuzz.sh: $target for ${seconds}s"
  status=ok
  # stdin from /dev/null: nothing a target does may wait for input.
  if ! cargo +nightly fuzz run --sanitizer none "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=20000 \
      -print_final_stats=1 </dev/null >"$logs/$target.log" 2>&1; then
    status=FAILED
    failed+=("$target")
    tail -n 40 "$logs/$target.log" >&2
  fi
  runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$logs/$target.log" | grep -oE '[0-9]+$' || echo "?")
  summary+=("$(printf '%-8s %-6s %12s executions in %ss (log %s)' "$target" "$status" "$runs" "$seconds" "$logs/$target.log")")
done

echo "fuzz.sh: summary"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz.sh: findings in ${failed[*]}: see fuzz/artifacts/<target>/" >&2
  exit 1
fi
