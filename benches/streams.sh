#!/usr/bin/env bash
# floodwall streaming benchmark (issue #6): many SSE streams held idle, and
# many streams active, through floodwall and a bare Pingora proxy (and
# straight to the mock, for the latency baseline), measured side by side in
# one run. See BENCHMARKS.md ("Streams").
#
#   benches/streams.sh            full: 9,000 idle streams (two waves), 1,000 active, 3 runs (~9 min)
#   benches/streams.sh --quick    smoke test: 500 idle, 100 active, 1 run (< 2 min)
#
# Options: --runs N, --idle-streams N, --active-streams N, --hold SECONDS,
# --heartbeat DURATION (the idle streams' heartbeat interval, e.g. 2s; keep
# it under --hold), --duration SECONDS, --warmup SECONDS, --only idle|active,
# --floodwall-bin PATH (measure another floodwall build, e.g. an older
# commit's), --profile release|debug (which cargo build; debug only for
# smoke tests), --pin (the proxy under test on CPU 1, the mock and the load
# client on CPU 0, with taskset; see below), --summary FILE (append the
# headline rows, tab-separated, for benches/suite.sh), --no-build, --keep
# (keep the scratch directory with every log and raw output), -h/--help.
#
# Processes: the mock (`floodwall mock`), the proxy under test (floodwall, or
# the bare Pingora proxy of benches/bare_proxy.rs) and the load client
# (examples/stream_client, from benches/stream_client.rs) run as separate
# processes, each started with its soft open-files limit raised (ulimit -n
# 20000, the hard limit here). A proxy holds two sockets per stream over
# HTTP/1.1 (client side and upstream), so 9,000 streams is about the most a
# 20,000-file process can hold. All on 127.0.0.1, ephemeral ports, 2 worker
# threads per proxy. By default nothing is pinned: client, proxy and mock
# share both cores, so at 1,000 active streams the latency figures are
# mostly the three processes queueing for CPU behind each other. With
# --pin the proxy under test (bare Pingora and floodwall alike, each with
# its 2 worker threads) runs on CPU 1 and the mock and the client on CPU 0,
# as a sidecar with its own CPU would: "added" is then what the proxy adds,
# not the load generator's contention. The direct baseline is the mock and
# the client on CPU 0 in both placements.
#
# Idle (per run, per proxy, both in fresh processes, in an order rotated from
# run to run): the client opens N streams whose script is `heartbeat=15s`
# (the mock sends the role chunk, then a `: ping` comment every 15 s), at
# most 200 being opened at once; once all are open it holds them for HOLD
# seconds (more than one heartbeat interval, so every stream carries at
# least one heartbeat through the proxy), then closes them. It reads VmRSS
# (/proc/PID/status) of the proxy and the mock before the first connection,
# once all streams are open, every second of the hold and at its end, and
# counts the proxy's open files. For floodwall, `floodwall_streams_active`
# is read from /metrics during the hold (every stream must hold a stream
# slot). Then a second wave of N streams goes through the same proxy
# process, so the allocator reuses what the first freed (a long-running
# proxy's steady state). KiB per stream = (peak RSS during the hold - RSS
# before the first wave) / streams open.
#
# Active (per run: a fresh mock, bare Pingora and floodwall; targets in a
# rotated order, one at a time): the client keeps M streams running, each
# 40 chunks 50 ms apart (20 chunks/s per stream; a slot starts its next
# stream on the same keep-alive connection as soon as one ends), with the
# mock's `stamp=1`, so every chunk carries its send time. After a ramp and a
# warm-up it measures for DURATION seconds: time to first token (request
# written to first content chunk received), each chunk's delay (received
# minus the mock's send time, same clock), and the CPU time (utime+stime
# from /proc/PID/stat; /proc/PID/task/*/schedstat as a cross-check) of the
# target process per chunk delivered. "Added" = target minus direct, paired
# run by run.
#
# Prints a Markdown table (median [min-max] over the runs) and writes it to
# bench-results/streams-<timestamp>.md (+ the raw rows as .tsv). Every
# process started here is stopped by PID at the end, also on error or ctrl-c
# (SIGTERM, then SIGKILL after 3 s).

set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

