#!/bin/sh
# inih's meson build (C library and the C++ INIReader) and its own unit tests (meson test).
set -e
mkdir -p /tmp/out
log() { tail -n 40 "$1"; exit 1; }
meson setup /tmp/build --buildtype=release -Dwith_INIReader=true >/tmp/out/setup.log 2>&1 || log /tmp/out/setup.log
meson compile -C /tmp/build >/tmp/out/compile.log 2>&1 || log /tmp/out/compile.log
meson test -C /tmp/build --num-processes "$(nproc)" >/tmp/out/test.log 2>&1 || log /tmp/out/test.log
# meson's closing counts, without its column padding: the same text on every run.
grep -E '^(Ok|Expected Fail|Fail|Unexpected Pass|Skipped|Timeout):' /tmp/out/test.log \
    | sed -E 's/[[:space:]]+/ /g; s/ $//' >/tmp/out/summary.txt
cp -L /tmp/build/libinih.so.0 /tmp/out/
cd /tmp && tar -cJf /dev/sdb out
