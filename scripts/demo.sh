#!/usr/bin/env bash
# The main job on the embedded default: a demo batch of 48 cards on 9
# emulated readers at realistic card speed, paired into 16 bundles (1 primary
# + 2 backups), recorded in a SQLite ledger under reports/ with a printable
# label per bundle. Extra arguments go to `station run` (e.g. --sim-faults
# counterfeit=0.05,tear=0.05,selftest=0.02 or --card-speed 0).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
need_packages "${BUILD_PACKAGES[@]}"
need_rust
cargo build -q -p station
mkdir -p reports
ledger=reports/demo-ledger.db
target/debug/station run --profile profiles/demo.yaml --sim 9 --cards 48 --ledger "$ledger" "$@"
echo
echo "export the ledger: target/debug/station ledger export --ledger $ledger --format json"
