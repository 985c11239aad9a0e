#!/usr/bin/env bash
# floodwall load benchmark: floodwall vs a bare Pingora proxy vs the backend
# directly, measured side by side in one run. See BENCHMARKS.md.
#
#   benches/load.sh            full: 5 runs x 5 s per figure, every target (~25 min)
#   benches/load.sh --quick    smoke test: 1 run x 2 s per figure (~2.5 min)
#
# Options: --runs N, --duration SECONDS, --latencies "0 20" (mock latency in
# ms), --conns "1 64 256" (connection counts; 1 is required), --targets
# "direct bare nginx floodwall ..." (a subset of the targets below, in table
# order; direct is always measured), --profile release|debug (which cargo
# build to measure; debug only for smoke tests), --summary FILE (append the
# headline rows, tab-separated, for benches/suite.sh), --pin (the proxies
# on CPU 1, wrk, the mock and Redis on CPU 0; see the end of this header),
# --no-build, --keep (keep the scratch directory with every log and raw wrk
# output), -h/--help.
#
# What it does, for each mock latency (0 ms, then 20 ms):
#   1. starts `floodwall mock` (the bundled mock LLM backend), the bare Pingora
#      proxy (examples/bare_proxy, built from benches/bare_proxy.rs), nginx as a
#      plain reverse proxy with limit_req and proxy_next_upstream (see
#      start_nginx below; one worker process) and six
#      floodwalls: the minimal policy (one route, one backend, no policies)
#      with its default logging (one access-log line per request, to a file)
#      and with the access log off; `floodwall+3rules` (the same route with
#      three in-memory rate-limit rules, limits so high that every request is
#      admitted: every rule is evaluated, none refuses); and
#      `floodwall+resilience` (retry with 3 attempts and a budget, a circuit
#      breaker on the backend, timeouts first_token/idle/total; the backend
#      is healthy, so nothing is ever retried or tripped); and
#      `floodwall+copilot` / `floodwall+copilot+Redis`: the full
#      research-copilot example policy (examples/research-copilot.yaml, made
#      benchmarkable by benches/copilot-policy.py: ports, backends at the
#      mock, every rate limit at 10^9 so that every request is admitted),
#      state in memory, then in a private redis-server on a free port
#      (started and stopped here, never a shared instance). Their load goes
#      to the example's `chat` route (POST /chat/v1/chat/completions, an
#      HS256 JWT in Authorization naming user bench-user-1, tier premium):
#      JWT identity, the per-IP and per-user chat rate limits (2 rules, both
#      charged per request, in Redis for the second), the JSON request
#      checks (max_body, json, max_messages, a field limit) and the streams
#      limit. After every measurement the script checks on floodwall's
#      /metrics that both rules decided for every request and refused none
#      (and, with Redis, that no Redis call failed). All on 127.0.0.1
#      with ephemeral ports, 2 worker threads per proxy;
#   2. warms each target up, then for every run measures each target (direct
#      to the mock, bare Pingora, the four floodwalls), in an order rotated
#      from run to run:
#        - c=1   (wrk -t1 -c1):   latency p50/p99;
#        - c=64  (wrk -t2 -c64):  throughput and its p99;
#        - c=256 (wrk -t2 -c256): throughput and its p99 (a throughput
#          whose p99 is 50 ms or more is flagged in the table);
#      and for both, the CPU time the target's process used per completed
#      request (for "direct": the mock's), summed over its threads from
#      /proc/PID/task/*/schedstat (utime+stime from /proc/PID/stat is kept in
#      the .tsv as a cross-check), and its peak RSS (VmHWM, reset through
#      /proc/PID/clear_refs first); with the Redis target, once per run, a
#      bare Redis round trip (`redis-benchmark -c 1 PING`) to set beside
#      what Redis adds per request;
#   3. prints a Markdown table (median, [min-max] over the runs) and the
#      ratios against floodwall's targets, and writes it to
#      bench-results/load-<timestamp>.md (+ the raw rows as .tsv).
#
# The load is a small non-streaming chat call (benches/chat.lua): POST
# /v1/chat/completions with a JSON body. Any non-2xx answer stops the
# script (a refused request would make a figure the cost of a 429).
# Every process started here is
# stopped by PID at the end, also on error or ctrl-c (SIGTERM, then SIGKILL
# after 3 s). By default nothing is pinned: wrk, the proxy and the mock
# share the machine's cores, so on a small machine the absolute figures
# include that contention; compare the targets with each other, not with
# other machines. With --pin (taskset) every proxy under test (bare Pingora,
# nginx, each floodwall; 2 worker threads, nginx 1 process) runs on CPU 1 and
# the load side (wrk, the mock, redis-server) on CPU 0: the proxy's CPU time
# is then not interleaved with the load generator's on the same core, and a
# proxy's throughput is at most one core's.

set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

RUNS=5
DURATION=5
WARMUP=2
LATENCIES="0 20"
CONNS="1 64 256"
ALL_TARGETS="direct bare nginx floodwall floodwall_noaccess floodwall_3rules floodwall_resilience floodwall_copilot floodwall_copilot_redis"
WANT_TARGETS=$ALL_TARGETS
PROFILE=release
SUMMARY=""
BUILD=1
KEEP=0
PIN=0
MODE=full
ARGS_GIVEN="$*"

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick; RUNS=1; DURATION=2; WARMUP=1 ;;
    --runs) RUNS=${2:?--runs needs a value}; shift ;;
    --duration) DURATION=${2:?--duration needs a value}; shift ;;
    --latencies) LATENCIES=${2:?--latencies needs a value}; shift ;;
    --conns) CONNS=${2:?--conns needs a value}; shift ;;
    --targets) WANT_TARGETS=${2:?--targets needs a value}; shift ;;
    --profile) PROFILE=${2:?--profile needs release or debug}; shift ;;
    --summary) SUMMARY=${2:?--summary needs a file}; shift ;;
    --no-build) BUILD=0 ;;
    --keep) KEEP=1 ;;
    --pin) PIN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "load.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
