#!/usr/bin/env bash
# floodwall response-cache benchmark: a memory hit and a Redis hit against a
# miss and a plain proxied request, measured side by side in one run, with
# the mock backend at 1 ms latency. See BENCHMARKS.md ("Cache").
#
#   benches/cache.sh            full: 5 runs x 5 s per figure (~9 min)
#   benches/cache.sh --quick    smoke test: 1 run x 2 s per figure (~1 min)
#
# Options: --runs N, --duration SECONDS, --latency MS (mock latency, default
# 1), --pace MS (think time of the paced c=1 pass, default 1; 0: no paced
# pass), --no-build, --keep (keep the scratch directory with every log and
# raw wrk output), -h/--help.
#
# What it does:
#   1. starts, all on 127.0.0.1 with ephemeral ports: `floodwall mock` with
#      `--fault latency=1ms`; a private `redis-server` on a free port (no
#      persistence, its own scratch directory); and two floodwalls (2 worker
#      threads each, default logging: one access-log line per request, to a
#      file), both with `identity.user` from X-User-Id and two routes:
#        - `plain`: requests with `X-Bench-Route: plain`, no cache;
#        - `chat`: everything else, `cache: { ttl: 1h }` (scope user), with
#          `store: memory` (the memory tier bounded at 32 MiB) in the first
#          floodwall and `store: redis` in the second;
#   2. checks with curl, and fails loudly otherwise, that a plain request has
#      no x-cache, a no-store one is BYPASS, a new body is MISS and then HIT,
#      and the benchmark's request is a HIT on both floodwalls (on the Redis
#      one: with its entry in Redis);
#   3. warms every target up, then for every run measures, in an order
#      rotated from run to run (the request is benches/cache.lua's ~1.2 KB
#      chat body, benches/cache-body.json):
#        - direct:    wrk to the mock itself (for reference);
#        - proxied:   the memory floodwall's `plain` route;
#        - bypass:    the cached route with `Cache-Control: no-store`
#                     (x-cache: BYPASS; key computed, nothing looked up or
#                     stored: the proxied path of a cached route);
#        - miss:      the cached route, a different body on every request
#                     (x-cache: MISS: lookup, flight, upstream, record,
#                     store; the tier fills up, then evicts);
#        - mem_hit:   the cached route, the same request (memory HIT);
#        - redis_hit: the same request on the Redis floodwall (Redis HIT);
#      each at c=1 (wrk -t1 -c1: latency p50/p99, requests back to back),
#      at c=1 paced (the same with 1 ms between an answer and the next
#      request, wrk's delay(): a hit takes ~50-100 us, so back to back the
#      c=1 loop keeps both shared cores busy and its p99 is mostly other
#      processes' preemptions; paced, every target is measured at a few
#      hundred requests a second) and at c=64 (wrk -t2 -c64: throughput),
#      with the CPU time of the target's process per completed request (all
#      threads, /proc/PID/task/*/schedstat; utime+stime kept in the .tsv as
#      a cross-check) and its peak RSS. After each measurement floodwall's
#      floodwall_cache_requests_total counters must show the expected
#      x-cache for every request (else the script fails); for the Redis hit
#      also redis-server's CPU and commands per request. Once per run, a
#      Redis round trip for reference, GET of the very key the Redis hit
#      reads: redis-benchmark -c 1 (back to back) and, when perl with
#      Time::HiRes is installed, a GET loop on a blocking socket, back to
#      back and paced like the paced pass (both ends idle in between, as in
#      a paced Redis hit);
#   4. prints a Markdown table (median [min-max] over the runs), the ratios
#      against the cache's three targets (paired run by run), and writes it
#      to bench-results/cache-<timestamp>.md (+ the raw rows as .tsv).
#
# Every process started here is stopped by PID at the end, also on error or
# ctrl-c (SIGTERM, then SIGKILL after 3 s). Nothing is pinned: wrk, the
# proxies, the mock and Redis share the machine's cores.

set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

RUNS=5
DURATION=5
WARMUP=2
LATENCY=1
PACE_MS=1
BUILD=1
KEEP=0
MODE=full
RTT_N=20000
RTT_PACED_N=3000
MAX_MEMORY=32MiB
ARGS_GIVEN="$*"

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick; RUNS=1; DURATION=2; WARMUP=1; RTT_N=5000; RTT_PACED_N=1000 ;;
    --runs) RUNS=${2:?--runs needs a value}; shift ;;
    --duration) DURATION=${2:?--duration needs a value}; shift ;;
    --latency) LATENCY=${2:?--latency needs a value}; shift ;;
    --pace) PACE_MS=${2:?--pace needs a value}; shift ;;
    --no-build) BUILD=0 ;;
    --keep) KEEP=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "cache.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
case "$RUNS$DURATION$LATENCY$PACE_MS" in *[!0-9]*) echo "cache.sh: --runs, --duration, --latency and --pace take whole numbers" >&2; exit 2 ;; esac
[ "$RUNS" -ge 1 ] && [ "$DURATION" -ge 1 ] || { echo "cache.sh: --runs and --duration must be >= 1" >&2; exit 2; }

BENCH=cache
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"

# --- prerequisites ----------------------------------------------------------

for tool in wrk curl awk sed timeout; do
  command -v "$tool" >/dev/null 2>&1 \
    || die "$tool is missing (Debian/Ubuntu: sudo apt-get install wrk curl), then rerun"
