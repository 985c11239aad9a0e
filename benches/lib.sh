# Shared by the benchmark scripts (benches/load.sh, cache.sh, streams.sh,
# suite.sh): logging, the PIDs a script started and their clean-up on exit,
# reading a process's CPU time and memory from /proc, where the binaries are
# (release or debug build), and a private redis-server. Source it after
# setting BENCH (the log tag) and KEEP (1: keep the scratch directory).

log() { printf '[%s %s] %s\n' "$BENCH" "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- --pin (load.sh, streams.sh) ----------------------------------------------

# Command prefixes: the load side (client or wrk, the mock, Redis) on CPU 0,
# the proxy under test on CPU 1. Empty unless pin_setup ran.
ON_LOAD=(); ON_PROXY=()
pin_setup() {
  command -v taskset >/dev/null 2>&1 || die "--pin needs taskset (util-linux)"
  [ "$(nproc)" -ge 2 ] || die "--pin needs 2 CPUs (the proxy on one, the load side on the other)"
  ON_LOAD=(taskset -c 0); ON_PROXY=(taskset -c 1)
}

# --- processes: every PID started here, stopped on exit --------------------

PIDS=()
WORK=""
cleanup() {
  local rc=$? pid i
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for ((i = 0; i < 30; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "PID $pid did not stop within 3s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  PIDS=()
  if [ -n "$WORK" ] && [ -d "$WORK" ]; then
    if [ "$KEEP" = 1 ] || [ "$rc" != 0 ]; then
      log "logs and raw output kept in $WORK"
    else
      rm -rf "$WORK"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
# (Subshells inherit the trap: only the script itself reports.)
trap '[ "$BASHPID" = "$$" ] && log "interrupted"; exit 130' INT TERM

# Stop one process we started (SIGTERM, bounded wait, SIGKILL) and forget it.
stop_pid() {
  local pid=$1 i keep=()
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 30; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    log "PID $pid did not stop within 3s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  for i in "${PIDS[@]}"; do [ "$i" = "$pid" ] || keep+=("$i"); done
  PIDS=("${keep[@]+"${keep[@]}"}")
}

alive() { kill -0 "$1" 2>/dev/null; }

# Wait (bounded) until FILE exists and is non-empty, while PID lives.
wait_file() {
  local file=$1 pid=$2 what=$3 i
  for ((i = 0; i < 300; i++)); do
    [ -s "$file" ] && return 0
    alive "$pid" || die "$what exited during start-up (see $WORK)"
    sleep 0.1
  done
  die "$what not ready within 30s (see $WORK)"
}

# --- /proc readings -----------------------------------------------------------

# utime+stime of a process (all its threads, dead ones included), in ticks.
cpu_ticks() {
  local s
  s=$(<"/proc/$1/stat") || die "process $1 is gone"
  s=${s##*) }
  # shellcheck disable=SC2086
  set -- $s
  echo $(( ${12} + ${13} ))
}
# CPU time of all of a process's threads in ns, from /proc/PID/task/*/schedstat
# (the same clock as utime+stime, without the 1/CLK_TCK resolution, which is
# too coarse for the c=1 runs against a 20 ms backend: ~9 ticks per run).
# Threads that exit between two readings would be missed: the proxies' worker
# threads live for the whole run, and utime+stime is recorded too as a check.
cpu_ns() { cat "/proc/$1/task/"*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%.0f\n", s }'; }
hwm_kb() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
reset_hwm() { echo 5 >"/proc/$1/clear_refs" 2>/dev/null || true; }

# --- binaries -------------------------------------------------------------------

# bin_dir PROFILE: the directory of cargo's PROFILE (release or debug) build,
# honouring CARGO_TARGET_DIR and a target-dir set in cargo's configuration.
bin_dir() {
  local profile=$1 dir
  case "$profile" in release|debug) ;; *) die "unknown profile $profile (release or debug)" ;; esac
  dir=$(cargo metadata --format-version 1 --no-deps 2>/dev/null | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
  echo "${dir:-$ROOT/target}/$profile"
}

# The "listen" (first address) or "admin" field of a floodwall --ready-file.
ready_field() { sed -n "s/.*\"$2\":\\[\\{0,1\\}\"\\([^\"]*\\)\".*/\\1/p" "$1"; }

# --- a private redis-server -------------------------------------------------------

REDIS_PORT=""
REDIS_PID=""
rcli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }

# A private redis-server on a free port (never a shared instance): pick a
# random port nobody answers on, start it there (no persistence, data under
# $WORK/redis), and retry on another port if it could not bind. Sets
# REDIS_PORT and REDIS_PID (also in PIDS, so it is stopped on exit).
start_redis() {
  local attempt port i
  mkdir -p "$WORK/redis"
  for ((attempt = 1; attempt <= 10; attempt++)); do
    port=$(( 20000 + (RANDOM * 32768 + RANDOM) % 30000 ))
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then continue; fi
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
      --dir "$WORK/redis" --logfile "" >"$WORK/redis/redis-$port.log" 2>&1 &
    REDIS_PID=$!; PIDS+=("$REDIS_PID")
    for ((i = 0; i < 100; i++)); do
      if ! alive "$REDIS_PID"; then break; fi
      if [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]; then
        REDIS_PORT=$port
        return 0
      fi
      sleep 0.1
    done
    stop_pid "$REDIS_PID"
    log "redis-server could not start on port $port (see $WORK/redis/redis-$port.log); trying another"
  done
  die "could not start redis-server on a free port (see $WORK/redis)"
}

# A counter of the private redis-server's INFO stats, e.g. total_reads_processed.
redis_stat() { rcli info stats | tr -d '\r' | awk -F: -v k="$1" '$1 == k { print $2 }'; }
# Commands the private redis-server has processed so far.
redis_cmds() { redis_stat total_commands_processed; }
# "commands reads" processed so far, from one INFO (itself one of each).
redis_counts() {
  rcli info stats | tr -d '\r' | awk -F: '$1 == "total_commands_processed" { c = $2 } $1 == "total_reads_processed" { r = $2 } END { print c, r }'
}

# The facts every report starts with: rev (the commit, marked when the tree
# has uncommitted changes), CPU_MODEL, LOAD_BEFORE and START (Unix seconds).
run_facts() {
  if rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null); then
    git -C "$ROOT" diff --quiet HEAD 2>/dev/null || rev="$rev (+ uncommitted changes)"
  else
    rev="unknown (not a git checkout)"
  fi
  CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
  # The caches per core: the CPU ratios at c=64 move with them from host to
  # host (64 requests' state in flight on one core).
  local caches
  caches=$(lscpu -C=NAME,ONE-SIZE 2>/dev/null | awk 'NR > 1 { printf "%s%s %s", (n++ ? ", " : ""), $1, $2 }' || true)
  [ -z "$caches" ] || CPU_MODEL="${CPU_MODEL:+$CPU_MODEL, }caches $caches"
  LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
  START=$(date +%s)
}
