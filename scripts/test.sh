#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the end-to-end tests through the real
# binary (mock LLM backend, private redis-server instances) and doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
floodwall_need cmake:cmake redis-server:redis-server
cargo test --locked "$@"