done
for tool in redis-server redis-cli redis-benchmark; do
  command -v "$tool" >/dev/null 2>&1 \
    || die "$tool is missing (Debian/Ubuntu: sudo apt-get install redis-server redis-tools), then rerun"
done
[ -r /proc/self/stat ] || die "/proc is needed (Linux only)"
CLK_TCK=$(getconf CLK_TCK)

if [ "$BUILD" = 1 ]; then
  log "cargo build --release --bin floodwall"
  cargo build --locked --release --bin floodwall >&2
fi
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps 2>/dev/null | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
TARGET_DIR=${TARGET_DIR:-$ROOT/target}
FLOODWALL=$TARGET_DIR/release/floodwall
[ -x "$FLOODWALL" ] || die "$FLOODWALL not built"
LUA=$ROOT/benches/cache.lua
BODY=$ROOT/benches/cache-body.json
[ -r "$LUA" ] && [ -r "$BODY" ] || die "benches/cache.lua or benches/cache-body.json is missing"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/floodwall-cache-bench.XXXXXX")
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS_DIR=$ROOT/bench-results
mkdir -p "$RESULTS_DIR"
TSV=$WORK/rows.tsv
RTT_TSV=$WORK/rtt.tsv
printf 'run\ttarget\tconns\trequests\tduration_us\trps\tp50_us\tp90_us\tp99_us\tmax_us\tcpu_us_per_req\thwm_kb\terrors\tcpu_ticks_us_per_req\texpected\tunexpected\tredis_cpu_us_per_req\tredis_cmds_per_req\ttier_entries\n' >"$TSV"
printf 'run\trps\tavg_us\tp50_us\tp99_us\tloop_p50_us\tloop_p99_us\tpaced_p50_us\tpaced_p99_us\n' >"$RTT_TSV"

# (ready_field, start_redis, rcli and redis_cmds are in benches/lib.sh.)

# --- floodwall ---------------------------------------------------------------

# policy STORE MOCK_ADDR: the policy of a floodwall target (see the header).
policy() {
  local store=$1 mock_addr=$2
  cat <<EOF
# floodwall cache benchmark: store "$store" (see benches/cache.sh).
version: 1
server:
  listen: ["127.0.0.1:0"]
  admin: { listen: 127.0.0.1:0 }
  threads: 2
  grace_period: 1s
identity:
  user: [{ header: x-user-id }]
store:
  cache: { max_memory: $MAX_MEMORY }
EOF
  if [ "$store" = redis ]; then
    printf '  redis: { url: "redis://127.0.0.1:%s/0", key_prefix: cbench }\n' "$REDIS_PORT"
  fi
  cat <<EOF
backends:
  mock:
    endpoints: ["http://$mock_addr"]
routes:
  - name: plain
    match: { path_prefix: /, header: { x-bench-route: plain } }
    backend: mock
  - name: chat
    match: { path_prefix: / }
    backend: mock
    cache: { ttl: 1h, store: $store }
EOF
}

# start_floodwall NAME STORE MOCK_ADDR: prints its PID. The policy sits alone
# in its own directory (floodwall watches the policy's directory).
start_floodwall() {
  local name=$1 store=$2 mock_addr=$3 dir=$WORK
  mkdir -p "$dir/$name-policy"
  policy "$store" "$mock_addr" >"$dir/$name-policy/floodwall.yaml"
  "$FLOODWALL" check "$dir/$name-policy/floodwall.yaml" >"$dir/$name.check" 2>&1 \
    || die "policy $name does not validate: $(cat "$dir/$name.check")"
  "$FLOODWALL" run --config "$dir/$name-policy/floodwall.yaml" --ready-file "$dir/$name.ready" \
    >"$dir/$name.out" 2>"$dir/$name.log" &
  echo $!
}