RUNS=3
IDLE_STREAMS=9000
HEARTBEAT=15s
HOLD=20
ACTIVE_STREAMS=1000
CHUNKS=40
CHUNK_DELAY_MS=50
WARMUP=3
DURATION=10
OPEN_CONCURRENCY=200
NOFILE=20000
ONLY=both
FLOODWALL_BIN=""
PROFILE=release
SUMMARY=""
BUILD=1
KEEP=0
PIN=0
MODE=full
ARGS_GIVEN="$*"

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick; RUNS=1; IDLE_STREAMS=500; HEARTBEAT=2s; HOLD=4
             ACTIVE_STREAMS=100; CHUNKS=20; WARMUP=1; DURATION=3 ;;
    --runs) RUNS=${2:?--runs needs a value}; shift ;;
    --idle-streams) IDLE_STREAMS=${2:?--idle-streams needs a value}; shift ;;
    --active-streams) ACTIVE_STREAMS=${2:?--active-streams needs a value}; shift ;;
    --hold) HOLD=${2:?--hold needs a value}; shift ;;
    --heartbeat) HEARTBEAT=${2:?--heartbeat needs a duration such as 2s}; shift ;;
    --warmup) WARMUP=${2:?--warmup needs a value}; shift ;;
    --profile) PROFILE=${2:?--profile needs release or debug}; shift ;;
    --summary) SUMMARY=${2:?--summary needs a file}; shift ;;
    --duration) DURATION=${2:?--duration needs a value}; shift ;;
    --only) ONLY=${2:?--only needs idle or active}; shift ;;
    --floodwall-bin) FLOODWALL_BIN=${2:?--floodwall-bin needs a path}; shift ;;
    --no-build) BUILD=0 ;;
    --keep) KEEP=1 ;;
    --pin) PIN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "streams.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
case "$RUNS$IDLE_STREAMS$ACTIVE_STREAMS$HOLD$DURATION$WARMUP" in
  *[!0-9]*) echo "streams.sh: --runs, --idle-streams, --active-streams, --hold, --duration and --warmup take whole numbers" >&2; exit 2 ;;
esac
case "$PROFILE" in release|debug) ;; *) echo "streams.sh: --profile takes release or debug" >&2; exit 2 ;; esac
case "$HEARTBEAT" in [0-9]*s|[0-9]*ms) ;; *) echo "streams.sh: --heartbeat takes a duration such as 2s" >&2; exit 2 ;; esac
case "$ONLY" in both|idle|active) ;; *) echo "streams.sh: --only takes idle or active" >&2; exit 2 ;; esac
[ "$RUNS" -ge 1 ] && [ "$IDLE_STREAMS" -ge 1 ] && [ "$ACTIVE_STREAMS" -ge 1 ] && [ "$DURATION" -ge 1 ] \
  || { echo "streams.sh: --runs, stream counts and --duration must be >= 1" >&2; exit 2; }

BENCH=streams
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"

# --- prerequisites ----------------------------------------------------------

for tool in awk curl timeout; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is missing"
done
[ "$PIN" = 1 ] && pin_setup
[ -r /proc/self/status ] || die "/proc is needed (Linux only)"
HARD=$(ulimit -Hn)
if [ "$HARD" != unlimited ] && [ "$HARD" -lt "$NOFILE" ]; then NOFILE=$HARD; fi
# A proxy needs two sockets per idle stream, plus its own files.
NEED=$((2 * IDLE_STREAMS + 200))
if [ "$ONLY" != active ] && [ "$NOFILE" -lt "$NEED" ]; then
  die "$IDLE_STREAMS idle streams need an open-files limit of $NEED for the proxy; the hard limit is $HARD (use --idle-streams)"
fi
export CLK_TCK
CLK_TCK=$(getconf CLK_TCK)

if [ "$BUILD" = 1 ]; then
  flag=(--release); [ "$PROFILE" = debug ] && flag=()
  log "cargo build ${flag[*]} --bin floodwall --example bare_proxy --example stream_client"
  cargo build --locked "${flag[@]+"${flag[@]}"}" --bin floodwall --example bare_proxy --example stream_client >&2
fi
BIN=$(bin_dir "$PROFILE")
# The mock always comes from this tree (it must know `stamp=1`).
MOCK=$BIN/floodwall
FLOODWALL=${FLOODWALL_BIN:-$MOCK}
BARE=$BIN/examples/bare_proxy
CLIENT=$BIN/examples/stream_client
for b in "$MOCK" "$FLOODWALL" "$BARE" "$CLIENT"; do [ -x "$b" ] || die "$b not built"; done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/floodwall-streams.XXXXXX")
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS_DIR=$ROOT/bench-results
mkdir -p "$RESULTS_DIR"
IDLE_TSV=$WORK/idle.tsv
ACTIVE_TSV=$WORK/active.tsv
printf 'run\ttarget\twave\tstreams\topened\tfailed\tclosed_early\twith_heartbeat\trss_base_kb\trss_before_kb\trss_open_kb\trss_hold_kb\trss_hold_max_kb\tkib_per_stream\tmock_rss_hold_kb\topen_secs\tstreams_active_metric\terrors\terror_kinds\topen_files\n' >"$IDLE_TSV"
printf 'run\ttarget\tstreams\tevents\tevents_per_sec\tttft_p50_us\tttft_p99_us\tchunk_p50_us\tchunk_p99_us\tchunk_p999_us\tchunk_max_us\tcpu_us_per_chunk\tcpu_sched_us_per_chunk\tmock_cpu_us_per_chunk\trss_kb\terrors\terror_kinds\n' >"$ACTIVE_TSV"

