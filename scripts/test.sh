#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the end-to-end tests through the real
# binary (mock LLM backend, private redis-server instances) and doc tests;
# then, when called without arguments (as CI does), the benchmark suite's
# quick mode (`benches/suite.sh --quick`, ~2-3 min) on the debug binaries
# `cargo test` just built: a smoke test that every benchmark still runs and
# its results table is produced (it asserts no speed). Arguments go to
# `cargo test` and skip the benchmark smoke test; FLOODWALL_SKIP_BENCH=1
# skips it too.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
need=(cmake:cmake make:make redis-server:redis-server)
bench=0
if [ $# -eq 0 ] && [ "${FLOODWALL_SKIP_BENCH:-0}" != 1 ]; then
  bench=1
  # The load benchmark's wrk, nginx and redis-benchmark (valgrind is
  # optional: the quick suite skips callgrind without it).
  need+=(wrk:wrk redis-benchmark:redis-tools)
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx:nginx-light)
fi
floodwall_need "${need[@]}"
cargo test --locked "$@"
if [ "$bench" = 1 ]; then
  benches/suite.sh --quick
fi
