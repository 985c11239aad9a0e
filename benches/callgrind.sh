#!/usr/bin/env bash
# Instructions per request, floodwall vs a bare Pingora proxy, counted by
# valgrind's callgrind: a deterministic figure (the same binary and inputs
# give the same count whatever else the machine is doing), so it can be
# compared across commits on a busy machine where CPU-time figures are noise.
# It counts user-space instructions only; the kernel's share (syscalls,
# TCP) is about the same for both proxies and is in benches/load.sh's CPU
# figures instead.
#
#   benches/callgrind.sh [--requests N] [--policy minimal|3rules|copilot] [--profile release|debug] [--top N] [--no-build] [--keep]
#                        [--conns C [--seconds S]] [--cache-sim]
#
# What it does: builds the release binaries (floodwall and examples/bare_proxy),
# starts `floodwall mock`, then the bare proxy and floodwall (policy `minimal`:
# one route, no policies; `3rules`: benches/load.sh's three in-memory rate-limit
# rules, every request admitted; `copilot`: the research-copilot example as
# benches/load.sh's floodwall+copilot target runs it, state in memory, the
# requests to its `chat` route with its JWT) each under `valgrind --tool=callgrind`, all on
# 127.0.0.1 with ephemeral ports. For each proxy it sends 200 warm-up requests
# over one keep-alive connection (benches/chat.lua's body), zeroes the counters
# (callgrind_control -z), sends N more (default 1000), dumps the counters, and
# prints instructions per request and the ratio (`--top N`: and floodwall's N
# most expensive functions, inclusive, per request). Every process it started is
# stopped by PID at the end. `--keep` keeps the callgrind files for
# callgrind_annotate. `--profile debug` counts the debug build instead (a
# smoke test of the script: debug counts say nothing about release code).
# `--conns C` (C > 1) loads each proxy with `wrk -t1 -cC` for S seconds
# (`--seconds`, default 20; 3 s of warm-up first) instead of N sequential
# requests, so that C requests are in flight at once (needs wrk).
# `--cache-sim` also simulates this host's caches (callgrind --cache-sim,
# with the L1i, L1d and per-core L2 sizes that lscpu reports, the L2 as the
# last level: one core's working set competes for it) and prints the misses
# per request: with --conns 64 it shows what 64 requests in flight cost in
# cache misses, which the instruction count cannot.
# Needs valgrind and python3 (standard library only).
set -Eeuo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
N=1000; KIND=minimal; BUILD=1; KEEP=0; PROFILE=release; TOP=0; CONNS=1; SECS=20; CACHE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --requests) N=$2; shift 2 ;;
    --policy) KIND=$2; shift 2 ;;
    --profile) PROFILE=$2; shift 2 ;;
    --top) TOP=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    --conns) CONNS=$2; shift 2 ;;
    --seconds) SECS=$2; shift 2 ;;
    --cache-sim) CACHE=1; shift ;;
    -h|--help) sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
command -v valgrind >/dev/null || { echo "callgrind.sh: needs valgrind (apt-get install -y valgrind)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "callgrind.sh: needs python3" >&2; exit 1; }
case "$PROFILE" in release|debug) ;; *) echo "callgrind.sh: --profile takes release or debug" >&2; exit 2 ;; esac
case "$N" in ''|*[!0-9]*|0) echo "callgrind.sh: --requests takes a whole number >= 1" >&2; exit 2 ;; esac
case "$KIND" in minimal|3rules|copilot) ;; *) echo "callgrind.sh: --policy takes minimal, 3rules or copilot" >&2; exit 2 ;; esac
case "$TOP" in ''|*[!0-9]*) echo "callgrind.sh: --top takes a whole number" >&2; exit 2 ;; esac
case "$CONNS" in ''|*[!0-9]*|0) echo "callgrind.sh: --conns takes a whole number >= 1" >&2; exit 2 ;; esac
case "$SECS" in ''|*[!0-9]*|0) echo "callgrind.sh: --seconds takes a whole number >= 1" >&2; exit 2 ;; esac
if [ "$CONNS" -gt 1 ] && ! command -v wrk >/dev/null; then echo "callgrind.sh: --conns needs wrk (apt-get install -y wrk)" >&2; exit 1; fi
VG=(valgrind --tool=callgrind)
if [ "$CACHE" = 1 ]; then
  # lscpu -C: NAME ONE-SIZE WAYS LEVEL... e.g. "L1d 32K 8"; sizes in K or M.
  cache_arg() { # NAME: SIZE,WAYS,64 in bytes
    { lscpu -C=NAME,ONE-SIZE,WAYS 2>/dev/null || true; } | awk -v n="$1" '$1 == n {
      s = $2; m = 1; if (s ~ /K$/) m = 1024; if (s ~ /M$/) m = 1048576; sub(/[KM]$/, "", s)
      printf "%d,%d,64", s * m, $3; exit }'
  }
  I1=$(cache_arg L1i); D1=$(cache_arg L1d); LL=$(cache_arg L2)
  [ -n "$I1" ] && [ -n "$D1" ] && [ -n "$LL" ] || { echo "callgrind.sh: --cache-sim needs lscpu -C to report L1i, L1d and L2" >&2; exit 1; }
  VG+=(--cache-sim=yes "--I1=$I1" "--D1=$D1" "--LL=$LL")