# --- helpers ----------------------------------------------------------------

ready_addr() { sed -n 's/.*"listen":\["\([^"]*\)".*/\1/p' "$1"; }
ready_admin() { sed -n 's/.*"admin":"\([^"]*\)".*/\1/p' "$1"; }

# Run a command in the background with the raised open-files limit; sets
# BG_PID (the command itself: the subshell execs it).
BG_PID=""
start_bg() {
  local out=$1 err=$2; shift 2
  ( ulimit -n "$NOFILE" || exit 111; exec "$@" ) >"$out" 2>"$err" &
  BG_PID=$!
  PIDS+=("$BG_PID")
}

# start_mock DIR: sets MOCK_PID and MOCK_ADDR.
start_mock() {
  local dir=$1
  start_bg "$dir/mock.out" "$dir/mock.err" "${ON_LOAD[@]+"${ON_LOAD[@]}"}" "$MOCK" mock --listen 127.0.0.1:0
  MOCK_PID=$BG_PID
  wait_file "$dir/mock.out" "$MOCK_PID" "the mock"
  MOCK_ADDR=$(sed -n 's|.*listening on http://\([0-9.]*:[0-9]*\).*|\1|p' "$dir/mock.out")
  [ -n "$MOCK_ADDR" ] || die "cannot read the mock's address from $dir/mock.out"
}

# The floodwall policy: one route for the chat endpoint, stream caps set
# (and high enough that nothing is refused: 10,000 per route and per
# instance), no other policy.
policy() {
  cat <<EOF
# floodwall streaming benchmark (see benches/streams.sh).
version: 1
server:
  listen: ["127.0.0.1:0"]
  admin: { listen: 127.0.0.1:0 }
  threads: 2
  grace_period: 1s
  streams: { max_concurrent: 10000 }
backends:
  mock:
    endpoints: ["http://$1"]
routes:
  - name: chat
    match: { path_prefix: /v1/chat/completions }
    backend: mock
    streams: { max_concurrent: 10000 }
EOF
}

# start_target DIR NAME: starts bare Pingora or floodwall in front of
# $MOCK_ADDR; sets TARGET_PID, TARGET_ADDR and (floodwall) TARGET_ADMIN.
start_target() {
  local dir=$1 name=$2
  TARGET_ADMIN=""
  case "$name" in
    bare)
      start_bg "$dir/bare.out" "$dir/bare.log" "${ON_PROXY[@]+"${ON_PROXY[@]}"}" "$BARE" --listen 127.0.0.1:0 --upstream "$MOCK_ADDR" \
        --threads 2 --ready-file "$dir/bare.ready" ;;
    floodwall)
      mkdir -p "$dir/policy"
      policy "$MOCK_ADDR" >"$dir/policy/floodwall.yaml"
      "$FLOODWALL" check "$dir/policy/floodwall.yaml" >"$dir/floodwall.check" 2>&1 \
        || die "the policy does not validate: $(cat "$dir/floodwall.check")"
      start_bg "$dir/floodwall.out" "$dir/floodwall.log" "${ON_PROXY[@]+"${ON_PROXY[@]}"}" "$FLOODWALL" run \
        --config "$dir/policy/floodwall.yaml" --ready-file "$dir/floodwall.ready" ;;
    *) die "unknown target $name" ;;
  esac
  TARGET_PID=$BG_PID
  wait_file "$dir/$name.ready" "$TARGET_PID" "$name"
  TARGET_ADDR=$(ready_addr "$dir/$name.ready")
  [ -n "$TARGET_ADDR" ] || die "cannot read the listen address from $dir/$name.ready"
  [ "$name" = floodwall ] && TARGET_ADMIN=$(ready_admin "$dir/$name.ready")
  [ "$(awk '/^Max open files/ { print $4 }' "/proc/$TARGET_PID/limits")" -ge "$NOFILE" ] \
    || die "$name runs with a lower open-files limit than $NOFILE"
}

