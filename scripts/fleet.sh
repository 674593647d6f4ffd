#!/usr/bin/env bash
# A fleet of `streamdiffusion serve` workers behind Debian's nginx, all on loopback (docs/SCALING.md).
#
#   scripts/fleet.sh N [options] [-- extra serve options]   start N workers and nginx, wait until every worker is ready
#   scripts/fleet.sh stop [--run-dir DIR]                   drain and stop them all (SIGTERM, then SIGKILL after the drain)
#   scripts/fleet.sh status [--run-dir DIR]                 each worker's /api/ready
#
# Options (start):
#   --model PATH         the model of every worker (default: serve's own default, the built-in emoji model)
#   --threads T          libtorch threads per worker (default: the cores / N, at least 1)
#   --gpus               one worker per CUDA device: worker i gets --device cuda:i (then N <= the devices)
#   --port P             nginx's port on 127.0.0.1 (default 8080); the workers take free loopback ports
#   --max-streams M      per worker (default 4)
#   --drain-seconds S    per worker (default 10)
#   --run-dir DIR        pid files, logs and nginx's config (default ${SD_FLEET_DIR:-/tmp/sd-fleet-$USER})
#   --bin PATH           the streamdiffusion binary (default $SD_BIN or build/apps/streamdiffusion)
#   --ready-timeout S    seconds to wait for every worker's /api/ready (default 120)
# nginx: `nginx` on PATH (apt-get install nginx-light, or nginx), run as a plain process with
# `-p RUN_DIR/nginx -c RUN_DIR/nginx/nginx.conf` and `daemon off` (never a system service). Set SD_FLEET_INSTALL_NGINX=1
# to let this script apt-get install nginx-light when it is missing.
# Prints, once ready: "fleet ready: http://127.0.0.1:P/ (N workers: PORT1 PORT2 ...)". Files in the run dir:
# worker-I.pid, worker-I.port, worker-I.log, nginx.pid, nginx/nginx.conf, nginx/error.log.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
run_dir="${SD_FLEET_DIR:-/tmp/sd-fleet-${USER:-$(id -un)}}"

die() { echo "fleet.sh: $*" >&2; exit 2; }