case "$RUNS$DURATION" in *[!0-9]*) echo "load.sh: --runs and --duration take whole numbers" >&2; exit 2 ;; esac
[ "$RUNS" -ge 1 ] && [ "$DURATION" -ge 1 ] || { echo "load.sh: --runs and --duration must be >= 1" >&2; exit 2; }
case " $CONNS " in *" 1 "*) ;; *) echo "load.sh: --conns must include 1 (the latency figures)" >&2; exit 2 ;; esac
for c in $CONNS; do
  case "$c" in ''|*[!0-9]*|0) echo "load.sh: --conns takes whole numbers >= 1" >&2; exit 2 ;; esac
done
# The targets, in table order (see the header): direct is the baseline of
# every "added" figure, so it is always measured.
TARGETS=(direct)
for t in $ALL_TARGETS; do
  [ "$t" = direct ] && continue
  case " $WANT_TARGETS " in *" $t "*) TARGETS+=("$t") ;; esac
done
for t in $WANT_TARGETS; do
  case " $ALL_TARGETS " in *" $t "*) ;; *) echo "load.sh: unknown target $t (one of: $ALL_TARGETS)" >&2; exit 2 ;; esac
done
case "$PROFILE" in release|debug) ;; *) echo "load.sh: --profile takes release or debug" >&2; exit 2 ;; esac

BENCH=load
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"

[ "$PIN" = 1 ] && pin_setup

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
WITH_REDIS=0
case " ${TARGETS[*]} " in *" floodwall_copilot_redis "*) WITH_REDIS=1 ;; esac
if [ "$WITH_REDIS" = 1 ]; then
  for tool in redis-server redis-cli redis-benchmark; do
    command -v "$tool" >/dev/null 2>&1 \
      || die "$tool is missing (Debian/Ubuntu: sudo apt-get install redis-server redis-tools), then rerun"
  done
fi
[ -r /proc/self/stat ] || die "/proc is needed (Linux only)"
CLK_TCK=$(getconf CLK_TCK)

if [ "$BUILD" = 1 ]; then
  flag=(--release); [ "$PROFILE" = debug ] && flag=()
  log "cargo build ${flag[*]} --bin floodwall --example bare_proxy"
  cargo build --locked "${flag[@]+"${flag[@]}"}" --bin floodwall --example bare_proxy >&2
fi
BIN=$(bin_dir "$PROFILE")
FLOODWALL=$BIN/floodwall
BARE=$BIN/examples/bare_proxy
[ -x "$FLOODWALL" ] || die "$FLOODWALL not built"
[ -x "$BARE" ] || die "$BARE not built"
LUA=$ROOT/benches/chat.lua
COPILOT_EXAMPLE=$ROOT/examples/research-copilot.yaml
[ -r "$COPILOT_EXAMPLE" ] || die "$COPILOT_EXAMPLE is missing"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/floodwall-bench.XXXXXX")
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS_DIR=$ROOT/bench-results
mkdir -p "$RESULTS_DIR"
TSV=$WORK/rows.tsv
printf 'latency_ms\trun\ttarget\tconns\trequests\tduration_us\trps\tp50_us\tp90_us\tp99_us\tmax_us\tcpu_us_per_req\tmock_cpu_us_per_req\thwm_kb\terrors\tcpu_ticks_us_per_req\tredis_cmds_per_req\tredis_cpu_us_per_req\tlimiter_store_errors\tredis_reads_per_req\n' >"$TSV"
RTT_TSV=$WORK/redis-rtt.tsv
printf 'latency_ms\trun\tp50_us\tp99_us\tavg_us\trps\n' >"$RTT_TSV"

# --- helpers ----------------------------------------------------------------

# Per target (set for each mock latency): the request path, the
# Authorization header ("" for none) and floodwall's admin address ("" for
# the others).
declare -A T_PATH T_AUTH T_ADMIN

# One POST through target NAME at ADDR, checked: 200 and a chat.completion body.
check_target() {
  local name=$1 addr=$2 out auth=()
  [ -n "${T_AUTH[$name]:-}" ] && auth=(-H "authorization: ${T_AUTH[$name]}")
  out=$(curl -sS -m 5 -o - -w '\n%{http_code}' -X POST "http://$addr${T_PATH[$name]}" \
    -H 'content-type: application/json' "${auth[@]+"${auth[@]}"}" \
    -d '{"model":"mock-model","messages":[{"role":"user","content":"ping"}]}') \
    || die "$name at $addr does not answer"
  case "$out" in
    *'"chat.completion"'*$'\n'200) ;;
    *) die "$name at $addr: unexpected answer: $out" ;;
  esac
}