# One short stream through a target, checked: 200, SSE, ends with [DONE].
check_stream() {
  local name=$1 addr=$2 out
  out=$(curl -sS -N -m 10 -X POST "http://$addr/v1/chat/completions" \
    -H 'content-type: application/json' -H 'x-mock-fault: chunks=2' \
    -d '{"model":"mock-model","stream":true,"messages":[{"role":"user","content":"ping"}]}') \
    || die "$name at $addr does not answer"
  case "$out" in
    *'data: [DONE]'*) ;;
    *) die "$name at $addr: not a complete SSE stream: $out" ;;
  esac
}

# field FILE KEY: the value of KEY=value on the STREAM_RESULT line.
field() {
  awk -v k="$2" '$1 == "STREAM_RESULT" { for (i = 2; i <= NF; i++) if (index($i, k "=") == 1) print substr($i, length(k) + 2) }' "$1"
}

# run_client OUT ERR ARGS...: the load client in the background (so that the
# script can look at the proxy meanwhile); sets CLIENT_PID.
run_client() {
  local out=$1 err=$2; shift 2
  start_bg "$out" "$err" "${ON_LOAD[@]+"${ON_LOAD[@]}"}" "$CLIENT" "$@"
  CLIENT_PID=$BG_PID
}

# wait_client NAME OUT ERR: wait for the client, check it printed a result.
wait_client() {
  local name=$1 out=$2 err=$3 rc=0
  wait "$CLIENT_PID" || rc=$?
  stop_pid "$CLIENT_PID"
  [ "$rc" = 0 ] || die "the client against $name failed (exit $rc): $(tail -3 "$err")"
  grep -q '^STREAM_RESULT ' "$out" || die "the client against $name printed no result: $(tail -3 "$err")"
}

# --- idle -----------------------------------------------------------------

# idle_one RUN NAME: fresh mock + proxy; two waves of N idle streams, one
# after the other, through the same proxy process.
idle_one() {
  local run=$1 name=$2 dir=$WORK/idle-$1-$2 wave base=""
  mkdir -p "$dir"
  start_mock "$dir"
  start_target "$dir" "$name"
  check_stream "$name" "$TARGET_ADDR"
  for wave in 1 2; do
    idle_wave "$run" "$name" "$dir" "$wave" "$base"
    [ -n "$base" ] || base=$(field "$dir/client-1.out" rss_before_kb.proxy)
  done
  stop_pid "$TARGET_PID"
  stop_pid "$MOCK_PID"
}

# idle_wave RUN NAME DIR WAVE BASE_KB: one wave; BASE_KB = the proxy's RSS
# before the first wave (empty: this is the first).
idle_wave() {
  local run=$1 name=$2 dir=$3 wave=$4 base=$5 out=$3/client-$4.out err=$3/client-$4.err metric="-" i
  log "idle run $run: $name (PID $TARGET_PID) on $TARGET_ADDR, mock PID $MOCK_PID, wave $wave: $IDLE_STREAMS streams, heartbeat $HEARTBEAT, hold ${HOLD}s"
  run_client "$out" "$err" --target "$TARGET_ADDR" --mode idle --streams "$IDLE_STREAMS" \
    --script "heartbeat=$HEARTBEAT" --hold "$HOLD" --open-concurrency "$OPEN_CONCURRENCY" \
    --watch "proxy=$TARGET_PID" --watch "mock=$MOCK_PID"
  if [ -n "$TARGET_ADMIN" ]; then
    # During the hold: every stream must hold a floodwall stream slot.
    for ((i = 0; i < 3000; i++)); do
      grep -q 'holding' "$err" 2>/dev/null && break
      alive "$CLIENT_PID" || break
      sleep 0.1
    done
    if grep -q 'holding' "$err" 2>/dev/null; then
      metric=$(curl -sS -m 5 "http://$TARGET_ADMIN/metrics" \
        | awk '/^floodwall_streams_active\{.*route="chat"/ { print $2 }')
      metric=${metric:--}
    fi
  fi
  wait_client "$name" "$out" "$err"
  local opened before
  opened=$(field "$out" opened); before=$(field "$out" rss_before_kb.proxy)
  [ "${opened:-0}" -gt 0 ] || die "no stream opened through $name: $(tail -3 "$err")"
  awk -v run="$run" -v t="$name" -v w="$wave" -v n="$IDLE_STREAMS" -v op="$opened" -v fa="$(field "$out" failed)" \
    -v ce="$(field "$out" closed_early)" -v hb="$(field "$out" with_heartbeat)" -v base="${base:-$before}" -v b="$before" \
    -v o="$(field "$out" rss_open_kb.proxy)" -v h="$(field "$out" rss_hold_kb.proxy)" -v hm="$(field "$out" rss_hold_max_kb.proxy)" \
    -v m="$(field "$out" rss_hold_max_kb.mock)" -v os="$(field "$out" open_secs)" -v met="$metric" \
    -v e="$(field "$out" errors)" -v ek="$(field "$out" error_kinds)" -v fd="$(field "$out" open_files.proxy)" 'BEGIN {
      printf "%s\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%.1f\t%d\t%s\t%s\t%d\t%s\t%d\n",
        run, t, w, n, op, fa, ce, hb, base, b, o, h, hm, (hm - base) / op, m, os, met, e, ek, fd }' >>"$IDLE_TSV"
  tail -1 "$IDLE_TSV" | awk -F'\t' '{ printf "[streams] idle run %s %-9s wave %s: %d/%d open, %d with a heartbeat, %d open files, RSS %d -> %d KiB: %.1f KiB/stream (streams_active metric: %s, errors: %s)\n",
    $1, $2, $3, $5, $4, $8, $20, $10, $13, $14, $17, $19 }' >&2
  # Let the proxy close the first wave's connections before the next.
  sleep 2
}

