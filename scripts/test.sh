#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every test of the workspace
# (unit tests, card emulator tests, station CLI tests, end-to-end batches).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
need_packages "${BUILD_PACKAGES[@]}"
need_rust
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
