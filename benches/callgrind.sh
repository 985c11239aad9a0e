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
# Needs valgrind and python3 (standard library only).
set -Eeuo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
N=1000; KIND=minimal; BUILD=1; KEEP=0; PROFILE=release; TOP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --requests) N=$2; shift 2 ;;
    --policy) KIND=$2; shift 2 ;;
    --profile) PROFILE=$2; shift 2 ;;
    --top) TOP=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
command -v valgrind >/dev/null || { echo "callgrind.sh: needs valgrind (apt-get install -y valgrind)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "callgrind.sh: needs python3" >&2; exit 1; }
case "$PROFILE" in release|debug) ;; *) echo "callgrind.sh: --profile takes release or debug" >&2; exit 2 ;; esac
case "$N" in ''|*[!0-9]*|0) echo "callgrind.sh: --requests takes a whole number >= 1" >&2; exit 2 ;; esac
case "$KIND" in minimal|3rules|copilot) ;; *) echo "callgrind.sh: --policy takes minimal, 3rules or copilot" >&2; exit 2 ;; esac
case "$TOP" in ''|*[!0-9]*) echo "callgrind.sh: --top takes a whole number" >&2; exit 2 ;; esac
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

valgrind --tool=callgrind --callgrind-out-file="$D/bare.cg" "$BARE" --listen 127.0.0.1:0 \
  --upstream "$MA" --threads 2 --ready-file "$D/bare.ready" >"$D/bare.out" 2>"$D/bare.log" &
BP=$!; PIDS+=($BP)
env "${FW_ENV[@]+"${FW_ENV[@]}"}" valgrind --tool=callgrind --callgrind-out-file="$D/floodwall.cg" "$FW" run --config "$D/policy.yaml" \
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

declare -A IR
for t in bare floodwall; do
  # bare Pingora gets the same request on the path the mock answers.
  if [ $t = bare ]; then a=$(addr "$D/bare.ready"); p=$BP; path=/v1/chat/completions; auth=""
  else a=$(addr "$D/fw.ready"); p=$FP; path=$REQ_PATH; auth=$AUTH; fi
  python3 "$D/client.py" "${a%:*}" "${a##*:}" 200 "$path" "$auth"
  callgrind_control -z "$p" >/dev/null
  python3 "$D/client.py" "${a%:*}" "${a##*:}" "$N" "$path" "$auth"
  callgrind_control -d "$t" "$p" >/dev/null
  f=$(ls "$D/$t.cg".* | tail -1)
  total=$(callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }')
  IR[$t]=$((total / N))
  [ $t = floodwall ] && FW_CG=$f
done
echo "policy $KIND, $N requests over one keep-alive connection (user-space instructions, callgrind, $PROFILE build):"
echo "  bare Pingora: ${IR[bare]} instructions/request"
echo "  floodwall:    ${IR[floodwall]} instructions/request"
awk -v f="${IR[floodwall]}" -v b="${IR[bare]}" 'BEGIN { printf "  ratio:        %.2fx\n", f / b }'
if [ "$TOP" -gt 0 ]; then
  # Inclusive counts of floodwall's own functions (the runtime's and
  # Pingora's frames above them include everything), one line per function.
  echo "floodwall's $TOP most expensive functions, inclusive (instructions per request):"
  callgrind_annotate --inclusive=yes "$FW_CG" 2>/dev/null \
    | awk -v n="$N" -v top="$TOP" '
        $1 ~ /^[0-9,]+$/ && NF >= 2 && /floodwall::/ && !/=>/ {
          ir = $1; gsub(",", "", ir); $1 = ""
          sub(/^ +/, ""); sub(/^\( *[0-9.]+%\) */, ""); sub(/ \[[^]]*\]$/, ""); sub(/^[^ ]*\.rs:/, "")
          # (Read to the end: exiting early would kill callgrind_annotate with SIGPIPE.)
          if (k >= top || ($0 in seen)) next
          seen[$0] = 1
          printf "  %9d  %s\n", ir / n, substr($0, 1, 150); k++
        }'
fi
