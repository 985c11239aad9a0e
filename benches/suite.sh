#!/usr/bin/env bash
# floodwall's whole benchmark suite in one command (issue 7): builds once,
# runs every part side by side on this machine, and writes one results table
# with the targets beside the measurements. See BENCHMARKS.md ("Suite").
#
#   benches/suite.sh            full: release build, every figure the median of 5 runs (~27 min on 2 cores)
#   benches/suite.sh --quick    smoke test of the harness on the debug build `cargo test` made (~2-3 min);
#                               its figures mean nothing
#
# Options: --quick, --profile release|debug (default: release, debug with
# --quick), --no-build, --keep (keep every part's log and scratch output),
# -h/--help.
#
# The parts, in this order (each stopped by `timeout` if it overruns, each
# failing the suite if it fails; a missed target never fails it):
#   1. `cargo bench --bench decisions` (quick: `cargo test --bench decisions
#      -- --quick`, on the debug build): micro-benchmarks of every decision
#      (rate limits in memory and through a private Redis, breaker, retry
#      arithmetic, cache key, memory cache hit, queue admission), 5 rounds;
#   2. benches/callgrind.sh: instructions per request, floodwall vs bare
#      Pingora, without policies and with the research-copilot policy (the
#      profile: floodwall's most expensive functions; deterministic: one
#      count each; quick: 20 requests; skipped in quick mode when valgrind
#      is missing), then the copilot policy at 64 requests in flight with
#      this host's L1 and L2 simulated (`--conns 64 --cache-sim`, 10 s; quick:
#      4 connections, 2 s): L2 misses per request, the figure that explains
#      the CPU ratios at c=64;
#   3. benches/load.sh: direct / bare Pingora / nginx / floodwall (no
#      policies) / floodwall+copilot (memory) / floodwall+copilot+Redis, mock
#      at 0 and 20 ms, c=1 (latency), c=64 and c=256 (throughput and p99),
#      CPU per request, peak RSS; 5 runs x 3 s per figure (quick: 1 run x 1 s,
#      mock at 0 ms);
#   4. benches/load.sh --pin: the same load with each proxy under test on
#      CPU 1 and wrk and the mock on CPU 0, so that a proxy's CPU time per
#      request is not interleaved with the load generator's on one core (the
#      steadier instrument for the CPU targets): direct / bare Pingora /
#      nginx / floodwall / floodwall+copilot (memory), mock at 0 and 20 ms,
#      c=1 and c=64, 5 runs x 3 s (quick: 1 run x 1 s, mock at 0 ms; skipped
#      on one CPU);
#   5. benches/streams.sh: 9,000 idle streams (memory per stream; heartbeat
#      2 s, held 4 s) and 1,000 active streams (added TTFT, per-chunk delay,
#      CPU per chunk), 5 runs (quick: 200 idle, 50 active, 1 run), every
#      process sharing both cores;
#   6. benches/streams.sh --only active --pin: the 1,000 active streams again
#      with the proxy under test on its own CPU (the mock and the client on
#      the other), so that "added" is the proxy's own cost rather than three
#      processes queueing for two cores (quick: 50 streams, 1 run).
#
# Every process is started by the parts on 127.0.0.1 with ephemeral ports
# and stopped by PID (benches/lib.sh); the suite itself starts only the
# parts. Results: bench-results/suite-<timestamp>.md (also printed): the
# table, then every part's own report.

set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

MODE=full
PROFILE=""
BUILD=1
KEEP=0
ARGS_GIVEN="$*"

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick ;;
    --profile) PROFILE=${2:?--profile needs release or debug}; shift ;;
    --no-build) BUILD=0 ;;
    --keep) KEEP=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "suite.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$PROFILE" ]; then
  PROFILE=release; [ "$MODE" = quick ] && PROFILE=debug
fi
case "$PROFILE" in release|debug) ;; *) echo "suite.sh: --profile takes release or debug" >&2; exit 2 ;; esac

BENCH=suite
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"

# --- prerequisites ----------------------------------------------------------

