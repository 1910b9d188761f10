#!/usr/bin/env bash
# The load benchmark of BENCHMARKS.md. Everything runs on 127.0.0.1 and every run is
# bounded in time; it stops by itself and stops only the processes it started.
#
#   benches/load.sh                 # about 9 minutes after the release build (all runs, 3 rounds x 10 s)
#   ROUNDS=5 SECONDS_PER_RUN=20 benches/load.sh
#   PROFILE=1 benches/load.sh       # also a perf profile of connector-authz under h2load
#   RUNS="W WN" DIRECT=0 benches/load.sh   # only these runs through Envoy; no h2load, no RSS
#   COLD_TOKENS=40000 COLD_SECONDS=2       # distinct tokens per -cold run, and its length
#
# 1. Through a real Envoy (--concurrency 1), the same allowed request, alternated A N B per
#    round with wrk -c16: A = ext_authz -> connector-authz, N = ext_authz -> the do-nothing
#    server (examples/noop_authz.rs), B = Envoy's jwt_authn (its JWT cache, local_jwks) + RBAC;
#    and S = ext_authz -> the do-nothing server giving connector-authz's own allow answer
#    (noop_authz --same-answer), which splits A - N into what Envoy spends on the answer
#    (identity headers, access-log metadata) and what connector-authz spends deciding.
#    Configs: benches/envoy/ext-authz.yaml (A and N), benches/envoy/jwt-authn.yaml (B).
#    W = connector-authz's proxy-wasm filter in Envoy (benches/envoy/wasm.yaml; the token is
#    verified once by the sidecar, then decided in process). Then, cold: A-forged and
#    W-forged send a distinct forged token on every request (the valid token's header and
#    claims with a random signature): what a forged-token flood costs the Envoy worker with
#    each form (W asks the sidecar's /v1/verify for every one); A-cold and W-cold send a
#    distinct *valid* token on every request (minted by the fixture, COLD_TOKENS per run, no
#    token sent twice within a run). WN = a do-nothing proxy-wasm filter (the example
#    noop_filter: reads three headers, looks the token up in a set, sets one header), the
#    baseline for what the filter itself costs Envoy. A2 = ext_authz -> a second
#    connector-authz with --workers 2 (a multi-thread runtime), beside A (the default:
#    `auto`, one thread on a machine with 2 CPUs). Envoy's CPU per request is measured for every
#    configuration.
# 2. CPU seconds per Check of connector-authz and of the do-nothing server (utime + stime
#    from /proc/PID/stat over each run, divided by the requests wrk counted).
# 3. The Check RPC directly with h2load (no Envoy): connector-authz with a warm cache (one
#    token), connector-authz with the cache off (tokens.cache_entries: 0, which costs what a
#    new token on every request costs: parse + RS256 verify), the do-nothing server (N) and
#    the same-answer one (S).
# 4. Peak RSS (VmHWM) idle and after the load, and examples/cache_rss with 100,000 tokens.
#
# Installs what it needs: Envoy and wrk (scripts/install-test-deps.sh --load), h2load
# (Debian's nghttp2-client). Results: a summary on stdout and raw outputs in $OUT_DIR
# (default target/load-bench/<timestamp>).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