usage() { sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

stop_pid() {  # stop_pid FILE SIGNAL WAIT_S: signal the process in FILE, wait, then SIGKILL
  local f="$1" sig="$2" wait_s="$3" pid
  [[ -f "$f" ]] || return 0
  pid="$(cat "$f")"
  if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
    kill "-$sig" "$pid" 2>/dev/null || true
    local t=0
    while kill -0 "$pid" 2>/dev/null && (( t < wait_s * 10 )); do sleep 0.1; t=$((t + 1)); done
    if kill -0 "$pid" 2>/dev/null; then
      echo "fleet.sh: pid $pid ($(basename "$f" .pid)) still running after ${wait_s} s: SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$f"
}

cmd_stop() {
  [[ -d "$run_dir" ]] || { echo "fleet.sh: no run dir $run_dir: nothing to stop"; return 0; }
  local drain=10
  [[ -f "$run_dir/drain-seconds" ]] && drain="$(cat "$run_dir/drain-seconds")"
  drain="$(awk -v d="$drain" 'BEGIN { printf "%d", (d == int(d)) ? d : int(d) + 1 }')"  # whole seconds, rounded up
  # nginx first (no new connections), then the workers drain in parallel.
  stop_pid "$run_dir/nginx.pid" QUIT 5
  local f pids=()
  for f in "$run_dir"/worker-*.pid; do
    [[ -f "$f" ]] || continue
    stop_pid "$f" TERM $((drain + 5)) &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || true; done
  echo "fleet stopped ($run_dir)"
}

cmd_status() {
  local f i port rc=0
  for f in "$run_dir"/worker-*.port; do
    [[ -f "$f" ]] || { echo "no workers in $run_dir"; return 1; }
    i="$(basename "$f" .port)"
    port="$(cat "$f")"
    echo "$i 127.0.0.1:$port $(curl -s --max-time 2 "http://127.0.0.1:$port/api/ready" || echo unreachable)"
  done
  return $rc
}

cmd_start() {
  local n="$1"
  shift
  [[ "$n" =~ ^[0-9]+$ && "$n" -ge 1 && "$n" -le 64 ]] || die "expected a worker count 1..64, got '$n'"
  local model="" threads="" gpus=0 port=8080 max_streams=4 drain=10 ready_timeout=120
  local bin="${SD_BIN:-$root/build/apps/streamdiffusion}"
  local extra=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --model) model="$2"; shift 2 ;;
      --threads) threads="$2"; shift 2 ;;
      --gpus) gpus=1; shift ;;
      --port) port="$2"; shift 2 ;;
      --max-streams) max_streams="$2"; shift 2 ;;
      --drain-seconds) drain="$2"; shift 2 ;;
      --run-dir) run_dir="$2"; shift 2 ;;
      --bin) bin="$2"; shift 2 ;;
      --ready-timeout) ready_timeout="$2"; shift 2 ;;
      --) shift; extra=("$@"); break ;;
      *) die "unknown option '$1' (see scripts/fleet.sh --help)" ;;
    esac
  done
  [[ "$port" =~ ^[0-9]+$ && "$port" -ge 1 && "$port" -le 65535 ]] || die "--port: expected 1..65535, got '$port'"
  [[ "$drain" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--drain-seconds: expected a number of seconds >= 0, got '$drain'"
  [[ "$max_streams" =~ ^[0-9]+$ && "$max_streams" -ge 1 ]] || die "--max-streams: expected a count >= 1, got '$max_streams'"
  [[ -z "$threads" || "$threads" =~ ^[0-9]+$ ]] || die "--threads: expected a count, got '$threads'"
  [[ -x "$bin" ]] || die "no streamdiffusion binary at $bin (build it, or give --bin / SD_BIN)"
  if [[ -z "$threads" ]]; then threads=$(( $(nproc) / n )); (( threads >= 1 )) || threads=1; fi
  if ! command -v nginx >/dev/null 2>&1 && [[ ! -x /usr/sbin/nginx ]]; then
    if [[ "${SD_FLEET_INSTALL_NGINX:-0}" == 1 ]]; then
      apt-get install -y -q nginx-light >&2 || die "apt-get install nginx-light failed"
    else
      die "nginx is not installed (apt-get install nginx-light, or SD_FLEET_INSTALL_NGINX=1 to let this script do it)"
    fi
  fi
  local nginx_bin
  nginx_bin="$(command -v nginx || echo /usr/sbin/nginx)"

  if ls "$run_dir"/worker-*.pid >/dev/null 2>&1 || [[ -f "$run_dir/nginx.pid" ]]; then
    die "a fleet seems to run from $run_dir already (scripts/fleet.sh stop --run-dir $run_dir first)"
  fi
  mkdir -p "$run_dir/nginx/tmp"
  chmod 1777 "$run_dir/nginx/tmp"  # nginx's worker process runs as nobody when started by root
  echo "$drain" > "$run_dir/drain-seconds"

  # Workers: each on a free loopback port (--port 0; the port is read from its "listening on" line).
  local i
  for i in $(seq 1 "$n"); do
    local args=(--log-level info serve --host 127.0.0.1 --port 0 --worker-id "w$i" --threads "$threads"
                --max-streams "$max_streams" --drain-seconds "$drain")
    [[ -n "$model" ]] && args+=(--model "$model")
    (( gpus )) && args+=(--device "cuda:$((i - 1))")
    "$bin" "${args[@]}" "${extra[@]}" > "$run_dir/worker-$i.log" 2>&1 &
    echo $! > "$run_dir/worker-$i.pid"
  done

  local deadline=$((SECONDS + ready_timeout)) ports=()
  for i in $(seq 1 "$n"); do
    local p=""
    while [[ -z "$p" ]]; do
      p="$(sed -n 's|^listening on http://127\.0\.0\.1:\([0-9]*\)/$|\1|p' "$run_dir/worker-$i.log" | head -n1)"
      if [[ -z "$p" ]]; then
        kill -0 "$(cat "$run_dir/worker-$i.pid")" 2>/dev/null || {
          tail -n 20 "$run_dir/worker-$i.log" >&2; cmd_stop >&2; die "worker $i exited before listening"; }
        (( SECONDS < deadline )) || { cmd_stop >&2; die "worker $i did not listen within ${ready_timeout} s"; }
        sleep 0.2
      fi
    done
    echo "$p" > "$run_dir/worker-$i.port"
    ports+=("$p")
  done
  for i in $(seq 1 "$n"); do
    until [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:${ports[$((i - 1))]}/api/ready")" == 200 ]]; do
      (( SECONDS < deadline )) || { cmd_stop >&2; die "worker $i not ready within ${ready_timeout} s"; }
      sleep 0.2
    done
  done

  # nginx: the template with this fleet's workers.
  local servers="" p
  for p in "${ports[@]}"; do servers+="    server 127.0.0.1:$p max_fails=1 fail_timeout=10s;"$'\n'; done
  local conf="$run_dir/nginx/nginx.conf"
  awk -v servers="$servers" -v run="$run_dir/nginx" -v port="$port" -v tries="$n" '
    { gsub(/@RUN_DIR@/, run); gsub(/@PORT@/, port); gsub(/@TRIES@/, tries); gsub(/@MAX_FAILS@/, "1");
      gsub(/@FAIL_TIMEOUT@/, "10s") }
    /^@SERVERS@$/ { printf "%s", servers; next }
    { print }' "$root/deploy/nginx/fleet.conf.template" > "$conf"
  "$nginx_bin" -t -q -p "$run_dir/nginx" -c "$conf" -e "$run_dir/nginx/error.log" ||
    { cmd_stop >&2; die "nginx -t refused $conf"; }
  "$nginx_bin" -p "$run_dir/nginx" -c "$conf" -e "$run_dir/nginx/error.log" > "$run_dir/nginx.log" 2>&1 &
  echo $! > "$run_dir/nginx.pid.launcher"
  until [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$port/api/ready")" == 200 ]]; do
    if ! kill -0 "$(cat "$run_dir/nginx.pid.launcher")" 2>/dev/null; then
      cat "$run_dir/nginx/error.log" "$run_dir/nginx.log" >&2 2>/dev/null || true
      cmd_stop >&2
      die "nginx exited (port $port in use?)"
    fi
    (( SECONDS < deadline )) || { cmd_stop >&2; die "nginx did not answer on 127.0.0.1:$port"; }
    sleep 0.1
  done
  mv "$run_dir/nginx.pid.launcher" "$run_dir/nginx.pid"  # the master (daemon off: the process started here)
  echo "fleet ready: http://127.0.0.1:$port/ ($n workers: ${ports[*]}; run dir $run_dir)"
}

case "${1:-}" in
  ""|-h|--help) usage ;;
  stop) shift; [[ "${1:-}" == --run-dir ]] && run_dir="$2"; cmd_stop ;;
  status) shift; [[ "${1:-}" == --run-dir ]] && run_dir="$2"; cmd_status ;;
  *) cmd_start "$@" ;;
esac
