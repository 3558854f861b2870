#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every test of the workspace
# (unit tests, card emulator tests, station CLI tests, end-to-end batches,
# the batch report rendered by headless Chromium),
# including the tests through the real PC/SC stack: this script starts a
# private pcscd with 8 vpcd virtual readers (scripts/pcscd-vpcd.sh) for them
# and stops it again at the end. Readers by port (P = TAPLINE_VPCD_PORT):
# P, P+1 card and rig tests; P+2..P+5 tests/tests/pcsc.rs and
# rig/tests/plans.rs (the smoke plan through pcscd) (P+4 also
# pcsc_restart.rs and station's gp test); P+4..P+7 tests/tests/pcsc_faults.rs,
# which restarts pcscd with 6 readers mid-test and then with
# TAPLINE_VPCD_READERS again (cargo runs test binaries one after another).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
need_packages "${BUILD_PACKAGES[@]}" "${TEST_PACKAGES[@]}"
need_rust
need_postgres
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

export TAPLINE_VPCD_PORT=${TAPLINE_VPCD_PORT:-35963}
export TAPLINE_VPCD_READERS=8
scripts/pcscd-vpcd.sh start "$TAPLINE_VPCD_READERS" "$TAPLINE_VPCD_PORT"
trap 'scripts/pcscd-vpcd.sh stop' EXIT
cargo test --workspace

# Every fuzz target briefly (docs/fuzzing.md; the long form is
# `scripts/fuzz.sh --seconds 600`). Its build lives outside the clone and is
# reused by later runs on the same machine.
scripts/fuzz.sh --seconds "${TAPLINE_FUZZ_SECONDS:-5}"
