#!/usr/bin/env bash
# floodwall load benchmark: floodwall vs a bare Pingora proxy vs the backend
# directly, measured side by side in one run. See BENCHMARKS.md.
#
#   benches/load.sh            full suite: 5 runs x 5 s per figure (~11 min)
#   benches/load.sh --quick    smoke test: 1 run x 2 s per figure (~1.5 min)
#
# Options: --runs N, --duration SECONDS, --latencies "0 20" (mock latency in
# ms), --no-build, --keep (keep the scratch directory with every log and raw
# wrk output), -h/--help.
#
# What it does, for each mock latency (0 ms, then 20 ms):
#   1. starts `floodwall mock` (the bundled mock LLM backend), the bare Pingora
#      proxy (examples/bare_proxy, built from benches/bare_proxy.rs), nginx as a
#      plain reverse proxy with limit_req and proxy_next_upstream (see
#      start_nginx below; one worker process) and four
#      floodwalls: the minimal policy (one route, one backend, no policies)
#      with its default logging (one access-log line per request, to a file)
#      and with the access log off; `floodwall+3rules` (the same route with
#      three in-memory rate-limit rules, limits so high that every request is
#      admitted: every rule is evaluated, none refuses); and
#      `floodwall+resilience` (retry with 3 attempts and a budget, a circuit
#      breaker on the backend, timeouts first_token/idle/total; the backend
#      is healthy, so nothing is ever retried or tripped). All on 127.0.0.1
#      with ephemeral ports, 2 worker threads per proxy;
#   2. warms each target up, then for every run measures each target (direct
#      to the mock, bare Pingora, the four floodwalls), in an order rotated
#      from run to run:
#        - c=1  (wrk -t1 -c1):  latency p50/p99;
#        - c=64 (wrk -t2 -c64): throughput;
#      and for both, the CPU time the target's process used per completed
#      request (for "direct": the mock's), summed over its threads from
#      /proc/PID/task/*/schedstat (utime+stime from /proc/PID/stat is kept in
#      the .tsv as a cross-check), and its peak RSS (VmHWM, reset through
#      /proc/PID/clear_refs first);
#   3. prints a Markdown table (median, [min-max] over the runs) and the
#      ratios against floodwall's targets, and writes it to
#      bench-results/load-<timestamp>.md (+ the raw rows as .tsv).
#
# The load is a small non-streaming chat call (benches/chat.lua): POST
# /v1/chat/completions with a JSON body. Every process started here is
# stopped by PID at the end, also on error or ctrl-c (SIGTERM, then SIGKILL
# after 3 s). Nothing is pinned: wrk, the proxy and the mock share the
# machine's cores, so on a small machine the absolute figures include that
# contention; compare the targets with each other, not with other machines.

set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

RUNS=5
DURATION=5
WARMUP=2
LATENCIES="0 20"
BUILD=1
KEEP=0
MODE=full
ARGS_GIVEN="$*"

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick; RUNS=1; DURATION=2; WARMUP=1 ;;
    --runs) RUNS=${2:?--runs needs a value}; shift ;;
    --duration) DURATION=${2:?--duration needs a value}; shift ;;
    --latencies) LATENCIES=${2:?--latencies needs a value}; shift ;;
    --no-build) BUILD=0 ;;
    --keep) KEEP=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "load.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
case "$RUNS$DURATION" in *[!0-9]*) echo "load.sh: --runs and --duration take whole numbers" >&2; exit 2 ;; esac
[ "$RUNS" -ge 1 ] && [ "$DURATION" -ge 1 ] || { echo "load.sh: --runs and --duration must be >= 1" >&2; exit 2; }

BENCH=load
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"

# --- prerequisites ----------------------------------------------------------

