#!/usr/bin/env bash
# The test command: set up the machine (scripts/setup.sh), build the binaries, run every test.
# End-to-end tests run the real follower and learner binaries with the real model on this
# machine's /var/log/dpkg.log.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# --all-targets resolves features as `cargo test` and clippy do, so llama.cpp builds once.
cargo build --workspace --all-targets --locked
TRACEFLEET_TEST_MODEL="$PWD/models/SmolLM2-135M-Instruct.Q4_1.gguf" cargo test --workspace --locked "$@"
