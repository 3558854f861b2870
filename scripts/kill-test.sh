#!/usr/bin/env bash
# The long form of the kill -9 test (station/tests/kill.rs): KILLS (default
# 50) SIGKILLs of `station run --sim 8 --cards 40 --card-speed 0.05` at
# random 0.2..2 s, one ledger, checked after every restart. Repeat a run
# with TAPLINE_KILL_SEED=N (the test prints its seed).
set -euo pipefail
cd "$(dirname "$0")/.."
TAPLINE_KILLS="${1:-50}" exec cargo test -p station --test kill -- --nocapture