WRK_PID=""
# run_wrk NAME ADDR THREADS CONNS SECONDS OUTFILE: NAME's path and
# Authorization go to benches/chat.lua through BENCH_PATH and BENCH_AUTHORIZATION.
run_wrk() {
  local rc=0
  BENCH_PATH=${T_PATH[$1]} BENCH_AUTHORIZATION=${T_AUTH[$1]:-} \
    timeout -k 2 $(($5 + 30)) "${ON_LOAD[@]+"${ON_LOAD[@]}"}" wrk -t"$3" -c"$4" -d"$5s" --timeout 5s --latency -s "$LUA" \
    "http://$2${T_PATH[$1]}" >"$6" 2>&1 &
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

# rule_counts ADMIN: "decided limited other store_errors store_calls" from
# floodwall's /metrics: rate-limit decisions of the copilot chat route's two
# rules (per-ip and chat-per-user): every result, "limited" (refused), and
# any other result but "allowed" (failed_open, ...); then the rate
# limiter's Redis errors and its decisions through Redis (0 in memory).
rule_counts() {
  curl -sS -m 5 "http://$1/metrics" | awk '
    /^floodwall_ratelimit_decisions_total\{/ && /rule="(per-ip|chat-per-user)"/ {
      d += $NF
      if ($0 ~ /result="limited"/) l += $NF
      else if ($0 !~ /result="allowed"/) o += $NF
    }
    /^floodwall_limiter_store_errors_total/ { e += $NF }
    /^floodwall_limiter_store_duration_seconds_count/ { c += $NF }
    END { printf "%d %d %d %d %d\n", d, l, o, e, c }'
}

# measure LAT RUN TARGET ADDR PID MOCKPID CONNS THREADS
measure() {
  local lat=$1 run=$2 target=$3 addr=$4 pid=$5 mpid=$6 conns=$7 threads=$8
  local out=$WORK/wrk-$lat-$run-$target-c$conns.txt c0 c1 m0 m1 n0 n1 req dur errs status
  local admin=${T_ADMIN[$target]:-} rules0="" rules1 k0=- k1=- r0=0 r1=0 rcmds=- rcpu=- q0=0 q1=0 rreads=-
  local d0 x0 o0 e0 s0 d1 x1 o1 e1 s1 serr=0
  [[ $target == floodwall_copilot* ]] && rules0=$(rule_counts "$admin")
  # Commands and reads from one INFO each side; the INFO after the run is
  # itself one read and one command, taken off below.
  if [ "$target" = floodwall_copilot_redis ]; then read -r k0 q0 <<<"$(redis_counts)"; r0=$(cpu_ns "$REDIS_PID"); fi
  reset_hwm "$pid"
  c0=$(cpu_ticks "$pid"); m0=$(cpu_ns "$mpid"); n0=$(cpu_ns "$pid")
  run_wrk "$target" "$addr" "$threads" "$conns" "$DURATION" "$out"
  n1=$(cpu_ns "$pid"); c1=$(cpu_ticks "$pid"); m1=$(cpu_ns "$mpid")
  if [ "$target" = floodwall_copilot_redis ]; then read -r k1 q1 <<<"$(redis_counts)"; r1=$(cpu_ns "$REDIS_PID"); fi
  req=$(field "$out" requests); dur=$(field "$out" duration_us)
  [ "${req:-0}" -gt 0 ] || die "no request completed against $target: $(tail -3 "$out")"
  status=$(field "$out" err_status)
  [ "$status" = 0 ] || die "$target c=$conns: $status non-2xx answers (see $out): a figure must not include refusals"
  errs=$(( $(field "$out" err_connect) + $(field "$out" err_read) + $(field "$out" err_write) \
    + status + $(field "$out" err_timeout) ))
  [ "$errs" = 0 ] || log "warning: $target c=$conns: $errs errors (see $out)"
  if [ -n "$rules0" ]; then
    # Both rules decided for every completed request (requests still in
    # flight when wrk stopped may add a few), and none was refused.
    rules1=$(rule_counts "$admin")
    read -r d0 x0 o0 e0 s0 <<<"$rules0"; read -r d1 x1 o1 e1 s1 <<<"$rules1"
    [ $((d1 - d0)) -ge $((2 * req)) ] \
      || die "$target c=$conns: $((d1 - d0)) rate-limit decisions for $req requests (expected 2 per request: per-ip, chat-per-user)"
    [ "$x1" = "$x0" ] || die "$target c=$conns: $((x1 - x0)) rate-limit refusals: the limits must admit every request"
    # Redis errors (timeouts: the example's store timeout is 50 ms) are
    # part of the result, not a broken harness: the rules then decide by
    # their on_store_error (local), the figure is reported with the count.
    serr=$((e1 - e0))
    [ "$serr" = 0 ] && [ "$o1" = "$o0" ] \
      || log "warning: $target c=$conns: $serr Redis errors in the rate limiter, $((o1 - o0)) decisions neither allowed nor limited (see the table)"
    if [ "$target" = floodwall_copilot_redis ]; then
      [ $((s1 - s0)) -ge "$req" ] || die "$target c=$conns: only $((s1 - s0)) rate-limit calls through Redis for $req requests"
      rcmds=$(awk -v a="$k0" -v b="$k1" -v n="$req" 'BEGIN { printf "%.2f", (b - a - 1) / n }')
      rreads=$(awk -v a="$q0" -v b="$q1" -v n="$req" 'BEGIN { printf "%.2f", (b - a - 1) / n }')
      rcpu=$(awk -v a="$r0" -v b="$r1" -v n="$req" 'BEGIN { printf "%.2f", (b - a) / 1e3 / n }')
    elif [ "$s1" != "$s0" ]; then
      die "$target c=$conns: rate-limit calls through Redis without Redis"
    fi
  fi
  awk -v lat="$lat" -v run="$run" -v t="$target" -v c="$conns" -v req="$req" -v dur="$dur" \
    -v p50="$(field "$out" p50_us)" -v p90="$(field "$out" p90_us)" -v p99="$(field "$out" p99_us)" \
    -v max="$(field "$out" max_us)" -v dc=$((c1 - c0)) -v dn=$((n1 - n0)) -v dm=$((m1 - m0)) -v tck="$CLK_TCK" \
    -v hwm="$(hwm_kb "$pid")" -v errs="$errs" -v rcmds="$rcmds" -v rcpu="$rcpu" -v serr="$serr" -v rreads="$rreads" 'BEGIN {
      printf "%s\t%s\t%s\t%s\t%d\t%d\t%.1f\t%d\t%d\t%d\t%d\t%.2f\t%.2f\t%d\t%d\t%.2f\t%s\t%s\t%d\t%s\n",
        lat, run, t, c, req, dur, req / (dur / 1e6), p50, p90, p99, max,
        dn / 1e3 / req, dm / 1e3 / req, hwm, errs, dc * 1e6 / tck / req, rcmds, rcpu, serr, rreads }' >>"$TSV"
  tail -1 "$TSV" | awk -F'\t' '{ printf "[load] %2s ms run %s %-24s c=%-3s %7d req %8.0f req/s p50 %5d us p99 %6d us cpu %6.1f us/req rss %d KiB%s\n",
    $1, $2, $3, $4, $5, $7, $8, $10, $12, $14, ($17 == "-") ? "" : " redis cmds/req " $17 ", reads/req " $20 }' >&2
}