if ! command -v wrk >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "wrk is missing: apt-get install -y wrk"
    apt-get install -y wrk >&2 || { apt-get update >&2 && apt-get install -y wrk >&2; } \
      || die "could not install wrk"
  else
    die "wrk is missing: install it (Debian/Ubuntu: sudo apt-get install wrk), then rerun"
  fi
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if [ ! -x "$NGINX" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "nginx is missing: apt-get install -y nginx-light"
    apt-get install -y nginx-light >&2 || { apt-get update >&2 && apt-get install -y nginx-light >&2; } \
      || die "could not install nginx"
    NGINX=$(command -v nginx || echo /usr/sbin/nginx)
  else
    die "nginx is missing: install it (Debian/Ubuntu: sudo apt-get install nginx-light), then rerun"
  fi
fi
for tool in timeout awk curl python3; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is missing"
done
[ -r /proc/self/stat ] || die "/proc is needed (Linux only)"
CLK_TCK=$(getconf CLK_TCK)

if [ "$BUILD" = 1 ]; then
  log "cargo build --release --bin floodwall --example bare_proxy"
  cargo build --locked --release --bin floodwall --example bare_proxy >&2
fi
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps 2>/dev/null | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
TARGET_DIR=${TARGET_DIR:-$ROOT/target}
FLOODWALL=$TARGET_DIR/release/floodwall
BARE=$TARGET_DIR/release/examples/bare_proxy
[ -x "$FLOODWALL" ] || die "$FLOODWALL not built"
[ -x "$BARE" ] || die "$BARE not built"
LUA=$ROOT/benches/chat.lua

WORK=$(mktemp -d "${TMPDIR:-/tmp}/floodwall-bench.XXXXXX")
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS_DIR=$ROOT/bench-results
mkdir -p "$RESULTS_DIR"
TSV=$WORK/rows.tsv
printf 'latency_ms\trun\ttarget\tconns\trequests\tduration_us\trps\tp50_us\tp90_us\tp99_us\tmax_us\tcpu_us_per_req\tmock_cpu_us_per_req\thwm_kb\terrors\tcpu_ticks_us_per_req\n' >"$TSV"

# --- helpers ----------------------------------------------------------------

# One POST through a target, checked: 200 and a chat.completion body.
check_target() {
  local name=$1 addr=$2 out
  out=$(curl -sS -m 5 -o - -w '\n%{http_code}' -X POST "http://$addr/v1/chat/completions" \
    -H 'content-type: application/json' \
    -d '{"model":"mock-model","messages":[{"role":"user","content":"ping"}]}') \
    || die "$name at $addr does not answer"
  case "$out" in
    *'"chat.completion"'*$'\n'200) ;;
    *) die "$name at $addr: unexpected answer: $out" ;;
  esac
}

WRK_PID=""
# run_wrk NAME ADDR THREADS CONNS SECONDS OUTFILE
run_wrk() {
  local rc=0
  timeout -k 2 $(($5 + 30)) wrk -t"$3" -c"$4" -d"$5s" --timeout 5s --latency -s "$LUA" \
    "http://$2/v1/chat/completions" >"$6" 2>&1 &
  WRK_PID=$!
  PIDS+=("$WRK_PID")
  wait "$WRK_PID" || rc=$?
  stop_pid "$WRK_PID"
  WRK_PID=""
  [ "$rc" = 0 ] || die "wrk against $1 failed (exit $rc): $(tail -3 "$6")"
  grep -q '^WRK_RESULT ' "$6" || die "wrk against $1 printed no result: $(tail -3 "$6")"
}

# field FILE KEY: the value of KEY=value on the WRK_RESULT line.
field() { awk -v k="$2" '$1 == "WRK_RESULT" { for (i = 2; i <= NF; i++) if (index($i, k "=") == 1) print substr($i, length(k) + 2) }' "$1"; }

