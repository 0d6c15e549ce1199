#!/usr/bin/env bash
# Run every test: lint gates, unit tests, and the integration tests that mount for real
# (they skip with a printed reason where /dev/fuse or root is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
# The vendored fuser's own additions (the io_uring transport's commit policy).
cargo test -p fuser --lib uring
# Mount tests run one binary; its tests run two at a time (2 cores; each mount has threads).
cargo test --all-targets -- --test-threads=2
