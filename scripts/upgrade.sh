#!/usr/bin/env bash
# Zero-downtime upgrade of a running floodwall to a new binary.
#
#   scripts/upgrade.sh OLD_PID CONFIG [NEW_BINARY] [UPGRADE_SOCK]
#
# 1. starts NEW_BINARY (default: floodwall on PATH) with --upgrade: it waits
#    on UPGRADE_SOCK for the listening sockets;
# 2. sends SIGQUIT to OLD_PID: the old process hands its sockets over, keeps
#    serving what it has in flight, and exits once drained (at the latest
#    after server.grace_period).
# No connection is refused and no request fails during the hand-off (tested
# by tests/e2e/upgrade.rs). Both processes must use the same UPGRADE_SOCK
# (default /tmp/pingora_upgrade.sock, or the --upgrade-sock the old one got)
# and the same listen addresses (fixed ports).
set -euo pipefail
old_pid=${1:?usage: upgrade.sh OLD_PID CONFIG [NEW_BINARY] [UPGRADE_SOCK]}
config=${2:?usage: upgrade.sh OLD_PID CONFIG [NEW_BINARY] [UPGRADE_SOCK]}
binary=${3:-floodwall}
sock=${4:-/tmp/pingora_upgrade.sock}
kill -0 "$old_pid" 2>/dev/null || { echo "error: no process $old_pid" >&2; exit 1; }
rm -f "$sock"
nohup "$binary" run --config "$config" --upgrade --upgrade-sock "$sock" >>floodwall-upgrade.log 2>&1 &
new_pid=$!
for _ in $(seq 1 200); do
  [ -S "$sock" ] && break
  kill -0 "$new_pid" 2>/dev/null || { echo "error: the new process exited; see floodwall-upgrade.log" >&2; exit 1; }
  sleep 0.05
done
[ -S "$sock" ] || { echo "error: the new process did not open $sock" >&2; kill "$new_pid"; exit 1; }
kill -QUIT "$old_pid"
echo "upgrade started: new pid $new_pid; old pid $old_pid drains and exits by itself"