ROUNDS=${ROUNDS:-3}
# Distinct valid tokens per A-cold / W-cold run: at least what one run sends (minting takes
# about a millisecond each, on both cores).
COLD_TOKENS=${COLD_TOKENS:-30000}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
# The -cold runs are shorter, so that COLD_TOKENS covers them (about 15,000 req/s here).
COLD_SECONDS=${COLD_SECONDS:-2}
CONNECTIONS=${CONNECTIONS:-16}
PROFILE=${PROFILE:-0}
RUNS=${RUNS:-}
DIRECT=${DIRECT:-1}
target_dir=${CARGO_TARGET_DIR:-$repo/target}
OUT_DIR=${OUT_DIR:-$target_dir/load-bench/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT_DIR"
started=$(date +%s)

say() { echo "load.sh: $*" >&2; }

# ---------------------------------------------------------------------------------------
# Tools

ENVOY_BIN=${ENVOY_BIN:-$(scripts/install-test-deps.sh --load | tail -n1)}
if ! command -v h2load >/dev/null 2>&1; then
  say "apt-get install nghttp2-client (h2load)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >&2
fi
command -v wrk >/dev/null && command -v h2load >/dev/null

say "building release binaries (LTO; minutes when not up to date)"
cargo build --release --locked --bin connector-authz --example noop_authz \
  --example load_fixture --example cache_rss >&2
cargo build --release --locked --target wasm32-wasip1 -p connector-authz-wasm --lib --example noop_filter >&2
wasm_module=$target_dir/wasm32-wasip1/release/connector_authz_wasm.wasm
noop_module=$target_dir/wasm32-wasip1/release/examples/noop_filter.wasm
bin=$target_dir/release
authz_bin=$bin/connector-authz

# ---------------------------------------------------------------------------------------
# Processes: every one started here is recorded and stopped on exit, by its own pid.

# shellcheck source=benches/lib.sh
source benches/lib.sh
trap cleanup EXIT

hz=$(getconf CLK_TCK)

# ---------------------------------------------------------------------------------------
# Fixtures and servers

authz_grpc=$(free_port); authz_admin=$(free_port); noop_grpc=$(free_port); same_grpc=$(free_port)
authz2_grpc=$(free_port); authz2_admin=$(free_port)
cold_runs=2
[ -n "$RUNS" ] && cold_runs=$( (grep -o -- '-cold' <<<"$RUNS" || true) | wc -l)
[ "$cold_runs" -gt 0 ] && say "minting $((cold_runs * ROUNDS)) x $COLD_TOKENS distinct valid tokens for the -cold runs"
"$bin/examples/load_fixture" "$OUT_DIR/fixture" "$authz_grpc" "$authz_admin" $((cold_runs * ROUNDS * COLD_TOKENS)) >/dev/null
"$bin/examples/load_fixture" "$OUT_DIR/fixture2" "$authz2_grpc" "$authz2_admin" >/dev/null
fixture=$OUT_DIR/fixture
token=$(cat "$fixture/token")

start authz "$authz_bin" serve --config "$fixture/authz.yaml"
authz_pid=$last_pid
wait_http "http://127.0.0.1:$authz_admin/readyz"
start authz2 "$authz_bin" --workers 2 serve --config "$OUT_DIR/fixture2/authz.yaml"
authz2_pid=$last_pid
wait_http "http://127.0.0.1:$authz2_admin/readyz"
start noop "$bin/examples/noop_authz" "127.0.0.1:$noop_grpc"
noop_pid=$last_pid
wait_port "$noop_grpc"
start same "$bin/examples/noop_authz" "127.0.0.1:$same_grpc" --same-answer
same_pid=$last_pid
wait_port "$same_grpc"
sleep 1
authz_idle_hwm=$(vm_kib "$authz_pid" VmHWM)
noop_idle_hwm=$(vm_kib "$noop_pid" VmHWM)

# The request: what a GitLab instance sends to the AI gateway for a code completion.
instance=0f1b7a53-6e34-4c1e-9a0c-2a7d6b1d9e42
"$authz_bin" check --grpc "127.0.0.1:$authz_grpc" --method POST --path /ai/v2/code/completions \
  --header x-gitlab-realm:self-managed --header "x-gitlab-instance-id:$instance" --header x-gitlab-authentication-type:oidc \
  --token "$token" >"$OUT_DIR/check.txt" 2>&1 \
  || { say "connector-authz does not allow the benchmark request:"; cat "$OUT_DIR/check.txt" >&2; exit 1; }

render() { # template out KEY=VALUE...
  local template=$1 out=$2; shift 2
  scripts/render-envoy-config.sh -o "$out" "$template" "$@"
}

declare -A envoy_port envoy_pid envoy_admin
configs=(A N S B W WN A2)
for config in "${configs[@]}"; do
  listen=$(free_port); admin=$(free_port)
  case $config in
    A2) render benches/envoy/ext-authz.yaml "$OUT_DIR/envoy-A2.yaml" LISTEN_PORT="$listen" ADMIN_PORT="$admin" AUTHZ_PORT="$authz2_grpc" ;;
    WN) render benches/envoy/wasm.yaml "$OUT_DIR/envoy-WN.yaml" LISTEN_PORT="$listen" ADMIN_PORT="$admin" \
         AUTHZ_ADMIN_PORT="$authz_admin" WASM_PATH="$noop_module" ;;
    A) render benches/envoy/ext-authz.yaml "$OUT_DIR/envoy-A.yaml" LISTEN_PORT="$listen" ADMIN_PORT="$admin" AUTHZ_PORT="$authz_grpc" ;;
    N) render benches/envoy/ext-authz.yaml "$OUT_DIR/envoy-N.yaml" LISTEN_PORT="$listen" ADMIN_PORT="$admin" AUTHZ_PORT="$noop_grpc" ;;
    S) render benches/envoy/ext-authz.yaml "$OUT_DIR/envoy-S.yaml" LISTEN_PORT="$listen" ADMIN_PORT="$admin" AUTHZ_PORT="$same_grpc" ;;
    B) render benches/envoy/jwt-authn.yaml "$OUT_DIR/envoy-B.yaml" LISTEN_PORT="$listen" ADMIN_PORT="$admin" \
         ISSUER=https://customers.gitlab.com AUDIENCE=gitlab-ai-gateway JWKS="$(cat "$fixture/jwks.json")" ;;
    W) render benches/envoy/wasm.yaml "$OUT_DIR/envoy-W.yaml" LISTEN_PORT="$listen" ADMIN_PORT="$admin" \
         AUTHZ_ADMIN_PORT="$authz_admin" WASM_PATH="$wasm_module" ;;
  esac
  start "envoy-$config" "$ENVOY_BIN" -c "$OUT_DIR/envoy-$config.yaml" --concurrency 1 \
    --disable-hot-restart --log-level warn --base-id "$((RANDOM + 1000))"
  envoy_pid[$config]=$last_pid
  wait_http "http://127.0.0.1:$admin/ready"
  envoy_port[$config]=$listen
  envoy_admin[$config]=$admin
