#!/usr/bin/env bash
# The project's test command (README "Run the tests", and CI through .ci/run):
# installs what the tests need, then checks formatting, lints, and runs every test.
#
#   scripts/test.sh            # everything
#   scripts/test.sh --quick    # skip installing (use what is already there) and clippy
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

quick=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    *) echo "test.sh: unknown argument '$arg' (use --quick)" >&2; exit 2 ;;
  esac
done

if [ "$quick" = 0 ]; then
  # The real-Envoy end-to-end tests find the binary through ENVOY_BIN.
  ENVOY_BIN=$(scripts/install-test-deps.sh | tail -n1)
  export ENVOY_BIN
  echo "test.sh: envoy at $ENVOY_BIN"
fi

cargo fmt --all -- --check
if [ "$quick" = 0 ]; then
  cargo clippy --all-targets --locked -- -D warnings
fi
cargo test --all-targets --locked
# Doc tests are not part of --all-targets.
cargo test --doc --locked