# cache_counts ADMIN: "hit miss bypass stale" from floodwall_cache_requests_total{route="chat"}.
cache_counts() {
  curl -sS -m 5 "http://$1/metrics" | awk '
    /^floodwall_cache_requests_total\{/ && /route="chat"/ {
      if (match($0, /result="[a-z]+"/)) c[substr($0, RSTART + 8, RLENGTH - 9)] = $NF
    }
    END { printf "%d %d %d %d\n", c["hit"], c["miss"], c["bypass"], c["stale"] }'
}
tier_entries() {
  curl -sS -m 5 "http://$1/metrics" | awk '/^floodwall_cache_entries\{/ && /route="chat"/ { v = $NF } END { print v }'
}

# post ADDR BODYFILE [HEADER...]: one POST; prints "STATUS X-CACHE" (X-CACHE
# "-" when absent) and fails unless it is a 200 chat completion.
post() {
  local addr=$1 body=$2; shift 2
  local hargs=() h out status xc
  for h in "$@"; do hargs+=(-H "$h"); done
  out=$(curl -sS -m 5 -D "$WORK/post.headers" -o "$WORK/post.body" -w '%{http_code}' \
    -X POST "http://$addr/v1/chat/completions" -H 'content-type: application/json' \
    -H 'accept: application/json' -H 'x-user-id: bench-user-1' "${hargs[@]+"${hargs[@]}"}" \
    --data-binary "@$body") || die "no answer from $addr"
  status=$out
  grep -q '"chat.completion"' "$WORK/post.body" || die "$addr: not a chat completion: $(head -c 300 "$WORK/post.body")"
  xc=$(tr -d '\r' <"$WORK/post.headers" | awk -F': *' 'tolower($1) == "x-cache" { print $2 }')
  echo "$status ${xc:--}"
}

# expect WHAT GOT WANT
expect() { [ "$2" = "$3" ] || die "$1: expected \"$3\", got \"$2\""; }

# A body that no request sent before (the tag goes at the start of the last
# message's content, as cache.lua's `unique` mode does).
unique_body() {
  local f=$WORK/unique-$1.json
  sed 's/\(.*"content":"\)/\1'"$1"' /' "$BODY" >"$f"
  cmp -s "$f" "$BODY" && die "could not make a unique body"
  echo "$f"
}

# ensure_hit NAME ADDR: the benchmark's request is (now) a HIT.
ensure_hit() {
  local got
  got=$(post "$2" "$BODY")
  [ "$got" = "200 HIT" ] || got=$(post "$2" "$BODY")
  expect "$1: the benchmark's request, repeated" "$got" "200 HIT"
}

WRK_PID=""
# run_wrk NAME ADDR THREADS CONNS SECONDS OUTFILE MODE TAG [PACE_MS]
run_wrk() {
  local rc=0
  CACHE_BENCH_MODE=$7 CACHE_BENCH_TAG=$8 CACHE_BENCH_BODY=$BODY CACHE_BENCH_PACE_MS=${9:-0} \
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

# --- the targets ---------------------------------------------------------------

# In table order. Per target: the process measured, the wrk mode, and the
# x-cache every request must get ("-": none, the route has no cache).
TARGETS=(direct proxied bypass miss mem_hit redis_hit)
declare -A T_ADDR T_PID T_ADMIN T_MODE T_WANT
T_MODE=([direct]=same [proxied]=plain [bypass]=no-store [miss]=unique [mem_hit]=same [redis_hit]=same)
T_WANT=([direct]=- [proxied]=- [bypass]=bypass [miss]=miss [mem_hit]=hit [redis_hit]=hit)

# measure RUN TARGET CONNS THREADS [PACE_MS]: the row's "conns" is "1p" for
# the paced pass.
measure() {
  local run=$1 t=$2 conns=$3 threads=$4 pace=${5:-0} label=$3
  [ "$pace" -gt 0 ] && label=${conns}p
  local out=$WORK/wrk-$run-$t-c$label.txt pid=${T_PID[$t]} admin=${T_ADMIN[$t]:-}
  local c0 c1 n0 n1 r0=0 r1=0 k0=0 k1=0 req dur errs tag before after entries=0
  local want=${T_WANT[$t]} expected=0 unexpected=0 rcpu=-1 rcmds=-1
  [ "$want" = hit ] && ensure_hit "$t" "${T_ADDR[$t]}"
  [ -n "$admin" ] && before=$(cache_counts "$admin")
  [ "$t" = redis_hit ] && k0=$(redis_cmds)
  tag="r$run-c$label-$$-$RANDOM$RANDOM"
  reset_hwm "$pid"
  c0=$(cpu_ticks "$pid"); n0=$(cpu_ns "$pid"); [ "$t" = redis_hit ] && r0=$(cpu_ns "$REDIS_PID")
  run_wrk "$t" "${T_ADDR[$t]}" "$threads" "$conns" "$DURATION" "$out" "${T_MODE[$t]}" "$tag" "$pace"
  n1=$(cpu_ns "$pid"); c1=$(cpu_ticks "$pid"); [ "$t" = redis_hit ] && r1=$(cpu_ns "$REDIS_PID")
  [ "$t" = redis_hit ] && k1=$(redis_cmds)
  req=$(field "$out" requests); dur=$(field "$out" duration_us)
  [ "${req:-0}" -gt 0 ] || die "no request completed against $t: $(tail -3 "$out")"
  errs=$(( $(field "$out" err_connect) + $(field "$out" err_read) + $(field "$out" err_write) \
    + $(field "$out" err_status) + $(field "$out" err_timeout) ))
  [ "$errs" = 0 ] || log "warning: $t c=$label: $errs errors (see $out)"
  if [ -n "$admin" ]; then
    # Every request floodwall answered in the window must carry the
    # expected x-cache. floodwall may count a few more than wrk completed
    # (those in flight when wrk stopped), never fewer.
    after=$(cache_counts "$admin")
    read -r expected unexpected < <(awk -v b="$before" -v a="$after" -v w="$want" 'BEGIN {
      split(b, B, " "); split(a, A, " "); split("hit miss bypass stale", L, " ")
      for (i = 1; i <= 4; i++) { d = A[i] - B[i]; if (L[i] == w) e += d; else u += d }
      print e + 0, u + 0 }')
    [ "$unexpected" = 0 ] || die "$t c=$label: $unexpected requests got another x-cache than ${want^^} (counters before: $before, after: $after: hit miss bypass stale)"
    if [ "$want" != - ]; then
      [ "$expected" -ge "$req" ] && [ "$expected" -le $((req + conns)) ] \
        || die "$t c=$label: wrk completed $req requests, floodwall counted $expected ${want^^}"
    fi
    entries=$(tier_entries "$admin"); entries=${entries:-0}
  fi
  if [ "$t" = redis_hit ]; then
    # The second INFO is not counted in its own figures; the first one is.
    rcpu=$(awk -v d=$((r1 - r0)) -v n="$req" 'BEGIN { printf "%.2f", d / 1e3 / n }')
    rcmds=$(awk -v d=$((k1 - k0 - 1)) -v n="$req" 'BEGIN { printf "%.3f", d / n }')
  fi
  awk -v run="$run" -v t="$t" -v c="$label" -v req="$req" -v dur="$dur" \
    -v p50="$(field "$out" p50_us)" -v p90="$(field "$out" p90_us)" -v p99="$(field "$out" p99_us)" \
    -v max="$(field "$out" max_us)" -v dc=$((c1 - c0)) -v dn=$((n1 - n0)) -v tck="$CLK_TCK" \
    -v hwm="$(hwm_kb "$pid")" -v errs="$errs" -v e="$expected" -v u="$unexpected" \
    -v rcpu="$rcpu" -v rcmds="$rcmds" -v ent="$entries" 'BEGIN {
      printf "%s\t%s\t%s\t%d\t%d\t%.1f\t%d\t%d\t%d\t%d\t%.2f\t%d\t%d\t%.2f\t%d\t%d\t%s\t%s\t%d\n",
        run, t, c, req, dur, req / (dur / 1e6), p50, p90, p99, max,
        dn / 1e3 / req, hwm, errs, dc * 1e6 / tck / req, e, u, rcpu, rcmds, ent }' >>"$TSV"
  tail -1 "$TSV" | awk -F'\t' '{ printf "[cache] run %s %-9s c=%-2s %7d req %8.0f req/s p50 %5d us p99 %6d us cpu %6.1f us/req rss %d KiB\n",
    $1, $2, $3, $4, $6, $7, $9, $11, $12 }' >&2
}

