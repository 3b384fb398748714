#!/bin/sh
# rustfilt built and tested by cargo with the crates of its published Cargo.lock, offline
# (CARGO_HOME from the packed setup.sh replaces crates.io with the vendored copies).
set -e
mkdir -p /tmp/out
log() { tail -n 40 "$1"; exit 1; }
cargo build --release --locked --offline >/tmp/out/build.log 2>&1 || log /tmp/out/build.log
cargo test --release --locked --offline >/tmp/out/test.log 2>&1 || log /tmp/out/test.log
grep -E '^test result:' /tmp/out/test.log | sed -E 's/; finished in .*//' >/tmp/out/summary.txt
printf '_ZN4core3fmt5write17h0123456789abcdefE\n_RNvCs1234_7mycrate3foo\n' | target/release/rustfilt >>/tmp/out/summary.txt
cp target/release/rustfilt /tmp/out/
cd /tmp && tar -cJf /dev/sdb out