done

# The request has no body: authorization never reads one, and with a body, a filter that
# answers while Envoy is still in the request's headers (jwt_authn, the wasm filter, each in
# front of this benchmark's direct_response) gets its response out before the body is read,
# so Envoy marks the response `connection: close` and wrk opens a new connection for every
# request. ext_authz answers later, after the body, so it kept its connections: with a body,
# B, W and WN were measured at a connection per request (14k req/s against 41k for B
# without). run_wrk reports the connections each run opened.
wrk_script=$OUT_DIR/post.lua
cat >"$wrk_script" <<'LUA'
wrk.method = "POST"
LUA
request_headers=(-H "Authorization: Bearer $token" -H "X-Gitlab-Realm: self-managed"
  -H "X-Gitlab-Instance-Id: $instance" -H "X-Gitlab-Authentication-Type: oidc" -H "X-Gitlab-Version: 17.5.0")

# The filter answers 503 until its first snapshot from the sidecar.
for _ in $(seq 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${envoy_port[W]}/ai/v2/code/completions")
  [ "$code" = 503 ] || break
  sleep 0.1
done
for config in "${configs[@]}"; do
  code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "${request_headers[@]}" \
    "http://127.0.0.1:${envoy_port[$config]}/ai/v2/code/completions")
  [ "$code" = 200 ] || { say "config $config answers $code, not 200; see $OUT_DIR"; exit 1; }
  code=$(curl -s -o /dev/null -w '%{http_code}' -X POST \
    "http://127.0.0.1:${envoy_port[$config]}/ai/v2/code/completions")
  [ "$code" = 401 ] || [ "$config" = N ] || [ "$config" = S ] || [ "$config" = WN ] || { say "config $config lets a request without token through ($code)"; exit 1; }
done