missing=()
for tool in wrk curl awk sed timeout python3 redis-server redis-cli redis-benchmark cargo; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
[ ${#missing[@]} -eq 0 ] \
  || die "missing: ${missing[*]} (Debian/Ubuntu: sudo apt-get install -y wrk nginx-light redis-server redis-tools curl python3)"
CALLGRIND=1
if ! command -v valgrind >/dev/null 2>&1 || ! command -v callgrind_control >/dev/null 2>&1; then
  [ "$MODE" = quick ] || die "valgrind is missing (Debian/Ubuntu: sudo apt-get install -y valgrind); the full suite needs it for benches/callgrind.sh"
  CALLGRIND=0
  log "valgrind is missing: the callgrind part is skipped (quick mode)"
fi

if [ "$BUILD" = 1 ]; then
  flag=(--release); [ "$PROFILE" = debug ] && flag=()
  log "cargo build ${flag[*]} --locked --bin floodwall --examples"
  cargo build "${flag[@]+"${flag[@]}"}" --locked --bin floodwall --examples >&2
fi
BIN=$(bin_dir "$PROFILE")
for b in floodwall examples/bare_proxy examples/stream_client; do
  [ -x "$BIN/$b" ] || die "$BIN/$b is not built (run without --no-build)"
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/floodwall-suite.XXXXXX")
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS_DIR=$ROOT/bench-results
mkdir -p "$RESULTS_DIR"
SUMMARY=$WORK/summary.tsv
: >"$SUMMARY"
PART_NAMES=()
PART_FILES=()
PART_SECS=()

# --- the parts ----------------------------------------------------------------

# run_part NAME LIMIT_SECONDS COMMAND...: runs one part, bounded by `timeout`
# (SIGTERM at the limit, the part then stops what it started; SIGKILL 20 s
# later), its output shown and kept in $WORK/NAME.log. Fails the suite if the
# part fails or names no results file ("written: FILE" in its output).
run_part() {
  local name=$1 limit=$2 rc=0 t0 file pid; shift 2
  log "part $name: $*"
  t0=$(date +%s)
  timeout -k 20 "$limit" "$@" > >(tee "$WORK/$name.log" >&2) 2>&1 &
  pid=$!; PIDS+=("$pid")
  wait "$pid" || rc=$?
  stop_pid "$pid"
  PART_SECS+=($(( $(date +%s) - t0 )))
  PART_NAMES+=("$name")
  [ "$rc" != 124 ] || die "part $name did not finish within ${limit}s (see $WORK/$name.log)"
  [ "$rc" = 0 ] || die "part $name failed (exit $rc; see $WORK/$name.log)"
  file=$(sed -n 's/.*written: \([^ ]*\.md\).*/\1/p' "$WORK/$name.log" | tail -1)
  [ -z "$file" ] || [ -r "$file" ] || die "part $name: its results file $file is missing"
  PART_FILES+=("${file:--}")
  log "part $name done in ${PART_SECS[-1]}s${file:+: $file}"
}

# run_pinned_part NAME LIMIT_SECONDS COMMAND...: run_part for a part run
# with --pin, skipped (and said so) on a machine with one CPU.
run_pinned_part() {
  if [ "$(nproc)" -lt 2 ]; then
    log "$1: skipped (--pin needs 2 CPUs)"
    return 0
  fi
  run_part "$@"
}

# decisions_rows FILE: the suite rows of the micro-benchmarks (mean ns per
# decision, one thread; through Redis: p50 µs of one sequential decision).
decisions_rows() {
  awk -F' [|] ' '
    function row(what, fig) { printf "micro-benchmarks (plain loops)\t%s\t%s\t-\t-\n", what, fig }
    /^## Through Redis/ { redis = 1 }
    /^## / && !/^## Through Redis/ { redis = 0 }
    !/^\| / { next }
    { what = substr($1, 3) }
    !redis && what ~ /^memory: (1 rule, 1 window|3 rules \(per-user 3 windows \+ global \+ tokens\), 1 thread)/ { row("rate limit, memory: " substr(what, 9) ", mean ns", $3) }
    !redis && what ~ /^breaker: try_acquire \+ record \(closed\), 1 thread/ { row(what ", mean ns", $3) }
    !redis && what ~ /^retry: delay\(\)/ { row(what ", mean ns", $3) }
    !redis && what ~ /^queue admission: class_for \+ acquire \+ Slot drop \(uncontended\), 1 thread/ { row(what ", mean ns", $3) }
    !redis && what ~ /^key: CacheKey::compute/ { row("cache " what ", mean ns", $3) }
    !redis && what ~ /^memory tier: MemoryTier::get, a hit/ { row("cache " what ", mean ns", $3) }
    redis && what ~ /^(decision through Redis|PING through the store)/ && what ~ /sequential/ { row(what ", p50 µs", $3) }
  ' "$1" >>"$SUMMARY"
}

# callgrind_rows FILE WHAT: instructions per request from callgrind.sh's output.
callgrind_rows() {
  awk -v profile="$PROFILE" -v what="$2" '
    /bare Pingora:/ { b = $3 } /^  floodwall:/ { f = $2 } /ratio:/ { r = $2 }
    END {
      if (b == "" || f == "") exit 1
      printf "instructions (callgrind, %s build)\tper request, %s / bare Pingora (one deterministic count)\t%s / %s (%s)\t-\t-\n", profile, what, f, b, r
    }' "$1" >>"$SUMMARY" || die "cannot read callgrind.sh's counts in $1"
}

# cache_rows FILE CONNS: simulated L2 misses per request from callgrind.sh
# --cache-sim's table (lines "  bare Pingora: I1mr D1mr D1mw L2i L2r L2w
# L2total" and "  floodwall: ...").
cache_rows() {
  awk -v profile="$PROFILE" -v conns="$2" '
    /^  bare Pingora: / && NF == 9 { b = $9; bi = $6 }
    /^  floodwall: / && NF == 8 { f = $8; fi = $5 }
    /simulated cache misses/ { sub(/.*\(/, ""); sub(/; size.*/, ""); caches = $0 }
    END {
      if (b == "" || f == "" || b == 0) exit 1
      printf "L2 misses (callgrind --cache-sim, %s build)\tper request at c=%s, floodwall+copilot (memory) / bare Pingora (%s; deterministic for a given interleaving)\t%s / %s (%.2fx); instruction misses %s / %s\t-\t-\n", profile, conns, caches, f, b, f / b, fi, bi
    }' "$1" >>"$SUMMARY" || die "cannot read callgrind.sh's cache misses in $1"
}

LOAD_TARGETS="direct bare nginx floodwall floodwall_copilot floodwall_copilot_redis"
# The pinned load: the CPU-per-request targets' baselines and floodwall, each
# proxy on CPU 1 and wrk and the mock on CPU 0 (load.sh --pin).
PINNED_TARGETS="direct bare nginx floodwall floodwall_copilot"
MACHINE="nproc $(nproc), $(uname -sr), $(rustc --version 2>/dev/null)"
run_facts
log "mode $MODE, $PROFILE build; load average before: $LOAD_BEFORE; scratch $WORK"

if [ "$MODE" = quick ]; then
  if [ "$PROFILE" = debug ]; then
    run_part decisions 300 cargo test --locked --bench decisions -- --quick
  else
    run_part decisions 300 cargo bench --locked --bench decisions -- --quick
  fi
  decisions_rows "${PART_FILES[-1]}"
  if [ "$CALLGRIND" = 1 ]; then
    run_part callgrind 300 benches/callgrind.sh --no-build --profile "$PROFILE" --requests 20
    callgrind_rows "$WORK/callgrind.log" "floodwall (no policies)"
    run_part callgrind_copilot 300 benches/callgrind.sh --no-build --profile "$PROFILE" --requests 20 --policy copilot --top 5
    callgrind_rows "$WORK/callgrind_copilot.log" "floodwall+copilot (memory)"
    run_part callgrind_cache 300 benches/callgrind.sh --no-build --profile "$PROFILE" --policy copilot --conns 4 --seconds 2 --cache-sim
    cache_rows "$WORK/callgrind_cache.log" 4
  fi
  run_part load 300 benches/load.sh --quick --no-build --profile "$PROFILE" --runs 1 --duration 1 \
    --latencies 0 --conns "1 64 256" --targets "$LOAD_TARGETS" --summary "$SUMMARY"
  run_pinned_part load_pinned 300 benches/load.sh --quick --no-build --profile "$PROFILE" --runs 1 --duration 1 \
    --pin --latencies 0 --conns "1 64" --targets "$PINNED_TARGETS" --summary "$SUMMARY"
  run_part streams 300 benches/streams.sh --quick --no-build --profile "$PROFILE" --runs 1 \
    --idle-streams 200 --active-streams 50 --hold 2 --heartbeat 1s --duration 2 --warmup 1 --summary "$SUMMARY"
  run_pinned_part streams_pinned 300 benches/streams.sh --quick --no-build --profile "$PROFILE" --runs 1 \
    --only active --pin --active-streams 50 --duration 2 --warmup 1 --summary "$SUMMARY"
else
  [ "$PROFILE" = release ] || log "warning: the full suite on a $PROFILE build: the figures say nothing about release code"
  if [ "$PROFILE" = debug ]; then
    run_part decisions 900 cargo test --locked --bench decisions
  else
    run_part decisions 900 cargo bench --locked --bench decisions
  fi
  decisions_rows "${PART_FILES[-1]}"
  run_part callgrind 900 benches/callgrind.sh --no-build --profile "$PROFILE" --requests 1000
  callgrind_rows "$WORK/callgrind.log" "floodwall (no policies)"
  run_part callgrind_copilot 900 benches/callgrind.sh --no-build --profile "$PROFILE" --requests 1000 --policy copilot --top 30
  callgrind_rows "$WORK/callgrind_copilot.log" "floodwall+copilot (memory)"
  run_part callgrind_cache 600 benches/callgrind.sh --no-build --profile "$PROFILE" --policy copilot --conns 64 --seconds 10 --cache-sim
  cache_rows "$WORK/callgrind_cache.log" 64
  run_part load 1500 benches/load.sh --no-build --profile "$PROFILE" --runs 5 --duration 3 \
    --latencies "0 20" --conns "1 64 256" --targets "$LOAD_TARGETS" --summary "$SUMMARY"
  run_pinned_part load_pinned 900 benches/load.sh --no-build --profile "$PROFILE" --runs 5 --duration 3 \
    --pin --latencies "0 20" --conns "1 64" --targets "$PINNED_TARGETS" --summary "$SUMMARY"
  run_part streams 1200 benches/streams.sh --no-build --profile "$PROFILE" --runs 5 \
    --idle-streams 9000 --hold 4 --heartbeat 2s --active-streams 1000 --duration 4 --warmup 2 --summary "$SUMMARY"
  run_pinned_part streams_pinned 600 benches/streams.sh --no-build --profile "$PROFILE" --runs 5 \
    --only active --pin --active-streams 1000 --duration 4 --warmup 2 --summary "$SUMMARY"
fi
ELAPSED=$(( $(date +%s) - START ))
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report -------------------------------------------------------------------

MD=$RESULTS_DIR/suite-$STAMP.md
parts=""
for i in "${!PART_NAMES[@]}"; do
  parts="$parts${parts:+, }${PART_NAMES[$i]} ${PART_SECS[$i]} s"
done
{
  echo "# floodwall benchmark suite, $STAMP"
  echo
  echo "- command: \`benches/suite.sh${ARGS_GIVEN:+ $ARGS_GIVEN}\` ($MODE, $PROFILE build): ${ELAPSED} s in all ($parts)"
  [ "$MODE" = quick ] && echo "- **quick mode: a smoke test of the harness; the figures are not meaningful.**"
  [ "$CALLGRIND" = 1 ] || echo "- callgrind: skipped (valgrind is not installed)."
  echo "- commit: $rev"
  echo "- machine: $MACHINE${CPU_MODEL:+, $CPU_MODEL}; load average before: $LOAD_BEFORE, after: $LOAD_AFTER"
  echo "- every comparison is measured side by side in the same run; each figure is the median [min-max]"
  echo "  over the runs (load and streams: 5 runs; micro-benchmarks: 5 rounds; in quick mode 1), except"
  echo "  callgrind's, a deterministic count. \"added\" = target minus direct (the mock), paired run by run."
  echo "  Targets are issue 7's (and, for streams, issue 6's); a missed target is reported, never a failure."
  echo
  echo "| area | what | measured | target | verdict |"
  echo "|---|---|---|---|---|"
  awk -F'\t' 'NF >= 5 { printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5 }' "$SUMMARY"
  echo
  missed=$(awk -F'\t' '$5 ~ /missed/' "$SUMMARY" | wc -l)
  flagged=$(awk -F'\t' '$5 ~ /flagged/' "$SUMMARY" | wc -l)
  met=$(awk -F'\t' '$5 == "met"' "$SUMMARY" | wc -l)
  echo "Targets: $met met, $missed missed; throughputs flagged for p99 ≥ 50 ms: $flagged."
  echo
  echo "## The parts' reports"
  for i in "${!PART_NAMES[@]}"; do
    echo
    if [ "${PART_FILES[$i]}" = - ]; then
      echo "### ${PART_NAMES[$i]} (${PART_SECS[$i]} s)"
      echo
      echo '```'
      grep -v '^\[' "$WORK/${PART_NAMES[$i]}.log" | tail -40
      echo '```'
    else
      echo "### ${PART_NAMES[$i]} (${PART_SECS[$i]} s): ${PART_FILES[$i]#"$ROOT"/}"
      echo
      # The part's own report, its headings one level down.
      sed -e 's/^# /#### /' -e 's/^## /#### /' -e 's/^### /##### /' "${PART_FILES[$i]}"
    fi
  done
} >"$MD"
cp "$SUMMARY" "${MD%.md}.tsv"
echo
cat "$MD"
echo
log "written: $MD (wall-clock ${ELAPSED} s)"
