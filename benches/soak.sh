#!/usr/bin/env bash
# The soak of BENCHMARKS.md: connector-authz behind a real Envoy under steady load for
# MINUTES minutes (default 10) while its issuer rotates keys every minute, goes down once,
# and the configuration is reloaded every 30 s. Not a test: it reports, and exits 1 only
# when a decision was wrong or a process died.
#
#   benches/soak.sh                   # 10 minutes, after the release build
#   MINUTES=3 OUTAGE_MINUTE=2 benches/soak.sh
#   PROFILE=dev MINUTES=2 benches/soak.sh   # a debug build: to try the script, not to report
#
# Load: three wrk clients at once, each sending one kind of request through Envoy to
# POST /ai/v2/code/completions (route: require complete_code):
#   valid     a token of the issuer's current key, granting complete_code   -> 200
#   no_scope  a token of the current key granting only duo_chat             -> 403
#   forged    the current kid, signed with another key                      -> 401
# Any other answer is a false decision. The tokens are fetched anew each minute.
#
# The issuer (examples/soak_issuer.rs) publishes the current and the previous key. At the
# start of every minute but the first it rotates: tokens then carry a kid the sidecar has
# not seen, which it must fetch on first use (the unknown-kid refresh). At the start of
# minute OUTAGE_MINUTE (default 5) it does not rotate but answers 503 for OUTAGE_SECONDS
# (default 45; OUTAGE_MINUTE=0 for none): the scheduled refreshes (every 20 s here) fail
# and decisions must go on with the keys already held. Every 30 s the script sends connector-authz SIGHUP (a
# configuration reload).
#
# Reported: RSS of connector-authz at the start, after each minute and at the end, and
# its drift after the first minute; per kind the requests, answers by status and socket
# errors; connector-authz's own counters (checks by reason, key refreshes, reloads).
# Raw outputs in $OUT_DIR (default target/soak/<timestamp>).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

MINUTES=${MINUTES:-10}
OUTAGE_MINUTE=${OUTAGE_MINUTE:-5}
OUTAGE_SECONDS=${OUTAGE_SECONDS:-45}
RELOAD_EVERY=${RELOAD_EVERY:-30}
PROFILE=${PROFILE:-release}
target_dir=${CARGO_TARGET_DIR:-$repo/target}
OUT_DIR=${OUT_DIR:-$target_dir/soak/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT_DIR"

say() { echo "soak.sh: $*" >&2; }

case $MINUTES in ''|*[!0-9]*) say "MINUTES must be a whole number, not '$MINUTES'"; exit 2 ;; esac
[ "$MINUTES" -ge 2 ] || { say "MINUTES must be at least 2"; exit 2; }

# shellcheck source=benches/lib.sh
source benches/lib.sh
trap cleanup EXIT

# ---------------------------------------------------------------------------------------
# Tools and binaries

ENVOY_BIN=${ENVOY_BIN:-$(scripts/install-test-deps.sh --load | tail -n1)}
command -v wrk >/dev/null && command -v curl >/dev/null

case $PROFILE in
  release) out=release ;;
  dev) out=debug ;;
  *) say "PROFILE must be release or dev, not '$PROFILE'"; exit 2 ;;
esac
say "building $PROFILE binaries (release: LTO; minutes when not up to date)"
cargo build --profile "$PROFILE" --locked --bin connector-authz --example soak_issuer >&2
authz_bin=$target_dir/$out/connector-authz
issuer_bin=$target_dir/$out/examples/soak_issuer

# ---------------------------------------------------------------------------------------
# The issuer, connector-authz and Envoy

issuer_port=$(free_port); grpc=$(free_port); admin=$(free_port)
listen=$(free_port); envoy_admin=$(free_port)
issuer=http://127.0.0.1:$issuer_port
start issuer "$issuer_bin" "$issuer_port"
wait_http "$issuer/jwks"

config=$OUT_DIR/authz.yaml
cat >"$config" <<YAML
listen:
  grpc: 127.0.0.1:$grpc
  admin: 127.0.0.1:$admin
issuers:
  - url: $issuer
