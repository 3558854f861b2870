#!/usr/bin/env bash
# RUSTC_WRAPPER for scripts/fuzz.sh: adds SanitizerCoverage instrumentation
# (the flags cargo-fuzz passes, minus -Zsanitizer, all accepted by stable
# rustc) to the crates whose code the fuzz targets exercise: the project's
# own crates and the third-party parsers they feed (YAML, ZIP, deflate).
# Everything else (crypto, tokio, SQLite...) is built plain: faster builds,
# faster runs, and coverage feedback that stays on the code under test.
rustc=$1
shift
crate=
prev=
for a in "$@"; do
  [ "$prev" = --crate-name ] && crate=$a
  prev=$a
done
case "$crate" in
  card | station | rig | tapline_fuzz | apdu_response | tlv | cap | cert | attestation | bundle | profile | \
    firmware_manifest | vpcd | daemon_config | serde_saphyr | granit_parser | zip | zlib_rs)
    exec "$rustc" "$@" \
      -Cpasses=sancov-module \
      -Cllvm-args=-sanitizer-coverage-level=4 \
      -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
      -Cllvm-args=-sanitizer-coverage-pc-table \
      -Cllvm-args=-sanitizer-coverage-trace-compares \
      --cfg fuzzing -Cdebug-assertions -Coverflow-checks
    ;;
  *) exec "$rustc" "$@" ;;
esac