# measure LAT RUN TARGET ADDR PID MOCKPID CONNS THREADS
measure() {
  local lat=$1 run=$2 target=$3 addr=$4 pid=$5 mpid=$6 conns=$7 threads=$8
  local out=$WORK/wrk-$lat-$run-$target-c$conns.txt c0 c1 m0 m1 n0 n1 req dur errs
  reset_hwm "$pid"
  c0=$(cpu_ticks "$pid"); m0=$(cpu_ns "$mpid"); n0=$(cpu_ns "$pid")
  run_wrk "$target" "$addr" "$threads" "$conns" "$DURATION" "$out"
  n1=$(cpu_ns "$pid"); c1=$(cpu_ticks "$pid"); m1=$(cpu_ns "$mpid")
  req=$(field "$out" requests); dur=$(field "$out" duration_us)
  [ "${req:-0}" -gt 0 ] || die "no request completed against $target: $(tail -3 "$out")"
  errs=$(( $(field "$out" err_connect) + $(field "$out" err_read) + $(field "$out" err_write) \
    + $(field "$out" err_status) + $(field "$out" err_timeout) ))
  [ "$errs" = 0 ] || log "warning: $target c=$conns: $errs errors (see $out)"
  awk -v lat="$lat" -v run="$run" -v t="$target" -v c="$conns" -v req="$req" -v dur="$dur" \
    -v p50="$(field "$out" p50_us)" -v p90="$(field "$out" p90_us)" -v p99="$(field "$out" p99_us)" \
    -v max="$(field "$out" max_us)" -v dc=$((c1 - c0)) -v dn=$((n1 - n0)) -v dm=$((m1 - m0)) -v tck="$CLK_TCK" \
    -v hwm="$(hwm_kb "$pid")" -v errs="$errs" 'BEGIN {
      printf "%s\t%s\t%s\t%s\t%d\t%d\t%.1f\t%d\t%d\t%d\t%d\t%.2f\t%.2f\t%d\t%d\t%.2f\n",
        lat, run, t, c, req, dur, req / (dur / 1e6), p50, p90, p99, max,
        dn / 1e3 / req, dm / 1e3 / req, hwm, errs, dc * 1e6 / tck / req }' >>"$TSV"
  tail -1 "$TSV" | awk -F'\t' '{ printf "[load] %2s ms run %s %-20s c=%-2s %7d req %8.0f req/s p50 %5d us p99 %6d us cpu %6.1f us/req rss %d KiB\n",
    $1, $2, $3, $4, $5, $7, $8, $10, $12, $14 }' >&2
}

# --- one mock latency: start the targets, measure, stop ---------------------

# policy KIND MOCK_ADDR: the policy file of a floodwall target.
#   minimal:    one route (path_prefix /), one backend, no policies;
#   3rules:     the same route with three in-memory rate-limit rules: per-user
#               (identity from x-user-id, which benches/chat.lua sends) with
#               three windows (the shape of 10/min + 100/h + 500/day), a global
#               request rule and a global token rule; every limit is so high
#               that every request is admitted, so every rule is evaluated and
#               charged (and the token reservation reconciled) and none refuses;
#   resilience: the same route with retry (3 attempts, budget 20% + 10/s), a
#               circuit breaker on the backend, and timeouts first_token, idle
#               and total. The mock is healthy, so no retry or trip happens.
policy() {
  local kind=$1 mock_addr=$2 breaker="" route=""
  case "$kind" in
    minimal) ;;
    3rules) route='
    rate_limits:
      - name: per-user
        key: [user]
        limits:
          - { requests: 1000000000, per: 1m }
          - { requests: 1000000000, per: 1h }
          - { requests: 1000000000, per: 1d }
      - name: global
        key: [global]
        limits: [{ requests: 1000000000, per: 1m }]
      - name: tokens
        key: [global]
        limits: [{ tokens: 10000000000, per: 1m }]' ;;
    resilience)
      breaker='
    circuit_breaker: { window: 10s, failure_rate: 50%, min_requests: 20, open_for: 30s }'
      route='
    timeouts: { first_token: 10s, idle: 10s, total: 30s }
    retry:
      attempts: 3
      backoff: { base: 100ms, factor: 2, max: 2s }
      budget: { ratio: 20%, min_per_second: 10 }' ;;
    *) die "unknown policy kind $kind" ;;
  esac
  cat <<EOF
# floodwall load benchmark: policy "$kind" (see benches/load.sh).
version: 1
server:
  listen: ["127.0.0.1:0"]
  admin: { listen: 127.0.0.1:0 }
  threads: 2
  grace_period: 1s