# measure_rtt LAT RUN: one bare Redis round trip, to set beside what the
# Redis target adds per request: redis-benchmark, one connection, back to
# back, PING (the smallest command: the round trip itself).
measure_rtt() {
  local lat=$1 run=$2 out=$WORK/rtt-$1-$2.csv n=20000
  [ "$MODE" = quick ] && n=2000
  timeout 120 redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c 1 -n "$n" --csv PING >"$out" 2>&1 \
    || die "redis-benchmark failed: $(tail -3 "$out")"
  awk -F, -v lat="$lat" -v run="$run" '
    { gsub(/"/, "") }
    NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
    NR == 2 { printf "%s\t%s\t%.1f\t%.1f\t%.1f\t%.0f\n", lat, run, $col["p50_latency_ms"] * 1000,
              $col["p99_latency_ms"] * 1000, $col["avg_latency_ms"] * 1000, $col["rps"] }' "$out" >>"$RTT_TSV"
  [ "$(tail -1 "$RTT_TSV" | cut -f1,2)" = "$lat"$'\t'"$run" ] || die "cannot read redis-benchmark's output: $(cat "$out")"
  tail -1 "$RTT_TSV" | awk -F'\t' '{ printf "[load] %2s ms run %s redis PING round trip c=1: p50 %.1f us p99 %.1f us\n", $1, $2, $3, $4 }' >&2
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
# the policy KIND (see policy; copilot_memory and copilot_redis: the
# research-copilot example through benches/copilot-policy.py, with the
# secrets it names set here, and REDIS_URL pointing at the private
# redis-server); prints its PID. The policy sits alone in its
# own directory: floodwall watches the policy's directory, and before 9ecf138
# any event there (such as a busy log file next to the policy) woke the watcher.
start_floodwall() {
  local dir=$1 name=$2 kind=$3 mock_addr=$4; shift 4
  mkdir -p "$dir/$name-policy"
  case "$kind" in
    copilot_memory|copilot_redis)
      python3 "$ROOT/benches/copilot-policy.py" "$COPILOT_EXAMPLE" "${kind#copilot_}" "$mock_addr" \
        >"$dir/$name-policy/floodwall.yaml" || die "cannot make the copilot policy"
      set -- "$@" COPILOT_JWT_SECRET="$JWT_SECRET" FLOODWALL_ADMIN_TOKEN="$JWT_SECRET"
      [ "$kind" = copilot_redis ] && set -- "$@" REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" ;;
    *) policy "$kind" "$mock_addr" >"$dir/$name-policy/floodwall.yaml" ;;
  esac
  env "$@" "$FLOODWALL" check "$dir/$name-policy/floodwall.yaml" >"$dir/$name.check" 2>&1 \
    || die "policy $kind does not validate: $(cat "$dir/$name.check")"
  "${ON_PROXY[@]+"${ON_PROXY[@]}"}" env "$@" "$FLOODWALL" run --config "$dir/$name-policy/floodwall.yaml" --ready-file "$dir/$name.ready" \
    >"$dir/$name.out" 2>"$dir/$name.log" &
  echo $!
}

# The targets, in table order: direct to the mock, bare Pingora, nginx,
# floodwall (default logging: info, text, one access line per request,
# written to a file), floodwall with the access log off
# (RUST_LOG=info,access=off), to show what the access log costs, then
# floodwall+3rules, floodwall+resilience and floodwall+copilot (memory, then
# Redis), all with default logging, to show what those policies cost over
# the minimal floodwall. (TARGETS, the ones measured, is set from --targets.)

# The copilot targets' identity: an HS256 JWT (sub bench-user-1, tier
# premium, no expiry) signed with a secret made for this run.
JWT_SECRET=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
COPILOT_TOKEN=$(python3 "$ROOT/benches/copilot-policy.py" --token "$JWT_SECRET") || die "cannot make the JWT"

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
  "${ON_PROXY[@]+"${ON_PROXY[@]}"}" "$NGINX" -p "$dir/nginx" -c "$dir/nginx/nginx.conf" -e "$dir/nginx/error.log" >"$dir/nginx.out" 2>&1 &
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
  local lat=$1 dir=$WORK/lat$1 fault=() mock_pid mock_addr run k i n c t
  local names=("${TARGETS[@]}") addrs=() pids=()
  n=${#names[@]}
  mkdir -p "$dir"
  [ "$lat" != 0 ] && fault=(--fault "latency=${lat}ms")

  "${ON_LOAD[@]+"${ON_LOAD[@]}"}" "$FLOODWALL" mock --listen 127.0.0.1:0 "${fault[@]+"${fault[@]}"}" >"$dir/mock.out" 2>"$dir/mock.err" &
  mock_pid=$!; PIDS+=("$mock_pid")
  wait_file "$dir/mock.out" "$mock_pid" "the mock"
  mock_addr=$(sed -n 's|.*listening on http://\([0-9.]*:[0-9]*\).*|\1|p' "$dir/mock.out")
  [ -n "$mock_addr" ] || die "cannot read the mock's address from $dir/mock.out"

  for ((i = 0; i < n; i++)); do
    t=${names[$i]}
    T_PATH[$t]=/v1/chat/completions; T_AUTH[$t]=""; T_ADMIN[$t]=""
    case "$t" in
      direct) pids[$i]=$mock_pid ;;
      bare)
        "${ON_PROXY[@]+"${ON_PROXY[@]}"}" "$BARE" --listen 127.0.0.1:0 --upstream "$mock_addr" --threads 2 --ready-file "$dir/bare.ready" \
          >"$dir/bare.out" 2>"$dir/bare.log" &
        pids[$i]=$! ;;
      nginx) pids[$i]=$(start_nginx "$dir" "$mock_addr") ;;
      floodwall) pids[$i]=$(start_floodwall "$dir" "$t" minimal "$mock_addr") ;;
      floodwall_noaccess) pids[$i]=$(start_floodwall "$dir" "$t" minimal "$mock_addr" RUST_LOG=info,access=off) ;;
      floodwall_3rules) pids[$i]=$(start_floodwall "$dir" "$t" 3rules "$mock_addr") ;;
      floodwall_resilience) pids[$i]=$(start_floodwall "$dir" "$t" resilience "$mock_addr") ;;
      floodwall_copilot|floodwall_copilot_redis)
        k=copilot_memory; [ "$t" = floodwall_copilot_redis ] && k=copilot_redis
        pids[$i]=$(start_floodwall "$dir" "$t" "$k" "$mock_addr")
        T_PATH[$t]=/chat/v1/chat/completions; T_AUTH[$t]="Bearer $COPILOT_TOKEN" ;;
      *) die "unknown target $t" ;;
    esac
    [ "$t" = direct ] || PIDS+=("${pids[$i]}")
  done
  addrs[0]=$mock_addr
  for ((i = 1; i < n; i++)); do
    wait_file "$dir/${names[$i]}.ready" "${pids[$i]}" "${names[$i]}"
    addrs[$i]=$(ready_field "$dir/${names[$i]}.ready" listen)
    [ -n "${addrs[$i]}" ] || die "cannot read the listen address from $dir/${names[$i]}.ready"
    if [[ ${names[$i]} == floodwall_copilot* ]]; then
      T_ADMIN[${names[$i]}]=$(ready_field "$dir/${names[$i]}.ready" admin)
      [ -n "${T_ADMIN[${names[$i]}]}" ] || die "cannot read the admin address from $dir/${names[$i]}.ready"
    fi
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
    [ "$WITH_REDIS" = 1 ] && measure_rtt "$lat" "$run"
    for ((k = 0; k < n; k++)); do
      i=$(( (k + run - 1) % n ))
      for c in $CONNS; do
        measure "$lat" "$run" "${names[$i]}" "${addrs[$i]}" "${pids[$i]}" "$mock_pid" "$c" $((c == 1 ? 1 : 2))
      done
    done
  done
  for ((i = n - 1; i >= 0; i--)); do stop_pid "${pids[$i]}"; done
}