keys:
  # Short, so that the outage meets scheduled refreshes; rotations come as unknown kids.
  refresh_interval: 20s
  min_refresh_interval: 2s
  cache_dir: $OUT_DIR/keys
tokens:
  algorithms: [RS256]
  leeway: 30s
unit_primitives: $repo/config/cloud_connector
backends:
  - name: ai_gateway
    backend_service: ai_gateway
    routes:
      - path: /ai/v2/code/completions
        methods: [POST]
        require: [complete_code]
YAML
"$authz_bin" check-config --config "$config" >"$OUT_DIR/check-config.txt" 2>&1 \
  || { say "the soak configuration does not load:"; cat "$OUT_DIR/check-config.txt" >&2; exit 1; }
start authz "$authz_bin" serve --config "$config"
authz_pid=$last_pid
wait_http "http://127.0.0.1:$admin/readyz"

scripts/render-envoy-config.sh -o "$OUT_DIR/envoy.yaml" benches/envoy/ext-authz.yaml \
  LISTEN_PORT="$listen" ADMIN_PORT="$envoy_admin" AUTHZ_PORT="$grpc"
start envoy "$ENVOY_BIN" -c "$OUT_DIR/envoy.yaml" --concurrency 1 \
  --disable-hot-restart --log-level warn --base-id "$((RANDOM + 1000))"
envoy_pid=$last_pid
wait_http "http://127.0.0.1:$envoy_admin/ready"

url=http://127.0.0.1:$listen/ai/v2/code/completions
instance=0f1b7a53-6e34-4c1e-9a0c-2a7d6b1d9e42
headers=(-H "X-Gitlab-Realm: self-managed" -H "X-Gitlab-Instance-Id: $instance"
  -H "X-Gitlab-Authentication-Type: oidc" -H "X-Gitlab-Version: 17.5.0")
kinds=(valid no_scope forged)
declare -A expect=([valid]=200 [no_scope]=403 [forged]=401)
declare -A conns=([valid]=12 [no_scope]=2 [forged]=2)

# wrk counts the answers by status; the thread's counters are read back when it is done.
lua=$OUT_DIR/count.lua
cat >"$lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"prompt":"def hello"}'
wrk.headers["Content-Type"] = "application/json"
local threads = {}
function setup(thread) table.insert(threads, thread) end
counts = {}
function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end
function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("counts")) do
      total[status] = (total[status] or 0) + n
    end
  end
  for status, n in pairs(total) do io.write(string.format("status %d %d\n", status, n)) end
end
LUA

fetch_tokens() {
  for kind in "${kinds[@]}"; do
    curl -fsS "$issuer/control/token/$kind" >"$OUT_DIR/token-$kind"
  done
}

# Sanity before the load: each kind gets its expected answer.
fetch_tokens
for kind in "${kinds[@]}"; do
  code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "${headers[@]}" \
    -H "Authorization: Bearer $(cat "$OUT_DIR/token-$kind")" "$url")
  [ "$code" = "${expect[$kind]}" ] || { say "$kind answers $code, not ${expect[$kind]}; see $OUT_DIR"; exit 1; }
done

# ---------------------------------------------------------------------------------------
# The soak

reloader() {
  while sleep "$RELOAD_EVERY"; do
    kill -HUP "$authz_pid" 2>/dev/null || return 0
    echo "$(date +%s) SIGHUP" >>"$OUT_DIR/reloads.log"
  done
}
reloader &
reloader_pid=$!
pids+=("$reloader_pid")

rss_log=$OUT_DIR/rss.tsv
echo -e "minute\trss_kib" >"$rss_log"
echo -e "0\t$(vm_kib "$authz_pid" VmRSS)" >>"$rss_log"
declare -A total_req total_ok total_wrong total_errors
for kind in "${kinds[@]}"; do total_req[$kind]=0; total_ok[$kind]=0; total_wrong[$kind]=0; total_errors[$kind]=0; done