# One Redis round trip, for reference: redis-benchmark, one connection,
# back to back, GET of the key the Redis hit reads; and, when perl (with
# Time::HiRes) is there, a small GET loop on a blocking socket, back to back
# (to show the loop's own overhead next to redis-benchmark) and paced like
# the paced c=1 pass (both ends idle between requests, as in a paced hit).
PERL_RTT=""
if perl -MTime::HiRes -MIO::Socket::INET -MSocket -e 1 2>/dev/null; then PERL_RTT=1; fi
rtt_loop() {
  timeout 120 perl -MTime::HiRes -MIO::Socket::INET -MSocket -e '
    use strict; use warnings;
    use Time::HiRes qw(clock_gettime CLOCK_MONOTONIC usleep);
    use Socket qw(IPPROTO_TCP TCP_NODELAY);
    my ($port, $key, $n, $pace_ms) = @ARGV;
    my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1", PeerPort => $port, Proto => "tcp")
      or die "connect: $!\n";
    setsockopt($s, IPPROTO_TCP, TCP_NODELAY, 1) or die "TCP_NODELAY: $!\n";
    my $cmd = sprintf("*2\r\n\$3\r\nGET\r\n\$%d\r\n%s\r\n", length($key), $key);
    my @lat;
    for my $i (1 .. $n) {
      usleep($pace_ms * 1000) if $pace_ms > 0;
      my $t0 = clock_gettime(CLOCK_MONOTONIC);
      syswrite($s, $cmd) == length($cmd) or die "write: $!\n";
      my ($buf, $want) = ("", -1);
      while (1) {
        my $r = sysread($s, $buf, 65536, length $buf);
        die "read: $!\n" unless $r;
        if ($want < 0 && $buf =~ /^\$(\d+)\r\n/) { $want = length($&) + $1 + 2 }
        die "not a bulk string: $buf\n" if $want < 0 && length($buf) > 32;
        last if $want >= 0 && length($buf) >= $want;
      }
      push @lat, (clock_gettime(CLOCK_MONOTONIC) - $t0) * 1e6;
    }
    @lat = sort { $a <=> $b } @lat;
    printf "%.1f %.1f\n", $lat[int(0.5 * $#lat + 0.5)], $lat[int(0.99 * $#lat + 0.5)];
  ' "$REDIS_PORT" "$RKEY" "$@"
}
measure_rtt() {
  local run=$1 out=$WORK/rtt-$1.csv loop="- -" paced="- -"
  timeout 120 redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c 1 -n "$RTT_N" --csv GET "$RKEY" >"$out" 2>&1 \
    || die "redis-benchmark failed: $(tail -3 "$out")"
  if [ -n "$PERL_RTT" ]; then
    loop=$(rtt_loop "$RTT_N" 0) || die "the perl GET loop failed"
    if [ "$PACE_MS" -gt 0 ]; then
      paced=$(rtt_loop "$RTT_PACED_N" "$PACE_MS") || die "the paced perl GET loop failed"
    fi
  fi
  awk -F, -v run="$run" -v loop="$loop" -v paced="$paced" '
    { gsub(/"/, "") }
    NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
    NR == 2 { split(loop, L, " "); split(paced, P, " ")
              printf "%s\t%.0f\t%.1f\t%.1f\t%.1f\t%s\t%s\t%s\t%s\n", run, $col["rps"], $col["avg_latency_ms"] * 1000,
              $col["p50_latency_ms"] * 1000, $col["p99_latency_ms"] * 1000, L[1], L[2], P[1], P[2] }' "$out" >>"$RTT_TSV"
  [ "$(tail -1 "$RTT_TSV" | cut -f1)" = "$run" ] || die "cannot read redis-benchmark's output: $(cat "$out")"
  tail -1 "$RTT_TSV" | awk -F'\t' '{ printf "[cache] run %s redis GET  c=1  %8.0f req/s p50 %5.0f us p99 %6.0f us; perl loop p50 %s us p99 %s us; paced p50 %s us p99 %s us\n", $1, $2, $4, $5, $6, $7, $8, $9 }' >&2
}

# --- run ----------------------------------------------------------------------

MACHINE="nproc $(nproc), $(uname -sr), $(rustc --version 2>/dev/null), $( (wrk --version 2>&1 || true) | awk 'NR == 1 {print $1, $2}'), redis-server $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')"
run_facts
log "mode $MODE: $RUNS run(s) x ${DURATION}s per figure, mock latency ${LATENCY} ms; scratch $WORK"

fault=()
[ "$LATENCY" != 0 ] && fault=(--fault "latency=${LATENCY}ms")
"$FLOODWALL" mock --listen 127.0.0.1:0 "${fault[@]+"${fault[@]}"}" >"$WORK/mock.out" 2>"$WORK/mock.err" &
MOCK_PID=$!; PIDS+=("$MOCK_PID")
start_redis
wait_file "$WORK/mock.out" "$MOCK_PID" "the mock"
MOCK_ADDR=$(sed -n 's|.*listening on http://\([0-9.]*:[0-9]*\).*|\1|p' "$WORK/mock.out")
[ -n "$MOCK_ADDR" ] || die "cannot read the mock's address from $WORK/mock.out"
log "mock on $MOCK_ADDR (PID $MOCK_PID, latency ${LATENCY} ms); redis-server on 127.0.0.1:$REDIS_PORT (PID $REDIS_PID)"

FW_MEM_PID=$(start_floodwall fw_memory memory "$MOCK_ADDR"); PIDS+=("$FW_MEM_PID")
FW_REDIS_PID=$(start_floodwall fw_redis redis "$MOCK_ADDR"); PIDS+=("$FW_REDIS_PID")
wait_file "$WORK/fw_memory.ready" "$FW_MEM_PID" "floodwall (store: memory)"
wait_file "$WORK/fw_redis.ready" "$FW_REDIS_PID" "floodwall (store: redis)"
FW_MEM=$(ready_field "$WORK/fw_memory.ready" listen); FW_MEM_ADMIN=$(ready_field "$WORK/fw_memory.ready" admin)
FW_REDIS=$(ready_field "$WORK/fw_redis.ready" listen); FW_REDIS_ADMIN=$(ready_field "$WORK/fw_redis.ready" admin)
[ -n "$FW_MEM" ] && [ -n "$FW_MEM_ADMIN" ] && [ -n "$FW_REDIS" ] && [ -n "$FW_REDIS_ADMIN" ] \
  || die "cannot read the listen/admin addresses from the ready files in $WORK"
log "floodwall (store: memory) on $FW_MEM, admin $FW_MEM_ADMIN (PID $FW_MEM_PID)"
log "floodwall (store: redis) on $FW_REDIS, admin $FW_REDIS_ADMIN (PID $FW_REDIS_PID)"

T_ADDR=([direct]=$MOCK_ADDR [proxied]=$FW_MEM [bypass]=$FW_MEM [miss]=$FW_MEM [mem_hit]=$FW_MEM [redis_hit]=$FW_REDIS)
T_PID=([direct]=$MOCK_PID [proxied]=$FW_MEM_PID [bypass]=$FW_MEM_PID [miss]=$FW_MEM_PID [mem_hit]=$FW_MEM_PID [redis_hit]=$FW_REDIS_PID)
T_ADMIN=([proxied]=$FW_MEM_ADMIN [bypass]=$FW_MEM_ADMIN [miss]=$FW_MEM_ADMIN [mem_hit]=$FW_MEM_ADMIN [redis_hit]=$FW_REDIS_ADMIN)

# The checks: each answer's x-cache, and where the entries are.
log "checking x-cache on every target"
post "$MOCK_ADDR" "$BODY" >/dev/null
expect "proxied (X-Bench-Route: plain)" "$(post "$FW_MEM" "$BODY" 'x-bench-route: plain')" "200 -"
expect "bypass (Cache-Control: no-store)" "$(post "$FW_MEM" "$BODY" 'cache-control: no-store')" "200 BYPASS"
NEW=$(unique_body "check-$$-$RANDOM")
expect "miss (a new body)" "$(post "$FW_MEM" "$NEW")" "200 MISS"
expect "miss (that body again)" "$(post "$FW_MEM" "$NEW")" "200 HIT"
ensure_hit "memory hit" "$FW_MEM"
NEW=$(unique_body "check-redis-$$-$RANDOM")
expect "Redis: a new body" "$(post "$FW_REDIS" "$NEW")" "200 MISS"
expect "Redis: that body again" "$(post "$FW_REDIS" "$NEW")" "200 HIT"
rcli flushall >/dev/null
expect "Redis: after FLUSHALL (nothing kept in floodwall's memory)" "$(post "$FW_REDIS" "$NEW")" "200 MISS"
# Only the benchmark's entry in Redis, so its key is the one to time a GET of.
rcli flushall >/dev/null
ensure_hit "Redis hit" "$FW_REDIS"
RKEY=$(rcli --scan --pattern 'cbench:v1:cache:*')
[ -n "$RKEY" ] && [ "$(printf '%s\n' "$RKEY" | wc -l)" = 1 ] || die "expected exactly one cache entry in Redis, found: $RKEY"
ENTRY_BYTES=$(rcli strlen "$RKEY")
log "x-cache checks passed; the Redis entry is $RKEY ($ENTRY_BYTES bytes)"

for t in "${TARGETS[@]}"; do
  log "warm-up $t (${WARMUP}s, c=64)"
  [ "${T_WANT[$t]}" = hit ] && ensure_hit "$t" "${T_ADDR[$t]}"
  run_wrk "$t" "${T_ADDR[$t]}" 2 64 "$WARMUP" "$WORK/warmup-$t.txt" "${T_MODE[$t]}" "warmup-$$-$RANDOM"
done

n=${#TARGETS[@]}
for ((run = 1; run <= RUNS; run++)); do
  for ((k = 0; k < n; k++)); do
    t=${TARGETS[$(( (k + run - 1) % n ))]}
    measure "$run" "$t" 1 1
    [ "$PACE_MS" -gt 0 ] && measure "$run" "$t" 1 1 "$PACE_MS"
    measure "$run" "$t" 64 2
  done
  measure_rtt "$run"
done
ELAPSED=$(( $(date +%s) - START ))
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
for pid in "$FW_REDIS_PID" "$FW_MEM_PID" "$REDIS_PID" "$MOCK_PID"; do stop_pid "$pid"; done

# --- report -----------------------------------------------------------------

MD=$RESULTS_DIR/cache-$STAMP.md
{
  echo "# floodwall cache benchmark, $STAMP"
  echo
  echo "- command: \`benches/cache.sh${ARGS_GIVEN:+ $ARGS_GIVEN}\` ($MODE: $RUNS run(s) x ${DURATION} s per figure, ${ELAPSED} s in all)"
  echo "- commit: $rev"
  echo "- machine: $MACHINE${CPU_MODEL:+, $CPU_MODEL}; load average before: $LOAD_BEFORE, after: $LOAD_AFTER"
  echo "- mock latency ${LATENCY} ms (\`floodwall mock --fault latency=${LATENCY}ms\`); load: wrk with benches/cache.lua,"
  echo "  POST /v1/chat/completions, the $(tr -d '\n' <"$BODY" | wc -c)-byte JSON body of benches/cache-body.json, non-streaming;"
  echo "  c=1: \`wrk -t1 -c1\` (back to back); c=1 paced: the same with ${PACE_MS} ms between an answer and the"
  echo "  next request (wrk delay(); not part of the latency); c=64: \`wrk -t2 -c64\`; floodwalls run 2 worker threads, default logging"
  echo "  (one access-log line per request, to a file); 127.0.0.1 only; nothing pinned (wrk, floodwall,"
  echo "  the mock and Redis share the cores)."
  echo "- each cell: median [min-max] over the runs; ratios and differences are paired run by run."
  echo "  CPU = CPU time of the target's process (all threads) per completed request (direct: the mock's),"
  echo "  from /proc/PID/task/*/schedstat; RSS = VmHWM of that process (the peak so far)."
  echo "- x-cache verified: floodwall's \`floodwall_cache_requests_total\` counters moved by exactly the"
  echo "  expected result for every request of every measurement (the script fails otherwise)."
  echo "- memory tier: \`store.cache.max_memory: $MAX_MEMORY\`, shared by the miss and hit targets, so the"
  echo "  memory hits are served from a tier the misses filled (entries at the time: see the last column)."
  echo "- Redis: a private redis-server $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p') on 127.0.0.1; the entry the Redis hit reads is $ENTRY_BYTES bytes;"
  echo "  round trip = \`redis-benchmark -c 1 -n $RTT_N GET <that key>\` (back to back), once per run, and a perl"
  echo "  GET loop on a blocking socket (TCP_NODELAY): $RTT_N back to back, $RTT_PACED_N paced (${PACE_MS} ms between)$([ -n "$PERL_RTT" ] || echo " (skipped: perl with Time::HiRes not found)")."
  echo
  awk -F'\t' -v rtt="$RTT_TSV" '
    function sort(a, n,   i, j, t) { for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t } }
    function stat(k, fmt,   a, m, i, med) {
      m = n[k]; if (m == 0) return "-"
      for (i = 1; i <= m; i++) a[i] = v[k, i]
      sort(a, m)
      med = (m % 2) ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
      if (m == 1) return sprintf(fmt, med)
      return sprintf(fmt " [" fmt "-" fmt "]", med, a[1], a[m])
    }
    function med(k,   a, m, i) {
      m = n[k]; if (m == 0) return 0
      for (i = 1; i <= m; i++) a[i] = v[k, i]
      sort(a, m)
      return (m % 2) ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
    }
    function add(k, x) { n[k]++; v[k, n[k]] = x }
    function ok(run, t) { return ((run, t, 1, "ok") in r) && ((run, t, 64, "ok") in r) }
    BEGIN {
      while ((getline line < rtt) > 0) {
        split(line, f, "\t"); if (f[1] == "run") continue
        q[f[1], "rps"] = f[2]; q[f[1], "p50"] = f[4]; q[f[1], "p99"] = f[5]; q[f[1], "ok"] = 1
        add("rtt" SUBSEP "rps", f[2]); add("rtt" SUBSEP "p50", f[4]); add("rtt" SUBSEP "p99", f[5])
        if (f[6] != "-") { add("loop" SUBSEP "p50", f[6]); add("loop" SUBSEP "p99", f[7]) }
        if (f[8] != "-") { q[f[1], "pp50"] = f[8]; q[f[1], "pok"] = 1; add("paced" SUBSEP "p50", f[8]); add("paced" SUBSEP "p99", f[9]) }
      }
    }
    NR == 1 { next }
    {
      run = $1; t = $2; c = $3
      r[run, t, c, "p50"] = $7; r[run, t, c, "p99"] = $9; r[run, t, c, "rps"] = $6
      r[run, t, c, "cpu"] = $11; r[run, t, c, "hwm"] = $12; r[run, t, c, "rcpu"] = $17
      r[run, t, c, "rcmds"] = $18; r[run, t, c, "ent"] = $19; r[run, t, c, "ok"] = 1
      errs += $13
      if (run > maxrun) maxrun = run
    }
    END {
      nt = split("direct proxied bypass miss mem_hit redis_hit", T, " ")
      label["direct"] = "direct (the mock, 1 ms)"
      label["proxied"] = "proxied (route without cache)"
      label["bypass"] = "miss: no-store (BYPASS)"
      label["miss"] = "miss: a new body each time (MISS, stored)"
      label["mem_hit"] = "memory hit (HIT)"
      label["redis_hit"] = "Redis hit (HIT)"
      for (run = 1; run <= maxrun; run++) for (ti = 1; ti <= nt; ti++) {
        t = T[ti]
        if (!ok(run, t)) continue
        k = t SUBSEP
        paced = ((run, t, "1p", "ok") in r) && ((run, "mem_hit", "1p", "ok") in r)
        add(k "p50", r[run, t, 1, "p50"]); add(k "p99", r[run, t, 1, "p99"])
        if ((run, t, "1p", "ok") in r) { add(k "pp50", r[run, t, "1p", "p50"]); add(k "pp99", r[run, t, "1p", "p99"]) }
        add(k "rps", r[run, t, 64, "rps"]); add(k "cpu64", r[run, t, 64, "cpu"]); add(k "cpu1", r[run, t, 1, "cpu"])
        add(k "rss", r[run, t, 64, "hwm"] / 1024); add(k "ent", r[run, t, 1, "ent"])
        if (t == "redis_hit") {
          add(k "rcpu64", r[run, t, 64, "rcpu"]); add(k "rcpu1", r[run, t, 1, "rcpu"])
          add(k "rcmds", r[run, t, 1, "rcmds"]); add(k "rcmds64", r[run, t, 64, "rcmds"])
        }
        if (ok(run, "mem_hit") && (t == "proxied" || t == "bypass" || t == "miss")) {
          add(k "p99x", r[run, t, 1, "p99"] / r[run, "mem_hit", 1, "p99"])
          add(k "p50x", r[run, t, 1, "p50"] / r[run, "mem_hit", 1, "p50"])
          if (paced) {
            add(k "pp99x", r[run, t, "1p", "p99"] / r[run, "mem_hit", "1p", "p99"])
            add(k "pp50x", r[run, t, "1p", "p50"] / r[run, "mem_hit", "1p", "p50"])
          }
          add(k "hcpu64", r[run, "mem_hit", 64, "cpu"] / r[run, t, 64, "cpu"])
          add(k "hcpu1", r[run, "mem_hit", 1, "cpu"] / r[run, t, 1, "cpu"])
        }
        if (t == "redis_hit" && ok(run, "mem_hit") && ((run, "ok") in q)) {
          add("r50", r[run, t, 1, "p50"] - r[run, "mem_hit", 1, "p50"])
          add("r99", r[run, t, 1, "p99"] - r[run, "mem_hit", 1, "p99"])
          add("r50x", (r[run, t, 1, "p50"] - r[run, "mem_hit", 1, "p50"]) / q[run, "p50"])
          if (paced) {
            add("rp50", r[run, t, "1p", "p50"] - r[run, "mem_hit", "1p", "p50"])
            add("rp99", r[run, t, "1p", "p99"] - r[run, "mem_hit", "1p", "p99"])
            if ((run, "pok") in q) add("rp50x", (r[run, t, "1p", "p50"] - r[run, "mem_hit", "1p", "p50"]) / q[run, "pp50"])
          }
          add("rcpu", r[run, t, 1, "cpu"] - r[run, "mem_hit", 1, "cpu"])
          add("rcpu64", r[run, t, 64, "cpu"] - r[run, "mem_hit", 64, "cpu"])
        }
      }
      print "## Figures"
      print ""
      print "| target | p50 c=1 (µs) | p99 c=1 (µs) | p50 c=1 paced (µs) | p99 c=1 paced (µs) | req/s c=64 | CPU µs/req c=64 | CPU µs/req c=1 | peak RSS (MiB) | memory-tier entries |"
      print "|---|---|---|---|---|---|---|---|---|---|"
      for (ti = 1; ti <= nt; ti++) {
        t = T[ti]; k = t SUBSEP
        if (n[k "p50"] == 0) continue
        printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", label[t], stat(k "p50", "%d"), stat(k "p99", "%d"),
          stat(k "pp50", "%d"), stat(k "pp99", "%d"),
          stat(k "rps", "%.0f"), stat(k "cpu64", "%.1f"), stat(k "cpu1", "%.1f"), stat(k "rss", "%.1f"),
          (t == "direct" || t == "proxied" || t == "redis_hit") ? "-" : stat(k "ent", "%d")
      }
      if (n["rtt" SUBSEP "p50"] > 0)
        printf "| Redis GET round trip: redis-benchmark -c 1 | %s | %s | - | - | %s (c=1) | - | - | - | - |\n",
          stat("rtt" SUBSEP "p50", "%.0f"), stat("rtt" SUBSEP "p99", "%.0f"), stat("rtt" SUBSEP "rps", "%.0f")
      if (n["loop" SUBSEP "p50"] > 0)
        printf "| Redis GET round trip: a GET loop on a blocking socket (perl) | %s | %s | %s | %s | - | - | - | - | - |\n",
          stat("loop" SUBSEP "p50", "%.0f"), stat("loop" SUBSEP "p99", "%.0f"), stat("paced" SUBSEP "p50", "%.0f"), stat("paced" SUBSEP "p99", "%.0f")
      print ""
      k = "redis_hit" SUBSEP
      if (n[k "rcpu1"] > 0) {
        printf "Redis hit, on the Redis side: redis-server CPU %s µs/req at c=1, %s at c=64; Redis commands per request %s at c=1, %s at c=64 (one GET per hit).\n\n",
          stat(k "rcpu1", "%.1f"), stat(k "rcpu64", "%.1f"), stat(k "rcmds", "%.2f"), stat(k "rcmds64", "%.2f")
      }
      print "## Against the targets (paired run by run)"
      print ""
      print "| target | compared | measured | verdict |"
      print "|---|---|---|---|"
      split("miss bypass proxied", C, " ")
      for (ci = 1; ci <= 3; ci++) {
        t = C[ci]; k = t SUBSEP
        if (n[k "p99x"] == 0) continue
        printf "| memory hit p99 ≥ 10× lower than a miss | %s p99 ÷ memory hit p99, c=1 (p50: %s) | %s | %s |\n", label[t],
          stat(k "p50x", "%.1f×"), stat(k "p99x", "%.1f×"), (t == "proxied") ? "(reference)" : (med(k "p99x") >= 10) ? "met" : "**missed**"
        if (n[k "pp99x"] > 0)
          printf "| memory hit p99 ≥ 10× lower than a miss | the same, c=1 paced (p50: %s) | %s | %s |\n",
            stat(k "pp50x", "%.1f×"), stat(k "pp99x", "%.1f×"), (t == "proxied") ? "(reference)" : (med(k "pp99x") >= 10) ? "met" : "**missed**"
      }
      for (ci = 3; ci >= 1; ci--) {
        t = C[ci]; k = t SUBSEP
        if (n[k "hcpu64"] == 0) continue
        printf "| memory hit CPU < a proxied request | memory hit CPU ÷ %s CPU, c=64 (c=1: %s) | %s | %s |\n", label[t],
          stat(k "hcpu1", "%.2f×"), stat(k "hcpu64", "%.2f×"), (t != "proxied") ? "(reference)" : (med(k "hcpu64") < 1 && med(k "hcpu1") < 1) ? "met" : "**missed**"
      }
      if (n["r50"] > 0) {
        printf "| Redis hit adds ≤ 1 round trip to a memory hit | Redis hit p50 − memory hit p50, c=1, against a Redis GET round trip p50 of %s µs | %s µs = %s round trips (p99: %s µs, RTT p99 %s µs) | %s |\n",
          stat("rtt" SUBSEP "p50", "%.0f"), stat("r50", "%+.0f"), stat("r50x", "%.2f"), stat("r99", "%+.0f"), stat("rtt" SUBSEP "p99", "%.0f"),
          (med("r50x") <= 1) ? "met" : "**missed**"
        if (n["rp50x"] > 0)
          printf "| Redis hit adds ≤ 1 round trip to a memory hit | the same, c=1 paced, against a paced GET round trip p50 of %s µs | %s µs = %s round trips (p99: %s µs, paced RTT p99 %s µs) | %s |\n",
            stat("paced" SUBSEP "p50", "%.0f"), stat("rp50", "%+.0f"), stat("rp50x", "%.2f"), stat("rp99", "%+.0f"), stat("paced" SUBSEP "p99", "%.0f"),
            (med("rp50x") <= 1) ? "met" : "**missed**"
        else if (n["rp50"] > 0)
          printf "| Redis hit adds ≤ 1 round trip to a memory hit | the same, c=1 paced (no paced round trip measured: perl missing) | %s µs (p99: %s µs) | |\n",
            stat("rp50", "%+.0f"), stat("rp99", "%+.0f")
        printf "| | Redis commands per Redis hit | %s | %s |\n", stat("redis_hit" SUBSEP "rcmds", "%.2f"), (med("redis_hit" SUBSEP "rcmds") <= 1.005) ? "one GET" : "**more than one**"
        printf "| | Redis hit CPU − memory hit CPU (floodwall) | %s µs/req at c=1, %s at c=64 | |\n", stat("rcpu", "%+.1f"), stat("rcpu64", "%+.1f")
      }
      print ""
      if (errs > 0) printf "**%d request errors during the runs** (see the .tsv and the warnings on stderr).\n", errs
      else print "No request errors (connect/read/write/timeout/non-2xx) in any run."
    }
  ' "$TSV"
} >"$MD"
cp "$TSV" "${MD%.md}.tsv"
cp "$RTT_TSV" "${MD%.md}.rtt.tsv"
echo
cat "$MD"
echo
log "written: $MD (raw rows: ${MD%.md}.tsv, ${MD%.md}.rtt.tsv)"
