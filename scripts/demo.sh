#!/usr/bin/env bash
# Run connector-authz behind a real Envoy on this machine, then try it with curl.
#
#   scripts/demo.sh          # Ctrl-C stops everything
#
# Starts, all on 127.0.0.1:
#   - `connector-authz serve --dev`   gRPC :9191, admin :9192; embedded dev issuer, dev routes
#                                     (src/dev_server/dev.yaml.template) and a 24 h dev token
#   - two echo upstreams              :18081 (ai_gateway), :18082 (observability);
#                                     tests/e2e/echo_upstream.py answers with what it received
#   - Envoy with envoy/front-proxy.yaml  :10000 (admin :9901), ext_authz → :9191
# and prints two curl commands: one allowed with the dev token, one denied.
#
# Envoy: $ENVOY_BIN, else scripts/install-test-deps.sh --envoy-only (creates .venv on first
# run; installs nothing outside the repository).
# connector-authz: $CONNECTOR_AUTHZ_BIN, else `cargo build --release` (the binary that README's
# `cargo run --release` already built; honours $CARGO_TARGET_DIR).
# When connector-authz exits (or is stopped: kill the pid printed), Envoy keeps running, so
# its 503 can be seen; Ctrl-C stops the rest.
# Ports: LISTEN_PORT, ADMIN_PORT, AI_UPSTREAM_PORT, OBS_UPSTREAM_PORT override the defaults;
# the dev mode's own ports (9191, 9192) are fixed.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LISTEN_PORT=${LISTEN_PORT:-10000}
ADMIN_PORT=${ADMIN_PORT:-9901}
AI_UPSTREAM_PORT=${AI_UPSTREAM_PORT:-18081}
OBS_UPSTREAM_PORT=${OBS_UPSTREAM_PORT:-18082}
AUTHZ_PORT=9191        # `serve --dev` listens here (src/dev_server/dev.yaml.template)
AUTHZ_ADMIN_PORT=9192

say() { echo "demo: $*" >&2; }
command -v curl >/dev/null || { say "needs curl"; exit 1; }

envoy_bin=${ENVOY_BIN:-$("$repo_root/scripts/install-test-deps.sh" --envoy-only | tail -n1)}
if [ -n "${CONNECTOR_AUTHZ_BIN:-}" ]; then
  authz_bin=$CONNECTOR_AUTHZ_BIN
else
  say "cargo build --release (connector-authz)"
  (cd "$repo_root" && cargo build --release --quiet --bin connector-authz)
  authz_bin=${CARGO_TARGET_DIR:-$repo_root/target}/release/connector-authz
fi
python=$repo_root/.venv/bin/python
[ -x "$python" ] || python=python3

work=$(mktemp -d "${TMPDIR:-/tmp}/connector-authz-demo.XXXXXX")
pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for URL NAME LOG: until URL answers 2xx, at most 20 s.
wait_for() {
  for _ in $(seq 200); do
    curl -sf -o /dev/null "$1" && return 0
    sleep 0.1
  done
  say "$2 did not come up ($1); its log:"
  tail -n 30 "$3" >&2
  exit 1
}

"$python" "$repo_root/tests/e2e/echo_upstream.py" "$AI_UPSTREAM_PORT" --name ai_gateway \
  >"$work/ai.log" 2>&1 &
pids+=($!)
"$python" "$repo_root/tests/e2e/echo_upstream.py" "$OBS_UPSTREAM_PORT" --name observability \
  >"$work/obs.log" 2>&1 &
pids+=($!)

# TMPDIR: serve --dev writes its dev key set under the temp dir; keep it in ours, removed on exit.
TMPDIR=$work "$authz_bin" serve --dev >"$work/authz.out" 2>"$work/authz.log" &
authz_pid=$!
pids+=($authz_pid)
wait_for "http://127.0.0.1:$AUTHZ_ADMIN_PORT/readyz" connector-authz "$work/authz.log"
token=$(sed -n 's/^export TOKEN=//p' "$work/authz.out" "$work/authz.log" | head -n1)
[ -n "$token" ] || { say "serve --dev printed no 'export TOKEN=' line"; cat "$work/authz.out" >&2; exit 1; }

"$repo_root/scripts/render-envoy-config.sh" -o "$work/envoy.yaml" "$repo_root/envoy/front-proxy.yaml" \
  LISTEN_PORT="$LISTEN_PORT" ADMIN_PORT="$ADMIN_PORT" AUTHZ_PORT="$AUTHZ_PORT" \
  AI_UPSTREAM_PORT="$AI_UPSTREAM_PORT" OBS_UPSTREAM_PORT="$OBS_UPSTREAM_PORT"
"$envoy_bin" -c "$work/envoy.yaml" --concurrency 1 --disable-hot-restart --log-level warn \
  >"$work/envoy.log" 2>&1 &
envoy_pid=$!
pids+=($envoy_pid)
wait_for "http://127.0.0.1:$ADMIN_PORT/ready" envoy "$work/envoy.log"

gateway=http://127.0.0.1:$LISTEN_PORT
cat <<EOF

Envoy on $gateway, connector-authz (dev) on 127.0.0.1:$AUTHZ_PORT. In another shell:

export TOKEN=$token

# allowed: reaches the ai_gateway echo as /v2/code/completions, with x-gitlab-authz-* headers
curl -i -X POST $gateway/ai/v2/code/completions \\
  -H "Authorization: Bearer \$TOKEN" -H "X-Gitlab-Instance-Id: dev-instance" \\
  -H "X-Gitlab-Realm: self-managed" -H "X-Gitlab-Authentication-Type: oidc"

# denied: 403 insufficient_scope, the dev token lacks explain_vulnerability
curl -i -X POST $gateway/ai/v1/proxy/vertex-ai \\
  -H "Authorization: Bearer \$TOKEN" -H "X-Gitlab-Instance-Id: dev-instance" \\
  -H "X-Gitlab-Realm: self-managed" -H "X-Gitlab-Authentication-Type: oidc" \\
  -H "X-Gitlab-Unit-Primitive: explain_vulnerability"

# public, no token: the observability upstream (its route in src/dev_server/dev.yaml.template)
curl -i $gateway/observability/v1/health

# stop connector-authz: it answers for its 5 s shutdown delay, then Envoy (still up)
# answers 503: it fails closed
kill $authz_pid

Logs: $work (Envoy's access log, with the decision, is in envoy.log). Ctrl-C stops everything.
EOF

# connector-authz may go (that is part of the demo); Envoy or an upstream going ends it.
wait -n "${pids[@]}" || true
if ! kill -0 "$authz_pid" 2>/dev/null && kill -0 "$envoy_pid" 2>/dev/null; then
  say "connector-authz exited; Envoy keeps running (requests now get 503). Ctrl-C stops the rest."
  others=()
  for pid in "${pids[@]}"; do [ "$pid" = "$authz_pid" ] || others+=("$pid"); done
  wait -n "${others[@]}" || true
fi
say "a process exited; stopping"
