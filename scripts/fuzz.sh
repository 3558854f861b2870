#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser that reads untrusted input
# (docs/fuzzing.md): libFuzzer through the libfuzzer-sys crate, instrumented
# with SanitizerCoverage on stable rustc (scripts/fuzz-rustc.sh).
#
#   scripts/fuzz.sh [--seconds N] [TARGET...]
#
# Builds fuzz/ (not a workspace member) and runs each TARGET (default: all)
# for N seconds (default 10; the long form is --seconds 600). Seeds come
# from fuzz/corpus/TARGET (read only); what the fuzzer learns goes to a
# working corpus beside the build, kept between runs on this machine.
# Limits: 10 s per input (a hang), 2048 MB RSS, and no single allocation
# over 64 MiB (fuzz/src/lib.rs): each is a failure. Exits non-zero naming
# the crashing input (saved under fuzz/artifacts/TARGET/) on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

seconds=10
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
  esac
done
all=(apdu_response tlv cap cert attestation bundle profile firmware_manifest vpcd daemon_config fixture)
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")

# A C++ compiler for libFuzzer itself (built from source by libfuzzer-sys).
need_packages "${BUILD_PACKAGES[@]}"
need_rust

root=$PWD
# Outside the clone by default, so CI on the same machine reuses the build.
export CARGO_TARGET_DIR=${TAPLINE_FUZZ_TARGET_DIR:-$HOME/.cache/tapline/fuzz-target}
triple=$(rustc -vV | sed -n 's/^host: //p')
# --target keeps the instrumentation out of build scripts. Not --locked:
# fuzz/Cargo.lock follows the workspace's crates when their dependencies
# change (commit the updated lock with them).
RUSTC_WRAPPER="$root/scripts/fuzz-rustc.sh" cargo build --manifest-path fuzz/Cargo.toml --release \
  --target "$triple" --bins
bin=$CARGO_TARGET_DIR/$triple/release

failed=()
for t in "${targets[@]}"; do
  [ -x "$bin/$t" ] || { echo "fuzz: unknown target $t (targets: ${all[*]})" >&2; exit 2; }
  work=$CARGO_TARGET_DIR/corpus/$t
  artifacts=$root/fuzz/artifacts/$t
  mkdir -p "$work" "$artifacts" "fuzz/corpus/$t"
  echo "== fuzz $t: $seconds s"
  log=$CARGO_TARGET_DIR/$t.log
  if "$bin/$t" "$work" "fuzz/corpus/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -max_len=65536 -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1; then
    grep -E '^stat::number_of_executed_units|^#[0-9]+.*DONE' "$log" | tr '\n' ' ' || true
    echo
  else
    tail -n 40 "$log" >&2
    found=$(grep -o "Test unit written to .*" "$log" | tail -n 1 | sed 's/Test unit written to //' || true)
    echo "fuzz: $t FAILED: crashing input ${found:-(none written; see $log)}" >&2
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: failures in: ${failed[*]}" >&2
  exit 1
fi