fi
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [ "$BUILD" = 1 ]; then
  flag=(--release); [ "$PROFILE" = debug ] && flag=()
  cargo build --locked "${flag[@]+"${flag[@]}"}" --bin floodwall --example bare_proxy >&2
fi
FW=$TARGET_DIR/$PROFILE/floodwall
BARE=$TARGET_DIR/$PROFILE/examples/bare_proxy
D=$(mktemp -d /tmp/floodwall-callgrind.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill -9 "$p" 2>/dev/null || true; done
  [ "$KEEP" = 1 ] && echo "kept $D" >&2 || rm -rf "$D"
}
trap cleanup EXIT

wait_for() { # FILE PID WHAT
  for _ in $(seq 600); do
    [ -s "$1" ] && return 0
    kill -0 "$2" 2>/dev/null || { echo "$3 exited during start-up" >&2; exit 1; }
    sleep 0.1
  done
  echo "$3 not ready within 60 s" >&2; exit 1
}

"$FW" mock --listen 127.0.0.1:0 >"$D/mock.out" 2>&1 &
PIDS+=($!); wait_for "$D/mock.out" "${PIDS[0]}" "the mock"
for _ in $(seq 100); do grep -q listening "$D/mock.out" && break; sleep 0.1; done
MA=$(sed -n 's|.*listening on http://\([0-9.]*:[0-9]*\).*|\1|p' "$D/mock.out")

route_extra=""; top_extra=""
if [ "$KIND" = 3rules ]; then
  top_extra=$'identity:\n  user: [{ header: x-user-id }]'
  route_extra='
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
        limits: [{ tokens: 10000000000, per: 1m }]'
fi
FW_ENV=(); REQ_PATH=/v1/chat/completions; AUTH=""
if [ "$KIND" = copilot ]; then
  SECRET=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
  python3 "$ROOT/benches/copilot-policy.py" "$ROOT/examples/research-copilot.yaml" memory "$MA" >"$D/policy.yaml"
  FW_ENV=(COPILOT_JWT_SECRET="$SECRET" FLOODWALL_ADMIN_TOKEN="$SECRET")
  REQ_PATH=/chat/v1/chat/completions
  AUTH="Bearer $(python3 "$ROOT/benches/copilot-policy.py" --token "$SECRET")"
else
cat >"$D/policy.yaml" <<P
version: 1
server:
  listen: ["127.0.0.1:0"]
  admin: { listen: 127.0.0.1:0 }
  threads: 2
  grace_period: 1s
$top_extra
backends:
  mock:
    endpoints: ["http://$MA"]
routes:
  - name: chat
    match: { path_prefix: / }
    backend: mock$route_extra
P
fi

"${VG[@]}" --callgrind-out-file="$D/bare.cg" "$BARE" --listen 127.0.0.1:0 \
  --upstream "$MA" --threads 2 --ready-file "$D/bare.ready" >"$D/bare.out" 2>"$D/bare.log" &
BP=$!; PIDS+=($BP)
env "${FW_ENV[@]+"${FW_ENV[@]}"}" "${VG[@]}" --callgrind-out-file="$D/floodwall.cg" "$FW" run --config "$D/policy.yaml" \
  --ready-file "$D/fw.ready" >"$D/fw.out" 2>"$D/fw.log" &
FP=$!; PIDS+=($FP)
wait_for "$D/bare.ready" $BP "bare_proxy"
wait_for "$D/fw.ready" $FP "floodwall"
addr() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["listen"][0])' "$1"; }

cat >"$D/client.py" <<'PY'
import http.client, sys
host, port, n, path, auth = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
body = ('{"model":"mock-model","messages":[{"role":"system","content":"You are a terse assistant."},'
        '{"role":"user","content":"Say hello to the load benchmark in five words."}],"max_tokens":16,"temperature":0}')
c = http.client.HTTPConnection(host, port, timeout=60)
for _ in range(n):
    headers = {"Content-Type": "application/json", "Accept": "application/json", "X-User-Id": "bench-user-1"}
    if auth:
        headers["Authorization"] = auth
    c.request("POST", path, body, headers)
    r = c.getresponse(); r.read()
    if r.status != 200:
        sys.exit(f"status {r.status}")
PY