EOF
  if [ "$kind" = 3rules ]; then printf 'identity:\n  user: [{ header: x-user-id }]\n'; fi
  cat <<EOF
backends:
  mock:
    endpoints: ["http://$mock_addr"]$breaker
routes:
  - name: all
    match: { path_prefix: / }
    backend: mock$route
EOF
}

# start_floodwall DIR NAME KIND MOCK_ADDR [ENV=VALUE...]: run floodwall with
# the policy KIND (see policy); prints its PID. The policy sits alone in its
# own directory: floodwall watches the policy's directory, and before 9ecf138
# any event there (such as a busy log file next to the policy) woke the watcher.
start_floodwall() {
  local dir=$1 name=$2 kind=$3 mock_addr=$4; shift 4
  mkdir -p "$dir/$name-policy"
  policy "$kind" "$mock_addr" >"$dir/$name-policy/floodwall.yaml"
  "$FLOODWALL" check "$dir/$name-policy/floodwall.yaml" >"$dir/$name.check" 2>&1 \
    || die "policy $kind does not validate: $(cat "$dir/$name.check")"
  env "$@" "$FLOODWALL" run --config "$dir/$name-policy/floodwall.yaml" --ready-file "$dir/$name.ready" \
    >"$dir/$name.out" 2>"$dir/$name.log" &
  echo $!
}

ready_addr() { sed -n 's/.*"listen":\["\([^"]*\)".*/\1/p' "$1"; }

# The targets, in table order: direct to the mock, bare Pingora, floodwall
# (default logging: info, text, one access line per request, written to a
# file), floodwall with the access log off (RUST_LOG=info,access=off), to
# show what the access log costs, then floodwall+3rules and
# floodwall+resilience (default logging), to show what those policies cost
# over the minimal floodwall.
TARGETS=(direct bare nginx floodwall floodwall_noaccess floodwall_3rules floodwall_resilience)

# start_nginx DIR MOCK_ADDR: nginx as a plain reverse proxy configured as
# closely as it can express floodwall's policies: keep-alive upstream
# connections, `limit_req` with a rate so high that every request is
# admitted (evaluated, never refusing, like floodwall+3rules),
# `proxy_next_upstream` on errors, timeouts and 502/503/504 (3 tries),
# connect/read timeouts, no response buffering (streams go through as they
# arrive), an access-log line per request to a file (buffered, as floodwall
# batches its own). One process (master_process off, one worker): its CPU
# per request is directly the process's; its throughput at c=64 is one
# core's. Writes DIR/nginx.ready like the others and prints its PID.
start_nginx() {
  local dir=$1 mock_addr=$2 port pid
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  mkdir -p "$dir/nginx"
  cat >"$dir/nginx/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $dir/nginx/nginx.pid;
error_log $dir/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log $dir/nginx/access.log combined buffer=64k flush=1s;
  client_body_temp_path $dir/nginx/body;
  proxy_temp_path $dir/nginx/proxy;
  limit_req_zone \$binary_remote_addr zone=bench:10m rate=100000000r/s;
  upstream mock {
    server $mock_addr;
    keepalive 64;
  }
  server {
    listen 127.0.0.1:$port;
    location / {
      limit_req zone=bench burst=1000000 nodelay;
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_next_upstream error timeout http_502 http_503 http_504;
      proxy_next_upstream_tries 3;
      proxy_connect_timeout 2s;
      proxy_read_timeout 30s;
      proxy_buffering off;
    }
  }
}
EOF
  "$NGINX" -p "$dir/nginx" -c "$dir/nginx/nginx.conf" -e "$dir/nginx/error.log" >"$dir/nginx.out" 2>&1 &
  pid=$!
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      printf '{"listen":["127.0.0.1:%s"]}\n' "$port" >"$dir/nginx.ready"
      break
    fi
    kill -0 "$pid" 2>/dev/null || die "nginx exited during start-up: $(cat "$dir/nginx/error.log" 2>/dev/null)"
    sleep 0.1
  done
  echo "$pid"
}

