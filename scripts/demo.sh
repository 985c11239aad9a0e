#!/usr/bin/env bash
# Runs floodwall in front of its bundled mock LLM backend, in memory (no Redis).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
floodwall_need cmake:cmake make:make
cargo run --locked --release --bin floodwall -- demo "$@"