if [ "$OUTAGE_MINUTE" -ge 1 ] 2>/dev/null; then outage_words="issuer outage in minute $OUTAGE_MINUTE"; else outage_words="no issuer outage"; fi
say "soaking for $MINUTES minutes ($outage_words; SIGHUP every ${RELOAD_EVERY}s)"
for minute in $(seq 1 "$MINUTES"); do
  if [ "$minute" = "$OUTAGE_MINUTE" ]; then
    curl -fsS -X POST "$issuer/control/outage/$OUTAGE_SECONDS" >>"$OUT_DIR/issuer-events.log"
  elif [ "$minute" -gt 1 ]; then
    curl -fsS -X POST "$issuer/control/rotate" >>"$OUT_DIR/issuer-events.log"
  fi
  fetch_tokens
  wrk_pids=()
  for kind in "${kinds[@]}"; do
    wrk -t1 -c"${conns[$kind]}" -d60s --timeout 5s -s "$lua" "${headers[@]}" \
      -H "Authorization: Bearer $(cat "$OUT_DIR/token-$kind")" "$url" \
      >"$OUT_DIR/wrk-$minute-$kind.txt" 2>&1 &
    wrk_pids+=("$!")
  done
  for pid in "${wrk_pids[@]}"; do wait "$pid" || { say "wrk failed in minute $minute; see $OUT_DIR"; exit 1; }; done
  for process in "$authz_pid" "$envoy_pid"; do
    kill -0 "$process" 2>/dev/null || { say "a process died in minute $minute; see $OUT_DIR"; exit 1; }
  done
  rss=$(vm_kib "$authz_pid" VmRSS)
  echo -e "$minute\t$rss" >>"$rss_log"
  line="minute $minute:"
  for kind in "${kinds[@]}"; do
    out=$OUT_DIR/wrk-$minute-$kind.txt
    req=$(awk '/requests in/ {print $1}' "$out")
    ok=$(awk -v s="${expect[$kind]}" '$1 == "status" && $2 == s {print $3}' "$out")
    errors=$(awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$out")
    ok=${ok:-0}; errors=${errors:-0}
    wrong=$((req - ok))
    total_req[$kind]=$((total_req[$kind] + req))
    total_ok[$kind]=$((total_ok[$kind] + ok))
    total_wrong[$kind]=$((total_wrong[$kind] + wrong))
    total_errors[$kind]=$((total_errors[$kind] + errors))
    line+=" $kind $req ($wrong wrong, $errors socket errors);"
  done
  say "$line rss $rss KiB"
done
kill "$reloader_pid" 2>/dev/null || true
sleep 1
curl -fsS "http://127.0.0.1:$admin/metrics" >"$OUT_DIR/metrics.txt"

# ---------------------------------------------------------------------------------------
# Report

first=$(awk '$1 == 1 {print $2}' "$rss_log")
last=$(awk -v m="$MINUTES" '$1 == m {print $2}' "$rss_log")
{
  echo "# connector-authz soak, $MINUTES minutes, $PROFILE build ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores)"
  echo
  echo "RSS (KiB) by minute:"
  tail -n +2 "$rss_log" | awk '{printf "  %2d  %d\n", $1, $2}'
  awk -v a="$first" -v b="$last" 'BEGIN {printf "drift after the first minute: %+.1f %%\n", (b - a) * 100 / a}'
  echo
  echo "requests by kind (expected status):"
  for kind in "${kinds[@]}"; do
    echo "  $kind (${expect[$kind]}): ${total_req[$kind]} requests, ${total_wrong[$kind]} false decisions, ${total_errors[$kind]} socket errors"
  done
  echo
  echo "connector-authz counters:"
  grep -E '^connector_authz_(checks_total|config_reloads_total|keys_refresh_total|token_cache_(hits|misses)_total)' \
    "$OUT_DIR/metrics.txt" | grep -v ' 0$' | sed 's/^/  /'
  echo "SIGHUPs sent: $(wc -l <"$OUT_DIR/reloads.log" 2>/dev/null || echo 0)"
} | tee "$OUT_DIR/report.txt"

wrong=0
for kind in "${kinds[@]}"; do wrong=$((wrong + total_wrong[$kind])); done
if [ "$wrong" -gt 0 ]; then
  say "$wrong false decisions; see $OUT_DIR"
  exit 1
fi
say "done; report in $OUT_DIR/report.txt"