# --- active -----------------------------------------------------------------

# active_one RUN NAME ADDR PID
active_one() {
  local run=$1 name=$2 addr=$3 pid=$4 out=$WORK/active-$1-$2.out err=$WORK/active-$1-$2.err
  log "active run $run: $name on $addr: $ACTIVE_STREAMS streams x $CHUNKS chunks every ${CHUNK_DELAY_MS}ms, ${DURATION}s measured"
  run_client "$out" "$err" --target "$addr" --mode active --streams "$ACTIVE_STREAMS" \
    --chunks "$CHUNKS" --chunk-delay-ms "$CHUNK_DELAY_MS" --warmup "$WARMUP" --duration "$DURATION" \
    --open-concurrency "$OPEN_CONCURRENCY" --watch "target=$pid" --watch "mock=$MOCK_PID"
  wait_client "$name" "$out" "$err"
  local events
  events=$(field "$out" events)
  [ "${events:-0}" -gt 0 ] || die "no chunk arrived through $name: $(tail -3 "$err")"
  awk -v run="$run" -v t="$name" -v n="$ACTIVE_STREAMS" -v ev="$events" -v eps="$(field "$out" events_per_sec)" \
    -v t50="$(field "$out" ttft_p50_us)" -v t99="$(field "$out" ttft_p99_us)" \
    -v c50="$(field "$out" chunk_p50_us)" -v c99="$(field "$out" chunk_p99_us)" \
    -v c999="$(field "$out" chunk_p999_us)" -v cmax="$(field "$out" chunk_max_us)" \
    -v cpu="$(field "$out" cpu_us_per_chunk.target)" -v cpus="$(field "$out" cpu_sched_us_per_chunk.target)" \
    -v mcpu="$(field "$out" cpu_us_per_chunk.mock)" -v rss="$(field "$out" rss_kb.target)" \
    -v e="$(field "$out" errors)" -v ek="$(field "$out" error_kinds)" 'BEGIN {
      printf "%s\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%.2f\t%.2f\t%.2f\t%d\t%d\t%s\n",
        run, t, n, ev, eps, t50, t99, c50, c99, c999, cmax, cpu, cpus, mcpu, rss, e, ek }' >>"$ACTIVE_TSV"
  tail -1 "$ACTIVE_TSV" | awk -F'\t' '{ printf "[streams] active run %s %-9s %d chunks/s, TTFT p50 %d p99 %d us, chunk delay p50 %d p99 %d us, CPU %.2f us/chunk (errors: %s)\n",
    $1, $2, $5, $6, $7, $8, $9, $12, $17 }' >&2
}

# active_round RUN: fresh mock, bare Pingora and floodwall; each target in turn.
active_round() {
  local run=$1 dir=$WORK/active-$1 k i names=(direct bare floodwall) addrs=() pids=()
  mkdir -p "$dir"
  start_mock "$dir"
  addrs[0]=$MOCK_ADDR; pids[0]=$MOCK_PID
  start_target "$dir" bare; addrs[1]=$TARGET_ADDR; pids[1]=$TARGET_PID
  start_target "$dir" floodwall; addrs[2]=$TARGET_ADDR; pids[2]=$TARGET_PID
  for ((i = 0; i < 3; i++)); do check_stream "${names[$i]}" "${addrs[$i]}"; done
  for ((k = 0; k < 3; k++)); do
    i=$(( (k + run - 1) % 3 ))
    active_one "$run" "${names[$i]}" "${addrs[$i]}" "${pids[$i]}"
  done
  stop_pid "${pids[2]}"; stop_pid "${pids[1]}"; stop_pid "${pids[0]}"
}