bench_latency() {
  local lat=$1 dir=$WORK/lat$1 fault=() mock_pid mock_addr run k i n
  local names=("${TARGETS[@]}") addrs=() pids=()
  n=${#names[@]}
  mkdir -p "$dir"
  [ "$lat" != 0 ] && fault=(--fault "latency=${lat}ms")

  "$FLOODWALL" mock --listen 127.0.0.1:0 "${fault[@]+"${fault[@]}"}" >"$dir/mock.out" 2>"$dir/mock.err" &
  mock_pid=$!; PIDS+=("$mock_pid")
  wait_file "$dir/mock.out" "$mock_pid" "the mock"
  mock_addr=$(sed -n 's|.*listening on http://\([0-9.]*:[0-9]*\).*|\1|p' "$dir/mock.out")
  [ -n "$mock_addr" ] || die "cannot read the mock's address from $dir/mock.out"
  addrs[0]=$mock_addr; pids[0]=$mock_pid

  "$BARE" --listen 127.0.0.1:0 --upstream "$mock_addr" --threads 2 --ready-file "$dir/bare.ready" \
    >"$dir/bare.out" 2>"$dir/bare.log" &
  pids[1]=$!; PIDS+=("${pids[1]}")
  pids[2]=$(start_nginx "$dir" "$mock_addr"); PIDS+=("${pids[2]}")
  pids[3]=$(start_floodwall "$dir" floodwall minimal "$mock_addr"); PIDS+=("${pids[3]}")
  pids[4]=$(start_floodwall "$dir" floodwall_noaccess minimal "$mock_addr" RUST_LOG=info,access=off); PIDS+=("${pids[4]}")
  pids[5]=$(start_floodwall "$dir" floodwall_3rules 3rules "$mock_addr"); PIDS+=("${pids[5]}")
  pids[6]=$(start_floodwall "$dir" floodwall_resilience resilience "$mock_addr"); PIDS+=("${pids[6]}")

  for ((i = 1; i < n; i++)); do
    wait_file "$dir/${names[$i]}.ready" "${pids[$i]}" "${names[$i]}"
    addrs[$i]=$(ready_addr "$dir/${names[$i]}.ready")
    [ -n "${addrs[$i]}" ] || die "cannot read the listen address from $dir/${names[$i]}.ready"
  done
  for ((i = 0; i < n; i++)); do
    log "mock latency ${lat} ms: ${names[$i]} on ${addrs[$i]} (PID ${pids[$i]})"
    check_target "${names[$i]}" "${addrs[$i]}"
  done
  for ((i = 0; i < n; i++)); do
    log "warm-up ${names[$i]} (${WARMUP}s, c=64)"
    run_wrk "${names[$i]}" "${addrs[$i]}" 2 64 "$WARMUP" "$dir/warmup-${names[$i]}.txt"
  done
  for ((run = 1; run <= RUNS; run++)); do
    for ((k = 0; k < n; k++)); do
      i=$(( (k + run - 1) % n ))
      measure "$lat" "$run" "${names[$i]}" "${addrs[$i]}" "${pids[$i]}" "$mock_pid" 1 1
      measure "$lat" "$run" "${names[$i]}" "${addrs[$i]}" "${pids[$i]}" "$mock_pid" 64 2
    done
  done
  for ((i = n - 1; i >= 0; i--)); do stop_pid "${pids[$i]}"; done
}

# --- run ----------------------------------------------------------------------

if rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null); then
  git -C "$ROOT" diff --quiet HEAD 2>/dev/null || rev="$rev (+ uncommitted changes)"
else
  rev="unknown (not a git checkout)"
fi
MACHINE="nproc $(nproc), $(uname -sr), $(rustc --version 2>/dev/null), $( (wrk --version 2>&1 || true) | awk 'NR == 1 {print $1, $2}')"
CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
START=$(date +%s)
log "mode $MODE: $RUNS run(s) x ${DURATION}s per figure, mock latencies: $LATENCIES ms; scratch $WORK"

for lat in $LATENCIES; do
  case "$lat" in *[!0-9]*|'') die "--latencies takes whole milliseconds" ;; esac
  bench_latency "$lat"