# --- run ----------------------------------------------------------------------

MACHINE="nproc $(nproc), $(uname -sr), $(rustc --version 2>/dev/null), $( (wrk --version 2>&1 || true) | awk 'NR == 1 {print $1, $2}')"
run_facts
log "mode $MODE ($PROFILE build): $RUNS run(s) x ${DURATION}s per figure, mock latencies: $LATENCIES ms, connections: $CONNS; scratch $WORK"
log "targets: ${TARGETS[*]}"
if [ "$WITH_REDIS" = 1 ]; then
  start_redis
  # Already running: every thread of it moved to the load side's CPU.
  [ "$PIN" = 1 ] && taskset -a -p -c 0 "$REDIS_PID" >/dev/null
  log "private redis-server on 127.0.0.1:$REDIS_PORT (PID $REDIS_PID)"
fi

for lat in $LATENCIES; do
  case "$lat" in *[!0-9]*|'') die "--latencies takes whole milliseconds" ;; esac
  bench_latency "$lat"
done
ELAPSED=$(( $(date +%s) - START ))
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report -----------------------------------------------------------------

MD=$RESULTS_DIR/load-$STAMP.md
HC=64  # the connection count of the "CPU per request" figures and ratios
case " $CONNS " in *" 64 "*) ;; *) HC=$(printf '%s\n' $CONNS | sort -n | tail -1) ;; esac
{
  echo "# floodwall load benchmark, $STAMP"
  echo
  echo "- command: \`benches/load.sh${ARGS_GIVEN:+ $ARGS_GIVEN}\` ($MODE, $PROFILE build: $RUNS run(s) x ${DURATION} s per figure, ${ELAPSED} s in all)"
  echo "- commit: $rev"
  echo "- machine: $MACHINE${CPU_MODEL:+, $CPU_MODEL}; load average before: $LOAD_BEFORE, after: $LOAD_AFTER"
  echo "- load: wrk, POST /v1/chat/completions (small JSON chat body, non-streaming), 127.0.0.1 only;"
  echo "  c=1: \`wrk -t1 -c1\`, c=N > 1: \`wrk -t2 -cN\` (connections: $CONNS); proxies run 2 worker threads;"
  if [ "$PIN" = 1 ]; then
    echo "  pinned (--pin): every proxy on CPU 1, wrk, the mock and redis-server on CPU 0 (taskset)."
  else
    echo "  nothing pinned (wrk, proxy and mock share the cores)."
  fi
  echo "- each cell: median [min-max] over the runs; \"added\" = target minus direct, paired run by run;"
  echo "  CPU = CPU time of the target's process (all threads) per completed request (direct: the mock's),"
  echo "  from /proc/PID/task/*/schedstat (utime+stime from /proc/PID/stat is in the .tsv as a cross-check);"
  echo "  RSS = the highest VmHWM of that process over the run's measurements (reset before each, but the"
  echo "  allocators keep what they got, so in effect the peak so far). A throughput whose p99 is"
  echo "  50 ms or more is flagged (\"p99 ≥ 50 ms\"): the issue asks for the throughput while p99 stays under it."
  echo "- targets: direct = wrk to the mock; bare Pingora = benches/bare_proxy.rs; nginx = one nginx"
  echo "  process as a reverse proxy with keep-alive upstreams, limit_req (admitting every request) and"
  echo "  proxy_next_upstream (see start_nginx in benches/load.sh); floodwall = minimal"
  echo "  policy, default logging (one text access-log line per request, stderr to a file); floodwall,"
  echo "  access log off = the same with RUST_LOG=info,access=off; floodwall+3rules = the minimal policy"
  echo "  plus three in-memory rate-limit rules (per-user x3 windows, global, tokens) that admit every"
  echo "  request; floodwall+resilience = the minimal policy plus retry (3 attempts, budget), a circuit"
  echo "  breaker and timeouts first_token/idle/total, on the healthy mock; floodwall+copilot = the"
  echo "  research-copilot example policy (benches/copilot-policy.py: every limit at 10^9, backends at the"
  echo "  mock), state in memory, load on its \`chat\` route (POST /chat/v1/chat/completions, JWT identity,"
  echo "  per-IP and per-user rate limits, JSON request checks; every request checked on /metrics to be"
  echo "  decided by both rules and refused by none); floodwall+copilot+Redis = the same with the"
  echo "  example's \`store: redis\`, a private redis-server. All floodwalls with default logging."
  echo
  awk -F'\t' -v conns="$CONNS" -v hc="$HC" -v summary="${SUMMARY:-/dev/null}" -v rttf="$RTT_TSV" -v pinned="$PIN" '
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
    function has(lat, run, t, c) { return ((lat, run, t, c, "ok") in r) }
    function verdict(ok) { return ok ? "met" : "**missed**" }
    # A row of the suite summary: area, what, figure, target, verdict.
    function srow(area, what, fig, target, verd) { printf "%s\t%s\t%s\t%s\t%s\n", area, what, fig, target, verd >> summary }
    # The summary area of a row: "load", "load, mock 0 ms"; "load pinned..." with --pin.
    function part() { return "load" (pinned == 1 ? " pinned" : "") }
    function where(lat) { return part() ", mock " lat " ms" }
    BEGIN {
      nc = split(conns, C, " ")
      while ((getline line < rttf) > 0) {
        split(line, f, "\t"); if (f[1] == "latency_ms") continue
        add(f[1] SUBSEP "rtt50", f[3]); add(f[1] SUBSEP "rtt99", f[4]); rtt[f[1], f[2]] = f[3]
      }
    }
    NR == 1 { next }
    {
      lat = $1; run = $2; t = $3; c = $4
      if (!(lat in seen)) { seen[lat] = 1; lats[++nl] = lat }
      r[lat, run, t, c, "p50"] = $8; r[lat, run, t, c, "p99"] = $10
      r[lat, run, t, c, "rps"] = $7; r[lat, run, t, c, "cpu"] = $12
      if ($14 > r[lat, run, t, "hwm"]) r[lat, run, t, "hwm"] = $14
      r[lat, run, t, c, "rcmds"] = $17; r[lat, run, t, c, "rcpu"] = $18; r[lat, run, t, c, "rreads"] = $20
      r[lat, run, t, c, "ok"] = 1; errs += $15; serrs[t] += $19
      if (run > maxrun) maxrun = run
    }
    END {
      nt = split("direct bare nginx floodwall floodwall_noaccess floodwall_3rules floodwall_resilience floodwall_copilot floodwall_copilot_redis", T, " ")
      label["direct"] = "direct (mock)"; label["bare"] = "bare Pingora"; label["floodwall"] = "floodwall"
      label["nginx"] = "nginx (limit_req, proxy_next_upstream)"
      label["floodwall_noaccess"] = "floodwall, access log off"
      label["floodwall_3rules"] = "floodwall+3rules"; label["floodwall_resilience"] = "floodwall+resilience"
      label["floodwall_copilot"] = "floodwall+copilot (memory)"; label["floodwall_copilot_redis"] = "floodwall+copilot+Redis"
      for (li = 1; li <= nl; li++) {
        lat = lats[li]
        for (run = 1; run <= maxrun; run++) for (ti = 1; ti <= nt; ti++) {
          t = T[ti]; k = lat SUBSEP t SUBSEP
          if (!has(lat, run, t, 1) || !has(lat, run, t, hc)) continue
          add(k "p50", r[lat, run, t, 1, "p50"]); add(k "p99", r[lat, run, t, 1, "p99"])
          for (ci = 1; ci <= nc; ci++) if (C[ci] > 1 && has(lat, run, t, C[ci])) {
            add(k "rps" C[ci], r[lat, run, t, C[ci], "rps"]); add(k "q99" C[ci], r[lat, run, t, C[ci], "p99"] / 1000)
          }
          add(k "cpuhc", r[lat, run, t, hc, "cpu"]); add(k "cpu1", r[lat, run, t, 1, "cpu"])
          add(k "rss", r[lat, run, t, "hwm"] / 1024)
          if (t != "direct" && has(lat, run, "direct", 1)) {
            add(k "a50", r[lat, run, t, 1, "p50"] - r[lat, run, "direct", 1, "p50"])
            add(k "a99", r[lat, run, t, 1, "p99"] - r[lat, run, "direct", 1, "p99"])
          }
          if (t ~ /^floodwall/ && has(lat, run, "bare", hc)) {
            add(k "ratiohc", r[lat, run, t, hc, "cpu"] / r[lat, run, "bare", hc, "cpu"])
            add(k "ratio1", r[lat, run, t, 1, "cpu"] / r[lat, run, "bare", 1, "cpu"])
          }
          if (t ~ /^floodwall/ && has(lat, run, "nginx", hc))
            add(k "nginxhc", r[lat, run, t, hc, "cpu"] / r[lat, run, "nginx", hc, "cpu"])
          # The policy targets against the minimal floodwall (both with the access log on).
          if (t ~ /^floodwall_/ && t != "floodwall_noaccess" && has(lat, run, "floodwall", hc)) {
            add(k "frps", r[lat, run, t, hc, "rps"] / r[lat, run, "floodwall", hc, "rps"])
            add(k "fcpuhc", r[lat, run, t, hc, "cpu"] / r[lat, run, "floodwall", hc, "cpu"])
            add(k "fdcpuhc", r[lat, run, t, hc, "cpu"] - r[lat, run, "floodwall", hc, "cpu"])
            add(k "fcpu1", r[lat, run, t, 1, "cpu"] / r[lat, run, "floodwall", 1, "cpu"])
            add(k "fp50", r[lat, run, t, 1, "p50"] - r[lat, run, "floodwall", 1, "p50"])
          }
          # Redis against memory, paired run by run.
          if (t == "floodwall_copilot_redis" && has(lat, run, "floodwall_copilot", 1)) {
            add(k "r50", r[lat, run, t, 1, "p50"] - r[lat, run, "floodwall_copilot", 1, "p50"])
            add(k "r99", r[lat, run, t, 1, "p99"] - r[lat, run, "floodwall_copilot", 1, "p99"])
            add(k "rcpuhc", r[lat, run, t, hc, "cpu"] - r[lat, run, "floodwall_copilot", hc, "cpu"])
            add(k "rcmds", r[lat, run, t, 1, "rcmds"]); add(k "rreads", r[lat, run, t, 1, "rreads"]); add(k "rscpu", r[lat, run, t, hc, "rcpu"])
            if ((lat, run) in rtt) add(k "rtrips", (r[lat, run, t, 1, "p50"] - r[lat, run, "floodwall_copilot", 1, "p50"]) / rtt[lat, run])
          }
        }
        printf "## Mock latency %s ms\n\n", lat
        hdr = "| target | p50 c=1 (µs) | p99 c=1 (µs) | added p50 (µs) | added p99 (µs) |"; sep = "|---|---|---|---|---|"
        for (ci = 1; ci <= nc; ci++) if (C[ci] > 1) { hdr = hdr " req/s c=" C[ci] " | p99 c=" C[ci] " (ms) |"; sep = sep "---|---|" }
        print hdr " CPU µs/req c=" hc " | CPU µs/req c=1 | peak RSS (MiB) |"
        print sep "---|---|---|"
        for (ti = 1; ti <= nt; ti++) {
          t = T[ti]; k = lat SUBSEP t SUBSEP
          if (n[k "p50"] == 0) continue
          line = sprintf("| %s | %s | %s | %s | %s |", label[t], stat(k "p50", "%d"), stat(k "p99", "%d"),
            (t == "direct") ? "-" : stat(k "a50", "%+d"), (t == "direct") ? "-" : stat(k "a99", "%+d"))
          thr = ""
          for (ci = 1; ci <= nc; ci++) if (C[ci] > 1) {
            flag = (n[k "q99" C[ci]] && v_med(k "q99" C[ci]) >= 50) ? " (**p99 ≥ 50 ms**)" : ""
            line = line sprintf(" %s%s | %s |", stat(k "rps" C[ci], "%.0f"), flag, stat(k "q99" C[ci], "%.1f"))
            thr = thr sprintf("%sc=%s: %s req/s, p99 %s ms%s", (thr == "") ? "" : "; ", C[ci], stat(k "rps" C[ci], "%.0f"), stat(k "q99" C[ci], "%.1f"), flag)
          }
          print line sprintf(" %s | %s | %s |", stat(k "cpuhc", "%.1f"), stat(k "cpu1", "%.1f"), stat(k "rss", "%.1f"))
          # Suite summary: per target, latency added, throughput, CPU and RSS.
          area = where(lat)
          if (t != "direct") srow(area, label[t] ": added latency c=1, p50 / p99 (µs)", stat(k "a50", "%+d") " / " stat(k "a99", "%+d"),
            "p99 < 300 µs", (t ~ /^floodwall/) ? verdict(v_med(k "a99") < 300) : "-")
          else srow(area, label[t] ": latency c=1, p50 / p99 (µs)", stat(k "p50", "%d") " / " stat(k "p99", "%d"), "-", "-")
          fl = (thr ~ /p99 ≥ 50 ms/) ? "**flagged: p99 ≥ 50 ms**" : "p99 < 50 ms"
          srow(area, label[t] ": throughput", thr, "highest while p99 < 50 ms", fl)
          srow(area, label[t] ": CPU µs/req c=" hc " / c=1; peak RSS (MiB)", stat(k "cpuhc", "%.1f") " / " stat(k "cpu1", "%.1f") "; " stat(k "rss", "%.1f"), "-", "-")
        }
        print ""
      }
      print "## Ratios vs targets (floodwall vs bare Pingora and nginx, measured side by side, paired run by run)"
      print ""
      print "Targets (CPU per request): floodwall without policies ≤ 1.15× bare Pingora; floodwall with the"
      print "copilot policy (memory) ≤ 1.3× bare Pingora and ≤ 2.5× nginx. Added p99 at c=1 < 300 µs."
      print ""
      printf "| mock latency | target | CPU/req ÷ bare, c=%s | CPU/req ÷ bare, c=1 | CPU/req ÷ nginx, c=%s | added p99, c=1 |\n", hc, hc
      print "|---|---|---|---|---|---|"
      for (li = 1; li <= nl; li++) for (ti = 4; ti <= nt; ti++) {
        lat = lats[li]; t = T[ti]; k = lat SUBSEP t SUBSEP
        if (n[k "ratiohc"] == 0) continue
        nopol = (t == "floodwall" || t == "floodwall_noaccess"); cop = (t == "floodwall_copilot")
        bt = nopol ? 1.15 : cop ? 1.3 : 0
        printf "| %s ms | %s | %s %s | %s | %s %s | %s (%s) |\n", lat, label[t],
          stat(k "ratiohc", "%.2f×"), bt ? sprintf("(≤ %.2f×: %s)", bt, verdict(v_med(k "ratiohc") <= bt)) : "",
          stat(k "ratio1", "%.2f×"),
          stat(k "nginxhc", "%.2f×"), (n[k "nginxhc"] && cop) ? "(≤ 2.5×: " verdict(v_med(k "nginxhc") <= 2.5) ")" : "",
          stat(k "a99", "%+d"), verdict(v_med(k "a99") < 300)
        area = where(lat)
        if (bt) srow(area, label[t] ": CPU/req ÷ bare Pingora, c=" hc, stat(k "ratiohc", "%.2f×"), sprintf("≤ %.2f×", bt), verdict(v_med(k "ratiohc") <= bt))
        if (cop && n[k "nginxhc"]) srow(area, label[t] ": CPU/req ÷ nginx, c=" hc, stat(k "nginxhc", "%.2f×"), "≤ 2.5×", verdict(v_med(k "nginxhc") <= 2.5))
      }
      print ""
      print "## Policies vs floodwall without policies (measured side by side, paired run by run)"
      print ""
      print "\"within noise\": the [min-max] of the paired CPU ratio over the runs includes 1.00."
      print ""
      printf "| mock latency | target | req/s c=%s ÷ floodwall (3 rules: target ≥ 0.90×) | CPU/req ÷ floodwall, c=%s | CPU µs/req added, c=%s | CPU/req ÷ floodwall, c=1 | added p50 c=1 vs floodwall (µs) |\n", hc, hc, hc
      print "|---|---|---|---|---|---|---|"
      for (li = 1; li <= nl; li++) for (ti = 6; ti <= nt; ti++) {
        lat = lats[li]; t = T[ti]; k = lat SUBSEP t SUBSEP
        if (n[k "frps"] == 0) continue
        noise = (v_min(k "fcpuhc") <= 1 && v_max(k "fcpuhc") >= 1) ? "(within noise)" : "(above noise)"
        if (v_max(k "fcpuhc") < 1) noise = "(below 1: noise)"
        if (n[k "fcpuhc"] < 3) noise = "(too few runs to judge noise)"
        printf "| %s ms | %s | %s %s | %s %s | %s | %s | %s |\n", lat, label[t],
          stat(k "frps", "%.2f×"), (t != "floodwall_3rules") ? "" : (v_med(k "frps") >= 0.9) ? "(met)" : "(**missed**)",
          stat(k "fcpuhc", "%.2f×"), noise, stat(k "fdcpuhc", "%+.1f"),
          stat(k "fcpu1", "%.2f×"), stat(k "fp50", "%+d")
      }
      print ""
      hdone = 0
      for (li = 1; li <= nl; li++) {
        lat = lats[li]; k = lat SUBSEP "floodwall_copilot_redis" SUBSEP
        if (n[k "r50"] == 0) continue
        if (!hdone) {
          print "## Redis vs memory (floodwall+copilot, paired run by run)"
          print ""
          print "Target: with Redis, the extra cost is at most one Redis round trip per request (the decisions"
          print "are pipelined). Round trip = `redis-benchmark -c 1 PING` on the same private redis-server, once"
          print "per run; \"÷ round trip\" = (Redis − memory added p50) ÷ the round-trip p50 of the same run."
          print "Commands and reads per request (c=1): redis-server\047s total_commands_processed and"
          print "total_reads_processed (INFO stats) over the requests: one read is one batch the client sent at"
          print "once, so reads per request count the round trips a request made (pipelined commands share one);"
          print "floodwall\047s background Redis calls add a few reads a second, visible at c=1 against the 20 ms"
          print "mock (~140 requests per run): up to 1.1 reads per request counts as one round trip."
          print ""
          printf "| mock latency | Redis round trip p50 / p99 (µs) | Redis − memory, p50 c=1 (µs) | Redis − memory, p99 c=1 (µs) | added p50 ÷ PING round trip | floodwall CPU µs/req added, c=%s | redis-server CPU µs/req, c=%s | Redis commands per request | Redis reads (round trips) per request | verdict: round trips ≤ 1 / added latency ≤ 1 PING round trip |\n", hc, hc
          print "|---|---|---|---|---|---|---|---|---|---|"
          hdone = 1
        }
        ok = v_med(k "r50") <= v_med(lat SUBSEP "rtt50"); okr = (n[k "rreads"] > 0 && v_med(k "rreads") <= 1.1)
        printf "| %s ms | %s / %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", lat, stat(lat SUBSEP "rtt50", "%.1f"), stat(lat SUBSEP "rtt99", "%.1f"),
          stat(k "r50", "%+d"), stat(k "r99", "%+d"), stat(k "rtrips", "%.2f"), stat(k "rcpuhc", "%+.1f"), stat(k "rscpu", "%.1f"),
          stat(k "rcmds", "%.2f"), stat(k "rreads", "%.2f"), verdict(okr) " / " verdict(ok)
        srow(where(lat), "copilot+Redis: Redis commands / reads (round trips) per request",
          stat(k "rcmds", "%.2f") " / " stat(k "rreads", "%.2f"), "≤ 1 round trip", verdict(okr))
        srow(where(lat), "copilot+Redis: Redis − memory, added p50 c=1 (µs), beside one Redis PING round trip p50 (µs)",
          stat(k "r50", "%+d") " vs " stat(lat SUBSEP "rtt50", "%.1f"), "≤ 1 round trip", verdict(ok))
      }
      if (hdone) print ""
      if (errs > 0) printf "**%d request errors during the runs** (see the .tsv and the warnings on stderr).\n\n", errs
      else print "No request errors (connect/read/write/timeout/non-2xx) in any run."
      for (ti = 1; ti <= nt; ti++) if (serrs[T[ti]] > 0) {
        printf "\n**%s: %d rate-limiter Redis errors** (timeouts: the example\047s store timeout is 50 ms); those decisions were made by the rules\047 `on_store_error: local`.\n", label[T[ti]], serrs[T[ti]]
        srow(part(), label[T[ti]] ": rate-limiter Redis errors over the run", serrs[T[ti]], "0", "**missed**")
      }
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
[ "$WITH_REDIS" = 1 ] && cp "$RTT_TSV" "${MD%.md}.redis-rtt.tsv"
echo
cat "$MD"
echo
log "written: $MD (raw rows: ${MD%.md}.tsv)"