# wrk_load ADDR PATH AUTH SECONDS OUT: C connections for SECONDS, through
# benches/chat.lua (the load benchmark's request); prints the request count.
wrk_load() {
  BENCH_PATH=$2 BENCH_AUTHORIZATION=$3 timeout -k 2 $(($4 + 60)) wrk -t1 -c"$CONNS" -d"$4s" --timeout 30s \
    -s "$ROOT/benches/chat.lua" "http://$1$2" >"$5" 2>&1 || { echo "wrk against $1 failed: $(tail -3 "$5")" >&2; exit 1; }
  grep -q 'err_connect=0 err_read=0 err_write=0 err_status=0 err_timeout=0' "$5" \
    || { echo "wrk against $1 saw errors: $(grep WRK_RESULT "$5")" >&2; exit 1; }
  sed -n 's/^WRK_RESULT requests=\([0-9]*\).*/\1/p' "$5"
}

declare -A IR COUNTS REQS
for t in bare floodwall; do
  # bare Pingora gets the same request on the path the mock answers.
  if [ $t = bare ]; then a=$(addr "$D/bare.ready"); p=$BP; path=/v1/chat/completions; auth=""
  else a=$(addr "$D/fw.ready"); p=$FP; path=$REQ_PATH; auth=$AUTH; fi
  if [ "$CONNS" = 1 ]; then
    python3 "$D/client.py" "${a%:*}" "${a##*:}" 200 "$path" "$auth"
    callgrind_control -z "$p" >/dev/null
    python3 "$D/client.py" "${a%:*}" "${a##*:}" "$N" "$path" "$auth"
    n=$N
  else
    wrk_load "$a" "$path" "$auth" 3 "$D/$t.warmup" >/dev/null
    callgrind_control -z "$p" >/dev/null
    n=$(wrk_load "$a" "$path" "$auth" "$SECS" "$D/$t.wrk")
  fi
  callgrind_control -d "$t" "$p" >/dev/null
  f=$(ls "$D/$t.cg".* | tail -1)
  # Every event of PROGRAM TOTALS, per request (Ir first; with --cache-sim
  # also Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw).
  COUNTS[$t]=$(callgrind_annotate "$f" 2>/dev/null | awk -v n="$n" '/PROGRAM TOTALS/ {
      for (i = 1; i <= NF; i++) if ($i ~ /^[0-9,]+$/) { v = $i; gsub(",", "", v); printf "%d ", v / n }
      exit }')
  IR[$t]=${COUNTS[$t]%% *}
  REQS[$t]=$n
  [ $t = floodwall ] && FW_CG=$f
done
if [ "$CONNS" = 1 ]; then
  echo "policy $KIND, $N requests over one keep-alive connection (user-space instructions, callgrind, $PROFILE build):"
else
  echo "policy $KIND, wrk -t1 -c$CONNS for ${SECS} s under valgrind: ${REQS[bare]} requests to bare Pingora, ${REQS[floodwall]} to floodwall (user-space instructions, callgrind, $PROFILE build):"
fi
echo "  bare Pingora: ${IR[bare]} instructions/request"
echo "  floodwall:    ${IR[floodwall]} instructions/request"
awk -v f="${IR[floodwall]}" -v b="${IR[bare]}" 'BEGIN { printf "  ratio:        %.2fx\n", f / b }'
if [ "$CACHE" = 1 ]; then
  echo "simulated cache misses per request (I1 $I1, D1 $D1, last level = the per-core L2 $LL; size,ways,line in bytes):"
  printf '  %-13s %8s %8s %8s %9s %9s %9s %9s\n' "" I1mr D1mr D1mw "L2 instr" "L2 read" "L2 write" "L2 total"
  for t in bare floodwall; do
    read -r _ _ _ i1 d1r d1w ilr dlr dlw <<<"${COUNTS[$t]}"
    label="bare Pingora:"; [ $t = floodwall ] && label="floodwall:"
    printf '  %-13s %8s %8s %8s %9s %9s %9s %9s\n' "$label" "$i1" "$d1r" "$d1w" "$ilr" "$dlr" "$dlw" $((ilr + dlr + dlw))
  done
fi
if [ "$TOP" -gt 0 ]; then
  # Inclusive counts of floodwall's own functions (the runtime's and
  # Pingora's frames above them include everything), one line per function.
  echo "floodwall's $TOP most expensive functions, inclusive (instructions per request):"
  callgrind_annotate --inclusive=yes --show=Ir "$FW_CG" 2>/dev/null \
    | awk -v n="${REQS[floodwall]}" -v top="$TOP" '
        $1 ~ /^[0-9,]+$/ && NF >= 2 && /floodwall::/ && !/=>/ {
          ir = $1; gsub(",", "", ir); $1 = ""
          sub(/^ +/, ""); sub(/^\( *[0-9.]+%\) */, ""); sub(/ \[[^]]*\]$/, ""); sub(/^[^ ]*\.rs:/, "")
          # (Read to the end: exiting early would kill callgrind_annotate with SIGPIPE.)
          if (k >= top || ($0 in seen)) next
          seen[$0] = 1
          printf "  %9d  %s\n", ir / n, substr($0, 1, 150); k++
        }'
fi