# --- run ----------------------------------------------------------------------

MACHINE="nproc $(nproc), $(uname -sr), $(rustc --version 2>/dev/null)"
run_facts
log "mode $MODE: $RUNS run(s); idle $IDLE_STREAMS streams (heartbeat $HEARTBEAT, hold ${HOLD}s); active $ACTIVE_STREAMS streams x $((1000 / CHUNK_DELAY_MS)) chunks/s, ${DURATION}s; open files $NOFILE; scratch $WORK"

for ((run = 1; run <= RUNS; run++)); do
  if [ "$ONLY" != active ]; then
    if (( run % 2 )); then order=(bare floodwall); else order=(floodwall bare); fi
    for t in "${order[@]}"; do idle_one "$run" "$t"; done
  fi
  if [ "$ONLY" != idle ]; then active_round "$run"; fi
done
ELAPSED=$(( $(date +%s) - START ))
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report -----------------------------------------------------------------

MD=$RESULTS_DIR/streams-$STAMP.md
{
  echo "# floodwall streaming benchmark, $STAMP"
  echo
  echo "- command: \`benches/streams.sh${ARGS_GIVEN:+ $ARGS_GIVEN}\` ($MODE, $PROFILE build: $RUNS run(s), ${ELAPSED} s in all)"
  echo "- commit: $rev${FLOODWALL_BIN:+ (floodwall: $FLOODWALL_BIN)}"
  echo "- machine: $MACHINE${CPU_MODEL:+, $CPU_MODEL}; load average before: $LOAD_BEFORE, after: $LOAD_AFTER"
  echo "- mock, proxy and load client: separate processes, open-files limit $NOFILE each; proxies run"
  if [ "$PIN" = 1 ]; then
    echo "  2 worker threads, the client 1; 127.0.0.1 only; pinned (--pin): the proxy on CPU 1, the mock"
    echo "  and the load client on CPU 0 (taskset)."
  else
    echo "  2 worker threads, the client 1; 127.0.0.1 only; nothing pinned (they share the cores)."
  fi
  echo "- floodwall: one route for /v1/chat/completions, \`streams: { max_concurrent: 10000 }\` on the"
  echo "  route and in \`server\`, no other policy, default logging (access log to a file)."
  echo "- each cell: median [min-max] over the runs; ratios and \"added\" paired run by run."
  echo
  if [ "$ONLY" != active ]; then
    echo "## Idle streams: $IDLE_STREAMS streams, \`heartbeat=$HEARTBEAT\`, held ${HOLD} s"
    echo
    echo "RSS = VmRSS of the proxy process; \"while holding\" = the peak of the per-second samples during"
    echo "the hold; KiB/stream = (that - RSS before the first wave) / streams open. Fresh processes for"
    echo "every run; in each, a second wave of as many streams follows the first (closed) one, so the"
    echo "allocator reuses the memory the first wave freed (calloc then zeroes it, touching every page)."
    echo
  fi
  awk -F'\t' -v only="$ONLY" -v chunks="$CHUNKS" -v delay="$CHUNK_DELAY_MS" -v summary="${SUMMARY:-/dev/null}" \
    -v idle_what="$IDLE_STREAMS idle streams (heartbeat $HEARTBEAT, held ${HOLD} s)" \
    -v placement="$([ "$PIN" = 1 ] && echo ", proxy pinned to its own CPU" || echo ", shared cores")" '
    # A row of the suite summary: area, what, figure, target, verdict.
    function srow(what, fig, target, verd) { printf "streams\t%s\t%s\t%s\t%s\n", what, fig, target, verd >> summary }
    function sort(a, n,   i, j, t) { for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t } }
    function med(k,   a, m, i) { m = n[k]; if (m == 0) return 0; for (i = 1; i <= m; i++) a[i] = v[k, i]; sort(a, m); return (m % 2) ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2 }
    function stat(k, fmt,   a, m, i) {
      m = n[k]; if (m == 0) return "-"
      for (i = 1; i <= m; i++) a[i] = v[k, i]
      sort(a, m)
      if (m == 1) return sprintf(fmt, med(k))
      return sprintf(fmt " [" fmt "-" fmt "]", med(k), a[1], a[m])
    }
    function add(k, x) { n[k]++; v[k, n[k]] = x }
    FNR == 1 { file++; next }
    file == 1 {
      r = $1; t = $2 SUBSEP $3; runs[r] = 1
      add(t SUBSEP "open", $5); add(t SUBSEP "hb", $8); add(t SUBSEP "before", $10 / 1024)
      add(t SUBSEP "hold", $13 / 1024); add(t SUBSEP "kib", $14); add(t SUBSEP "mock", $15 / 1024)
      add(t SUBSEP "opens", $16); add(t SUBSEP "fds", $20); ierr += $18 + $6 + $7
      if ($17 != "-") add(t SUBSEP "metric", $17)
      kib[r, t] = $14
    }
    file == 2 {
      r = $1; t = $2; aruns[r] = 1
      for (f = 4; f <= 15; f++) a[r, t, f] = $f
      aerr += $16; have[r, t] = 1; astreams = $3
    }
    END {
      label["direct"] = "direct (mock)"; label["bare"] = "bare Pingora"; label["floodwall"] = "floodwall"
      if (only != "active") {
        for (w = 1; w <= 2; w++) for (r in runs)
          if ((r, "bare" SUBSEP w) in kib && (r, "floodwall" SUBSEP w) in kib && kib[r, "bare" SUBSEP w] > 0)
            add("ratio" w, kib[r, "floodwall" SUBSEP w] / kib[r, "bare" SUBSEP w])
        print "| target | wave | streams open | with a heartbeat | proxy open files | RSS before the wave (MiB) | RSS while holding (MiB) | KiB/stream | ÷ bare Pingora | mock RSS (MiB) | seconds to open all | floodwall_streams_active |"
        print "|---|---|---|---|---|---|---|---|---|---|---|---|"
        for (w = 1; w <= 2; w++) for (ti = 1; ti <= 2; ti++) {
          t = (ti == 1) ? "bare" : "floodwall"; k = t SUBSEP w SUBSEP
          if (n[k "open"] == 0) continue
          printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", label[t], (w == 1) ? "first" : "second",
            stat(k "open", "%d"), stat(k "hb", "%d"), stat(k "fds", "%d"), stat(k "before", "%.1f"), stat(k "hold", "%.1f"),
            stat(k "kib", "%.1f"), (t == "floodwall") ? stat("ratio" w, "%.2f×") : "-",
            stat(k "mock", "%.1f"), stat(k "opens", "%.1f"), (t == "floodwall") ? stat(k "metric", "%d") : "-"
        }
        print ""
        if (n["floodwall" SUBSEP 1 SUBSEP "kib"] > 0) {
          fk = med("floodwall" SUBSEP 1 SUBSEP "kib"); bk = med("bare" SUBSEP 1 SUBSEP "kib")
          printf "- target (issue #6): floodwall KiB/stream ≤ bare Pingora measured in the same run (first wave): %.1f vs %.1f (%s), %s\n",
            fk, bk, stat("ratio1", "%.2f×"), (med("ratio1") <= 1.0) ? "**met**" : "**missed**"
          printf "- stretch: under 40 KB (39 KiB) per stream (first wave): %.1f KiB, %s\n", fk, (fk * 1024 < 40000) ? "**met**" : "**missed**"
          srow(idle_what ": memory per stream, floodwall / bare Pingora (KiB, first wave)",
            stat("floodwall" SUBSEP 1 SUBSEP "kib", "%.1f") " / " stat("bare" SUBSEP 1 SUBSEP "kib", "%.1f") " (" stat("ratio1", "%.2f×") ")",
            "≤ bare Pingora (issue #6)", (med("ratio1") <= 1.0) ? "met" : "**missed**")
        }
        if (n["floodwall" SUBSEP 2 SUBSEP "kib"] > 0)
          printf "- second wave (memory freed by the first wave reused): floodwall %.1f vs bare Pingora %.1f KiB/stream (%s)\n",
            med("floodwall" SUBSEP 2 SUBSEP "kib"), med("bare" SUBSEP 2 SUBSEP "kib"), stat("ratio2", "%.2f×")
        if (ierr > 0) printf "- **%d stream errors** (failed opens, streams closed early, read errors): see the .tsv\n", ierr
        else print "- every stream opened and stayed open for the whole hold; no errors."
        print ""
      }
      if (only != "idle") {
        printf "## Active streams%s: %d streams x %d chunks/s (%d chunks %d ms apart, back to back)\n\n", placement, astreams, 1000 / delay, chunks, delay
        print "TTFT: request written to first content chunk received. Chunk delay: received minus the mock'"'"'s"
        print "send time stamped in the chunk. Added = target minus direct in the same run (a difference of"
        print "percentiles). CPU = CPU time of the target process (direct: the mock) per chunk delivered, from"
        print "utime+stime in /proc/PID/stat (schedstat in the .tsv as a cross-check)."
        print ""
        for (r in aruns) {
          for (ti = 1; ti <= 3; ti++) {
            t = (ti == 1) ? "direct" : (ti == 2) ? "bare" : "floodwall"
            if (!((r, t) in have)) continue
            k = t SUBSEP
            add(k "eps", a[r, t, 5]); add(k "t50", a[r, t, 6]); add(k "t99", a[r, t, 7])
            add(k "c50", a[r, t, 8]); add(k "c99", a[r, t, 9]); add(k "c999", a[r, t, 10])
            add(k "cpu", a[r, t, 12]); add(k "mcpu", a[r, t, 14]); add(k "rss", a[r, t, 15] / 1024)
            if (t != "direct" && (r, "direct") in have) {
              add(k "at50", a[r, t, 6] - a[r, "direct", 6]); add(k "at99", a[r, t, 7] - a[r, "direct", 7])
              add(k "ac50", a[r, t, 8] - a[r, "direct", 8]); add(k "ac99", a[r, t, 9] - a[r, "direct", 9])
            }
            if (t == "floodwall" && (r, "bare") in have && a[r, "bare", 12] > 0)
              add("cpuratio", a[r, t, 12] / a[r, "bare", 12])
          }
        }
        print "| target | chunks/s | TTFT p50 (µs) | TTFT p99 (µs) | added TTFT p50 | added TTFT p99 | chunk delay p50 (µs) | chunk delay p99 (µs) | p99.9 (µs) | added chunk p50 | added chunk p99 | CPU µs/chunk | RSS (MiB) |"
        print "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        for (ti = 1; ti <= 3; ti++) {
          t = (ti == 1) ? "direct" : (ti == 2) ? "bare" : "floodwall"; k = t SUBSEP
          if (n[k "eps"] == 0) continue
          d = (t == "direct")
          printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", label[t],
            stat(k "eps", "%d"), stat(k "t50", "%d"), stat(k "t99", "%d"),
            d ? "-" : stat(k "at50", "%+d"), d ? "-" : stat(k "at99", "%+d"),
            stat(k "c50", "%d"), stat(k "c99", "%d"), stat(k "c999", "%d"),
            d ? "-" : stat(k "ac50", "%+d"), d ? "-" : stat(k "ac99", "%+d"),
            stat(k "cpu", "%.2f"), stat(k "rss", "%.1f")
        }
        print ""
        if (n["floodwall" SUBSEP "ac99"] > 0) {
          printf "- target: floodwall added latency per chunk, p99 < 1 ms: %s µs, %s\n",
            stat("floodwall" SUBSEP "ac99", "%+d"), (med("floodwall" SUBSEP "ac99") < 1000) ? "**met**" : "**missed**"
          printf "- target: floodwall added TTFT, p99 < 500 µs: %s µs, %s\n",
            stat("floodwall" SUBSEP "at99", "%+d"), (med("floodwall" SUBSEP "at99") < 500) ? "**met**" : "**missed**"
          printf "- CPU per chunk, floodwall ÷ bare Pingora: %s\n", stat("cpuratio", "%.2f×")
          what = astreams " active streams" placement
          srow(what ": floodwall added TTFT, p50 / p99 (µs)", stat("floodwall" SUBSEP "at50", "%+d") " / " stat("floodwall" SUBSEP "at99", "%+d"),
            "p99 < 500 µs (issue #6)", (med("floodwall" SUBSEP "at99") < 500) ? "met" : "**missed**")
          srow(what ": floodwall added delay per chunk, p50 / p99 (µs)", stat("floodwall" SUBSEP "ac50", "%+d") " / " stat("floodwall" SUBSEP "ac99", "%+d"),
            "p99 < 1 ms (issue #6)", (med("floodwall" SUBSEP "ac99") < 1000) ? "met" : "**missed**")
          srow(what ": CPU µs per chunk, floodwall / bare Pingora", stat("floodwall" SUBSEP "cpu", "%.2f") " / " stat("bare" SUBSEP "cpu", "%.2f") " (" stat("cpuratio", "%.2f×") ")", "-", "-")
        }
        if (aerr > 0) printf "- **%d stream errors** during the active runs: see the .tsv\n", aerr
        else print "- no stream errors in any active run."
        print ""
      }
    }
  ' "$IDLE_TSV" "$ACTIVE_TSV"
} >"$MD"
cat "$IDLE_TSV" >"${MD%.md}.idle.tsv"
cat "$ACTIVE_TSV" >"${MD%.md}.active.tsv"
echo
cat "$MD"
echo
log "written: $MD (raw rows: ${MD%.md}.idle.tsv, ${MD%.md}.active.tsv)"
