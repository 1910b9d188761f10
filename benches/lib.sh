# Shell functions shared by the load scripts under benches/ (sourced, not run). Each
# script sets OUT_DIR and calls `trap cleanup EXIT` itself; every process started with
# `start` is stopped on exit, by its own pid. Everything listens on 127.0.0.1.

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_http() { # url: wait up to 20 s for a 200
  for _ in $(seq 200); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  say "$1 never answered 200"; return 1
}

wait_port() { # port: wait up to 20 s for a listener
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  say "nothing listens on 127.0.0.1:$1"; return 1
}

start() { # name, command...: runs it in the background, logs to $OUT_DIR/name.log
  local name=$1; shift
  "$@" >"$OUT_DIR/$name.log" 2>&1 &
  pids+=("$!")
  last_pid=$!
}

stop() { # pid
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

cpu_ticks() { # pid: utime + stime, in clock ticks
  awk '{print $14 + $15}' "/proc/$1/stat"
}

vm_kib() { # pid, field (VmHWM, VmRSS)
  awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status"
}