# ---------------------------------------------------------------------------------------
# 1 + 2: through Envoy, A N B alternated

results=$OUT_DIR/results.tsv
echo -e "kind\tconfig\tround\treq_per_s\tp50_ms\tp90_ms\tp99_ms\trequests\tnon2xx\tserver_cpu_us_per_req\tenvoy_cpu_us_per_req" >"$results"

to_ms() { # wrk latency like 812.00us, 1.23ms, 1.01s
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); print v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); print v + 0 }
    else if (v ~ /s$/) { sub(/s$/, "", v); print v * 1000 }
    else print v }'
}

downstream_connections() { # config: connections Envoy's listener has accepted so far
  local n
  n=$(curl -sf "http://127.0.0.1:${envoy_admin[$1]}/stats?filter=^http%5C.gateway%5C.downstream_cx_total$" \
    | awk -F': ' '{print $2}') || true
  echo "${n:-0}"
}

run_wrk() { # config round: a config of $configs, or A|W-forged / A|W-cold (distinct tokens)
  local config=$1 round=$2 out=$OUT_DIR/wrk-$1-$2.txt server_pid="" before=0
  local envoy=${config%-*} script=$wrk_script seconds=$SECONDS_PER_RUN
  case $config in
    *-forged) script=$forged_script ;;
    *-cold) # this run's own slice of the minted tokens: none was sent before
      seconds=$COLD_SECONDS
      cold_slice=$((cold_slice + 1))
      script=$OUT_DIR/cold-$config-$round.lua
      sed "s/@FIRST@/$(( (cold_slice - 1) * COLD_TOKENS + 1 ))/; s/@LAST@/$(( cold_slice * COLD_TOKENS ))/" \
        "$cold_template" >"$script" ;;
  esac
  case $envoy in A | W) server_pid=$authz_pid ;; A2) server_pid=$authz2_pid ;; N) server_pid=$noop_pid ;; S) server_pid=$same_pid ;; esac
  [ -n "$server_pid" ] && before=$(cpu_ticks "$server_pid")
  local envoy_before; envoy_before=$(cpu_ticks "${envoy_pid[$envoy]}")
  local cx_before; cx_before=$(downstream_connections "$envoy")
  wrk -t1 -c"$CONNECTIONS" -d"${seconds}s" --latency --timeout 5s -s "$script" \
    "${request_headers[@]}" "http://127.0.0.1:${envoy_port[$envoy]}/ai/v2/code/completions" >"$out"
  local cpu=""
  local requests rps p50 p90 p99 non2xx
  requests=$(awk '/requests in/ {print $1}' "$out")
  rps=$(awk '/^Requests\/sec/ {print $2}' "$out")
  p50=$(to_ms "$(awk '$1 == "50%" {print $2}' "$out")")
  p90=$(to_ms "$(awk '$1 == "90%" {print $2}' "$out")")
  p99=$(to_ms "$(awk '$1 == "99%" {print $2}' "$out")")
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$out"); non2xx=${non2xx:-0}
  if [ -n "$server_pid" ]; then
    cpu=$(awk -v a="$before" -v b="$(cpu_ticks "$server_pid")" -v n="$requests" -v hz="$hz" \
      'BEGIN {printf "%.1f", (b - a) / hz / n * 1e6}')
  fi
  local envoy_cpu
  envoy_cpu=$(awk -v a="$envoy_before" -v b="$(cpu_ticks "${envoy_pid[$envoy]}")" -v n="$requests" -v hz="$hz" \
    'BEGIN {printf "%.1f", (b - a) / hz / n * 1e6}')
  local connections=$(( $(downstream_connections "$envoy") - cx_before ))
  if [ "$connections" -gt $((2 * CONNECTIONS)) ]; then
    say "warning: $config round $round opened $connections connections for $requests requests (Envoy closed them: the figures measure reconnecting)"
  fi
  if [[ $config == *-cold ]] && [ "$requests" -gt "$COLD_TOKENS" ]; then
    say "warning: $config round $round sent $requests requests with $COLD_TOKENS tokens: some were sent twice (raise COLD_TOKENS)"
  fi
  echo -e "envoy\t$config\t$round\t$rps\t$p50\t$p90\t$p99\t$requests\t$non2xx\t$cpu\t$envoy_cpu" >>"$results"
  say "envoy $config round $round: $rps req/s, p50 ${p50} ms, p99 ${p99} ms, non-2xx $non2xx${cpu:+, server CPU ${cpu} us/req}, Envoy CPU ${envoy_cpu} us/req, $connections connections"
}

