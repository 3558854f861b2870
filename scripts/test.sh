#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every test of the workspace
# (unit tests, card emulator tests, station CLI tests, end-to-end batches,
# the batch report rendered by headless Chromium),
# including the tests through the real PC/SC stack: this script starts a
# private pcscd with 6 vpcd virtual readers (scripts/pcscd-vpcd.sh) for them
# and stops it again at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
need_packages "${BUILD_PACKAGES[@]}" "${TEST_PACKAGES[@]}"
need_rust
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

export TAPLINE_VPCD_PORT=${TAPLINE_VPCD_PORT:-35963}
scripts/pcscd-vpcd.sh start 6 "$TAPLINE_VPCD_PORT"
trap 'scripts/pcscd-vpcd.sh stop' EXIT
cargo test --workspace