done
ELAPSED=$(( $(date +%s) - START ))
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report -----------------------------------------------------------------

MD=$RESULTS_DIR/load-$STAMP.md
{
  echo "# floodwall load benchmark, $STAMP"
  echo
  echo "- command: \`benches/load.sh${ARGS_GIVEN:+ $ARGS_GIVEN}\` ($MODE: $RUNS run(s) x ${DURATION} s per figure, ${ELAPSED} s in all)"
  echo "- commit: $rev"
  echo "- machine: $MACHINE${CPU_MODEL:+, $CPU_MODEL}; load average before: $LOAD_BEFORE, after: $LOAD_AFTER"
  echo "- load: wrk, POST /v1/chat/completions (small JSON chat body, non-streaming), 127.0.0.1 only;"
  echo "  c=1: \`wrk -t1 -c1\`, c=64: \`wrk -t2 -c64\`; proxies run 2 worker threads; nothing pinned"
  echo "  (wrk, proxy and mock share the cores)."
  echo "- each cell: median [min-max] over the runs; \"added\" = target minus direct, paired run by run;"
  echo "  CPU = CPU time of the target's process (all threads) per completed request (direct: the mock's),"
  echo "  from /proc/PID/task/*/schedstat (utime+stime from /proc/PID/stat is in the .tsv as a cross-check);"
  echo "  RSS = VmHWM of that process after the c=64 run (reset before each measurement, but the"
  echo "  allocators keep what they got, so in effect the peak so far)."
  echo "- targets: direct = wrk to the mock; bare Pingora = benches/bare_proxy.rs; nginx = one nginx"
  echo "  process as a reverse proxy with keep-alive upstreams, limit_req (admitting every request) and"
  echo "  proxy_next_upstream (see start_nginx in benches/load.sh); floodwall = minimal"
  echo "  policy, default logging (one text access-log line per request, stderr to a file); floodwall,"
  echo "  access log off = the same with RUST_LOG=info,access=off; floodwall+3rules = the minimal policy"
  echo "  plus three in-memory rate-limit rules (per-user x3 windows, global, tokens) that admit every"
  echo "  request; floodwall+resilience = the minimal policy plus retry (3 attempts, budget), a circuit"
  echo "  breaker and timeouts first_token/idle/total, on the healthy mock. Both with default logging."
  echo
  awk -F'\t' -v runs="$RUNS" '
    function sort(a, n,   i, j, t) { for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t } }
    # median [min-max] of the values stored under key k (v[k, 1..n[k]])
    function stat(k, fmt,   a, m, i, med) {
      m = n[k]; if (m == 0) return "-"
      for (i = 1; i <= m; i++) a[i] = v[k, i]
      sort(a, m)
      med = (m % 2) ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
      if (m == 1) return sprintf(fmt, med)
      return sprintf(fmt " [" fmt "-" fmt "]", med, a[1], a[m])
    }
    function add(k, x) { n[k]++; v[k, n[k]] = x }
    NR == 1 { next }
    {
      lat = $1; run = $2; t = $3; c = $4
      if (!(lat in seen)) { seen[lat] = 1; lats[++nl] = lat }
      r[lat, run, t, c, "p50"] = $8; r[lat, run, t, c, "p99"] = $10
      r[lat, run, t, c, "rps"] = $7; r[lat, run, t, c, "cpu"] = $12; r[lat, run, t, c, "hwm"] = $14
      r[lat, run, t, c, "ok"] = 1; errs += $15
      if (run > maxrun) maxrun = run
    }
    END {
      nt = split("direct bare nginx floodwall floodwall_noaccess floodwall_3rules floodwall_resilience", T, " ")
      label["direct"] = "direct (mock)"; label["bare"] = "bare Pingora"; label["floodwall"] = "floodwall"
      label["nginx"] = "nginx (limit_req, proxy_next_upstream)"
      label["floodwall_noaccess"] = "floodwall, access log off"
      label["floodwall_3rules"] = "floodwall+3rules"; label["floodwall_resilience"] = "floodwall+resilience"
      for (li = 1; li <= nl; li++) {
        lat = lats[li]
        for (run = 1; run <= maxrun; run++) for (ti = 1; ti <= nt; ti++) {
          t = T[ti]
          if (!((lat, run, t, 1, "ok") in r) || !((lat, run, t, 64, "ok") in r)) continue
          add(lat SUBSEP t SUBSEP "p50", r[lat, run, t, 1, "p50"])
          add(lat SUBSEP t SUBSEP "p99", r[lat, run, t, 1, "p99"])
          add(lat SUBSEP t SUBSEP "rps", r[lat, run, t, 64, "rps"])
          add(lat SUBSEP t SUBSEP "cpu64", r[lat, run, t, 64, "cpu"])
          add(lat SUBSEP t SUBSEP "cpu1", r[lat, run, t, 1, "cpu"])
          add(lat SUBSEP t SUBSEP "rss", r[lat, run, t, 64, "hwm"] / 1024)
          if (t != "direct" && ((lat, run, "direct", 1, "ok") in r)) {
            add(lat SUBSEP t SUBSEP "a50", r[lat, run, t, 1, "p50"] - r[lat, run, "direct", 1, "p50"])
            add(lat SUBSEP t SUBSEP "a99", r[lat, run, t, 1, "p99"] - r[lat, run, "direct", 1, "p99"])
          }
          if (t ~ /^floodwall/ && ((lat, run, "bare", 64, "ok") in r)) {
            add(lat SUBSEP t SUBSEP "ratio64", r[lat, run, t, 64, "cpu"] / r[lat, run, "bare", 64, "cpu"])
            add(lat SUBSEP t SUBSEP "ratio1", r[lat, run, t, 1, "cpu"] / r[lat, run, "bare", 1, "cpu"])
          }
          if (t ~ /^floodwall/ && ((lat, run, "nginx", 64, "ok") in r)) {
            add(lat SUBSEP t SUBSEP "nginx64", r[lat, run, t, 64, "cpu"] / r[lat, run, "nginx", 64, "cpu"])
          }
          # The policy targets against the minimal floodwall (both with the access log on).
          if (t ~ /^floodwall_/ && t != "floodwall_noaccess" && ((lat, run, "floodwall", 64, "ok") in r)) {
            add(lat SUBSEP t SUBSEP "frps", r[lat, run, t, 64, "rps"] / r[lat, run, "floodwall", 64, "rps"])
            add(lat SUBSEP t SUBSEP "fcpu64", r[lat, run, t, 64, "cpu"] / r[lat, run, "floodwall", 64, "cpu"])
            add(lat SUBSEP t SUBSEP "fdcpu64", r[lat, run, t, 64, "cpu"] - r[lat, run, "floodwall", 64, "cpu"])
            add(lat SUBSEP t SUBSEP "fcpu1", r[lat, run, t, 1, "cpu"] / r[lat, run, "floodwall", 1, "cpu"])
            add(lat SUBSEP t SUBSEP "fp50", r[lat, run, t, 1, "p50"] - r[lat, run, "floodwall", 1, "p50"])
          }
        }
        printf "## Mock latency %s ms\n\n", lat
        print "| target | p50 c=1 (µs) | p99 c=1 (µs) | added p50 (µs) | added p99 (µs) | req/s c=64 | CPU µs/req c=64 | CPU µs/req c=1 | peak RSS (MiB) |"
        print "|---|---|---|---|---|---|---|---|---|"
        for (ti = 1; ti <= nt; ti++) {
          t = T[ti]; k = lat SUBSEP t SUBSEP
          if (n[k "p50"] == 0) continue
          printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", label[t],
            stat(k "p50", "%d"), stat(k "p99", "%d"),
            (t == "direct") ? "-" : stat(k "a50", "%+d"), (t == "direct") ? "-" : stat(k "a99", "%+d"),
            stat(k "rps", "%.0f"), stat(k "cpu64", "%.1f"), stat(k "cpu1", "%.1f"), stat(k "rss", "%.1f")
        }
        print ""
      }
      print "## Ratios vs targets (floodwall vs bare Pingora, measured side by side)"
      print ""
      print "| mock latency | target | CPU/req ÷ bare, c=64 (target ≤ 1.15×) | CPU/req ÷ bare, c=1 | CPU/req ÷ nginx, c=64 (with policies: target ≤ 2.5×) | added p99, c=1 (target < 300 µs) |"
      print "|---|---|---|---|---|---|"
      for (li = 1; li <= nl; li++) for (ti = 4; ti <= nt; ti++) {
        lat = lats[li]; t = T[ti]; k = lat SUBSEP t SUBSEP
        if (n[k "ratio64"] == 0) continue
        # The targets are for floodwall without policies; the policy targets are shown for reference.
        nopol = (t == "floodwall" || t == "floodwall_noaccess")
        printf "| %s ms | %s | %s %s | %s | %s %s | %s %s |\n", lat, label[t],
          stat(k "ratio64", "%.2f×"), !nopol ? "(n/a: policies)" : (v_med(k "ratio64") <= 1.15) ? "(met)" : "(**missed**)",
          stat(k "ratio1", "%.2f×"),
          stat(k "nginx64", "%.2f×"), (n[k "nginx64"] == 0 || nopol) ? "" : (v_med(k "nginx64") <= 2.5) ? "(met)" : "(**missed**)",
          stat(k "a99", "%+d"), !nopol ? "" : (v_med(k "a99") < 300) ? "(met)" : "(**missed**)"
      }
      print ""
      print "## Policies vs floodwall without policies (measured side by side, paired run by run)"
      print ""
      print "\"within noise\": the [min-max] of the paired CPU ratio over the runs includes 1.00."
      print ""
      print "| mock latency | target | req/s c=64 ÷ floodwall (3 rules: target ≥ 0.90×) | CPU/req ÷ floodwall, c=64 | CPU µs/req added, c=64 | CPU/req ÷ floodwall, c=1 | added p50 c=1 vs floodwall (µs) |"
      print "|---|---|---|---|---|---|---|"
      for (li = 1; li <= nl; li++) for (ti = 6; ti <= nt; ti++) {
        lat = lats[li]; t = T[ti]; k = lat SUBSEP t SUBSEP
        if (n[k "frps"] == 0) continue
        noise = (v_min(k "fcpu64") <= 1 && v_max(k "fcpu64") >= 1) ? "(within noise)" : "(above noise)"
        if (v_max(k "fcpu64") < 1) noise = "(below 1: noise)"
        if (n[k "fcpu64"] < 3) noise = "(too few runs to judge noise)"
        printf "| %s ms | %s | %s %s | %s %s | %s | %s | %s |\n", lat, label[t],
          stat(k "frps", "%.2f×"), (t != "floodwall_3rules") ? "" : (v_med(k "frps") >= 0.9) ? "(met)" : "(**missed**)",
          stat(k "fcpu64", "%.2f×"), noise, stat(k "fdcpu64", "%+.1f"),
          stat(k "fcpu1", "%.2f×"), stat(k "fp50", "%+d")
      }
      print ""
      if (errs > 0) printf "**%d request errors during the runs** (see the .tsv and the warnings on stderr).\n\n", errs
      else print "No request errors (connect/read/write/timeout/non-2xx) in any run."
    }
    function v_min(k,   m, i, x) {
      m = n[k]; x = v[k, 1]
      for (i = 2; i <= m; i++) if (v[k, i] < x) x = v[k, i]
      return x
    }
    function v_max(k,   m, i, x) {
      m = n[k]; x = v[k, 1]
      for (i = 2; i <= m; i++) if (v[k, i] > x) x = v[k, i]
      return x
    }
    function v_med(k,   a, m, i) {
      m = n[k]; if (m == 0) return 0
      for (i = 1; i <= m; i++) a[i] = v[k, i]
      sort(a, m)
      return (m % 2) ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
    }
  ' "$TSV"
} >"$MD"
cp "$TSV" "${MD%.md}.tsv"
echo
cat "$MD"
echo
log "written: $MD (raw rows: ${MD%.md}.tsv)"
