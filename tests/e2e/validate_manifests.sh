#!/usr/bin/env bash
# Validate the Envoy, Istio and Kubernetes configs under envoy/ (no cluster, no docker needed).
# Installs its tools first (scripts/install-test-deps.sh: a second run takes about a second).
# The Dockerfile is not built here: there is no docker on CI.
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ENVOY_BIN=$("$repo_root/scripts/install-test-deps.sh" | tail -n1)
export ENVOY_BIN
exec "$repo_root/.venv/bin/python" "$repo_root/tests/e2e/validate_manifests.py" "$@"
