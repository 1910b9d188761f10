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

core=connector-authz-core

cargo fmt --all -- --check
if [ "$quick" = 0 ]; then
  cargo clippy --workspace --all-targets --locked -- -D warnings
  # The wasm build of the core needs its target (idempotent; from the rustup dist server).
  rustup target add wasm32-wasip1
fi

# The decision core pulls in no async runtime, no network stack and (with its pure Rust
# backend) no aws-lc; its default build (aws-lc, for the sidecar) no runtime or network.
check_core_tree() {
  local tree
  tree=$(cargo tree -p "$core" -e normal --locked "$@")
  if grep -nE '(^|[^a-z_-])(tokio|tonic|hyper|reqwest|axum)([ _-]|$)' <<<"$tree"; then
    echo "test.sh: $core depends on a runtime or network crate (cargo tree -p $core -e normal $*)" >&2
    exit 1
  fi
  if [ "${1:-}" = --no-default-features ] && grep -nE 'aws-lc' <<<"$tree"; then
    echo "test.sh: $core pulls in aws-lc with only rust-crypto on" >&2
    exit 1
  fi
}
check_core_tree
check_core_tree --no-default-features --features rust-crypto
cargo build -p "$core" --locked --target wasm32-wasip1 --no-default-features --features rust-crypto
# The proxy-wasm filter (the e2e tests of tests/e2e_wasm.rs load this module into Envoy).
cargo build -p connector-authz-wasm --release --locked --target wasm32-wasip1 --lib --example noop_filter
if [ "$quick" = 0 ]; then
  cargo clippy -p connector-authz-wasm --target wasm32-wasip1 --locked --lib --examples -- -D warnings
fi

cargo test --workspace --all-targets --locked
# The tests that need Envoy or promtool are #[ignore]d (a developer may not have them):
# here, where the tools were just installed, they run, and a missing tool fails them.
# With --quick nothing was installed: they run only when the tools are there already.
tool_tests=(--test e2e_envoy --test e2e_wasm --test e2e_tls --test operability)
if [ "$quick" = 0 ]; then
  cargo test --locked "${tool_tests[@]}" -- --ignored
elif [ -n "${ENVOY_BIN:-}" ] || [ -x .venv/bin/python ] && command -v promtool >/dev/null 2>&1; then
  cargo test --locked "${tool_tests[@]}" -- --ignored
else
  echo "test.sh --quick: Envoy or promtool missing; the tests that need them were not run (scripts/install-test-deps.sh)" >&2
fi
# The core's own tests once more with the pure Rust signature backend.
cargo test -p "$core" --lib --locked --no-default-features --features rust-crypto
# Doc tests are not part of --all-targets.
cargo test --workspace --doc --locked