# Distinct forged tokens: the valid token's header and claims, a random signature each time.
forged_script=$OUT_DIR/forged.lua
cat >"$forged_script" <<LUA
local prefix = "${token%.*}."
local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
math.randomseed(os.time())
wrk.method = "POST"
request = function()
  local sig = {}
  for i = 1, 342 do
    local n = math.random(1, 64)
    sig[i] = alphabet:sub(n, n)
  end
  wrk.headers["Authorization"] = "Bearer " .. prefix .. table.concat(sig)
  return wrk.format()
end
LUA

# Distinct valid tokens: lines @FIRST@..@LAST@ of the fixture's tokens file, in order.
cold_template=$OUT_DIR/cold.lua.in
cold_slice=0
cat >"$cold_template" <<LUA
local tokens = {}
local n = 0
for line in io.lines("$fixture/tokens") do
  n = n + 1
  if n > @LAST@ then break end
  if n >= @FIRST@ then tokens[#tokens + 1] = line end
end
local i = 0
wrk.method = "POST"
request = function()
  i = i % #tokens + 1
  wrk.headers["Authorization"] = "Bearer " .. tokens[i]
  return wrk.format()
end
LUA

all_runs=("${configs[@]}" A-forged W-forged A-cold W-cold)
if [ -n "$RUNS" ]; then read -r -a all_runs <<<"$RUNS"; fi
say "through Envoy: $ROUNDS rounds of ${all_runs[*]}, ${SECONDS_PER_RUN}s each, -c$CONNECTIONS"
for round in $(seq "$ROUNDS"); do
  for config in "${all_runs[@]}"; do run_wrk "$config" "$round"; sleep 1; done
done

# ---------------------------------------------------------------------------------------
# 3: the Check RPC directly with h2load

run_h2load() { # label pid port
  local label=$1 pid=$2 port=$3 out=$OUT_DIR/h2load-$1.txt
  local before; before=$(cpu_ticks "$pid")
  h2load -t1 -c"$CONNECTIONS" -m1 -D "$SECONDS_PER_RUN" --warm-up-time 1 \
    -d "$fixture/check.bin" -H 'content-type: application/grpc' -H 'te: trailers' \
    "http://127.0.0.1:$port/envoy.service.auth.v3.Authorization/Check" >"$out"
  local after rps done p50 mean
  after=$(cpu_ticks "$pid")
  rps=$(awk '/^finished in/ {print $4}' "$out")
  done=$(awk '/^requests:/ {print $8}' "$out")
  mean=$(awk '/^time for request:/ {print $6}' "$out")
  local cpu
  cpu=$(awk -v a="$before" -v b="$after" -v n="$done" -v hz="$hz" 'BEGIN {printf "%.1f", (b - a) / hz / n * 1e6}')
  local status2xx; status2xx=$(awk '/^status codes:/ {print $3}' "$out")
  echo -e "h2load\t$label\t1\t$rps\t\t\t\t$done\t$((done - ${status2xx:-0}))\t$cpu" >>"$results"
  say "h2load $label: $rps req/s ($done done, mean $mean per request), server CPU $cpu us/req"
}

if [ "$DIRECT" = 1 ]; then
say "the Check RPC directly (h2load)"
for round in $(seq "$ROUNDS"); do
  run_h2load "warm-$round" "$authz_pid" "$authz_grpc"
  run_h2load "noop-$round" "$noop_pid" "$noop_grpc"
  run_h2load "same-$round" "$same_pid" "$same_grpc"
done
authz_loaded_hwm=$(vm_kib "$authz_pid" VmHWM)

if [ "$PROFILE" = 1 ] && command -v perf >/dev/null; then
  say "perf profile of connector-authz under h2load (warm cache)"
  perf record -e cpu-clock -F 2999 -g -p "$authz_pid" -o "$OUT_DIR/perf-warm.data" -- sleep 8 >/dev/null 2>&1 &
  perf_pid=$!
  h2load -t1 -c"$CONNECTIONS" -m1 -D 8 -d "$fixture/check.bin" -H 'content-type: application/grpc' \
    -H 'te: trailers' "http://127.0.0.1:$authz_grpc/envoy.service.auth.v3.Authorization/Check" >/dev/null
  wait "$perf_pid" || true
  perf report -i "$OUT_DIR/perf-warm.data" --no-children --percent-limit 1 --stdio \
    --sort dso,symbol 2>/dev/null | grep -E '^ +[0-9]' >"$OUT_DIR/perf-warm.txt" || true
fi

# The cache off: restart connector-authz on the same ports with tokens.cache_entries: 0.
stop "$authz_pid"
start authz-nocache "$authz_bin" serve --config "$fixture/authz-nocache.yaml"
authz_pid=$last_pid
wait_http "http://127.0.0.1:$authz_admin/readyz"
for round in $(seq "$ROUNDS"); do
  run_h2load "uncached-$round" "$authz_pid" "$authz_grpc"
done

# ---------------------------------------------------------------------------------------
# 4: memory

rss_line=$("$bin/examples/cache_rss" 100000)
echo "$rss_line" >"$OUT_DIR/cache_rss.txt"
else
  authz_loaded_hwm=$(vm_kib "$authz_pid" VmHWM)
  rss_line="(not measured: DIRECT=0)"
fi

# ---------------------------------------------------------------------------------------
# Summary: medians (and min..max) per configuration

summary() {
  python3 - "$results" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
def col(kind, prefix, name):
    # A config is matched exactly ("A" is not "A-forged"); h2load labels by prefix ("warm-1").
    match = (lambda c: c == prefix) if kind == "envoy" else (lambda c: c.startswith(prefix))
    return [float(r[name]) for r in rows if r["kind"] == kind and match(r["config"]) and r.get(name)]
def show(kind, prefix, label):
    rps = col(kind, prefix, "req_per_s")
    if not rps:
        return None
    line = f"{label:<38} req/s median {statistics.median(rps):8.0f} (min {min(rps):.0f}, max {max(rps):.0f})"
    p99 = col(kind, prefix, "p99_ms")
    if p99:
        line += f"  p50 {statistics.median(col(kind, prefix, 'p50_ms')):.2f} ms  p99 {statistics.median(p99):.2f} ms"
    cpu = col(kind, prefix, "server_cpu_us_per_req")
    if cpu:
        line += f"  server CPU {statistics.median(cpu):.1f} us/req (min {min(cpu):.1f}, max {max(cpu):.1f})"
    envoy = col(kind, prefix, "envoy_cpu_us_per_req") if kind == "envoy" else []
    if envoy:
        line += f"  Envoy CPU {statistics.median(envoy):.1f} us/req (min {min(envoy):.1f}, max {max(envoy):.1f})"
    print(line)
    return statistics.median(rps), (statistics.median(p99) if p99 else None), (statistics.median(cpu) if cpu else None)
a = show("envoy", "A", "A  Envoy ext_authz -> connector-authz")
n = show("envoy", "N", "N  Envoy ext_authz -> do-nothing")
s_ = show("envoy", "S", "S  ext_authz -> do-nothing, same answer")
b = show("envoy", "B", "B  Envoy jwt_authn + RBAC")
wa = show("envoy", "W", "W  Envoy + the proxy-wasm filter, warm")
wn = show("envoy", "WN", "WN Envoy + a do-nothing wasm filter")
a2 = show("envoy", "A2", "A2 ext_authz -> connector-authz, 2 workers")
ac = show("envoy", "A-cold", "A  ext_authz, distinct valid tokens")
wc = show("envoy", "W-cold", "W  wasm filter, distinct valid tokens")
af = show("envoy", "A-forged", "A  ext_authz, distinct forged tokens")
wf = show("envoy", "W-forged", "W  wasm filter, distinct forged tokens")
w = show("h2load", "warm", "h2load connector-authz, warm cache")
u = show("h2load", "uncached", "h2load connector-authz, cache off")
o = show("h2load", "noop", "h2load do-nothing server")
so = show("h2load", "same", "h2load do-nothing, same answer")
if a and n:
    print(f"A/N req/s {a[0]/n[0]:.3f}   A/N p99 {a[1]/n[1]:.3f}   A/N server CPU per Check {a[2]/n[2]:.2f}")
if a and s_:
    print(f"A/S req/s {a[0]/s_[0]:.3f}   A/S p99 {a[1]/s_[1]:.3f}   A/S server CPU per Check {a[2]/s_[2]:.2f}   S/N req/s {s_[0]/n[0]:.3f}")
if a and b:
    print(f"A/B req/s {a[0]/b[0]:.3f}   A/B p99 {a[1]/b[1]:.3f}")
if wa and b and n:
    print(f"W/B req/s {wa[0]/b[0]:.3f}   W/N req/s {wa[0]/n[0]:.3f}")
if wf and af and n:
    print(f"forged flood: W/A req/s {wf[0]/af[0]:.3f}   W-forged/N req/s {wf[0]/n[0]:.3f}")
if wc and ac and n:
    print(f"distinct valid tokens: W-cold/A-cold req/s {wc[0]/ac[0]:.3f}   W-cold/N req/s {wc[0]/n[0]:.3f}")
def envoy_cpu(config):
    return statistics.median(col("envoy", config, "envoy_cpu_us_per_req") or [float("nan")])
if wa and wn:
    print(f"W/WN req/s {wa[0]/wn[0]:.3f}   Envoy CPU per request: W {envoy_cpu('W'):.1f} us, WN {envoy_cpu('WN'):.1f} us, "
          f"the filter's own {envoy_cpu('W') - envoy_cpu('WN'):.1f} us; B {envoy_cpu('B'):.1f} us, N {envoy_cpu('N'):.1f} us, "
          f"A {envoy_cpu('A'):.1f} us")
if wf and af:
    print(f"Envoy CPU per forged-token request: W {envoy_cpu('W-forged'):.1f} us, A {envoy_cpu('A-forged'):.1f} us")
if a2 and a:
    print(f"A2/A req/s {a2[0]/a[0]:.3f}   A2/A p99 {a2[1]/a[1]:.3f}   A2/A server CPU per Check {a2[2]/a[2]:.2f}")
if w and o:
    print(f"h2load warm/do-nothing req/s {w[0]/o[0]:.3f}   CPU per Check {w[2]/o[2]:.2f}")
if w and so:
    print(f"h2load warm/same-answer req/s {w[0]/so[0]:.3f}   CPU per Check {w[2]/so[2]:.2f}")
if u and o:
    print(f"h2load uncached/do-nothing req/s {u[0]/o[0]:.3f}   CPU per Check {u[2]/o[2]:.2f}")
PY
}

{
  echo "== $(date -u +%FT%TZ)  $(nproc) CPUs  load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "rounds $ROUNDS x ${SECONDS_PER_RUN}s, -c$CONNECTIONS, envoy $("$ENVOY_BIN" --version | grep -o 'version: [^ ]*' | head -n1)"
  summary
  awk -v i="$authz_idle_hwm" -v l="$authz_loaded_hwm" -v n="$noop_idle_hwm" 'BEGIN {
    printf "RSS (VmHWM): connector-authz idle %.1f MiB, after the load %.1f MiB; do-nothing idle %.1f MiB\n", i / 1024, l / 1024, n / 1024 }'
  echo "cache_rss: $rss_line"
  echo "took $(( $(date +%s) - started )) s; raw outputs in $OUT_DIR"
} | tee "$OUT_DIR/summary.txt"
