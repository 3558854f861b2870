#!/usr/bin/env bash
# Rebuilds the demo wallet firmware in firmware/wallet-demo/: a structurally
# valid CAP for the wallet applet's AIDs (made by `rig make-demo-cap`) and its
# manifest signed with the DEMO ONLY release key. Deterministic: running it
# again gives the same files.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p rig -p station
out=firmware/wallet-demo
mkdir -p "$out"
target/debug/rig make-demo-cap --out "$out/tapline-wallet-demo.cap" --version 1.0
target/debug/station firmware pack \
  --cap "$out/tapline-wallet-demo.cap" --out "$out" \
  --name tapline-wallet-demo --version 1.0.0 \
  --key firmware/keys/DEMO-ONLY-release.key
