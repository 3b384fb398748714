#!/bin/sh
# json-c's CMake build with ninja and its own test suite through ctest.
set -e
mkdir -p /tmp/out
log() { tail -n 40 "$1"; exit 1; }
cmake -S . -B /tmp/build -G Ninja -DCMAKE_BUILD_TYPE=Release >/tmp/out/cmake.log 2>&1 || log /tmp/out/cmake.log
cmake --build /tmp/build >/tmp/out/build.log 2>&1 || log /tmp/out/build.log
ctest --test-dir /tmp/build --output-on-failure -j"$(nproc)" >/tmp/out/ctest.log 2>&1 || log /tmp/out/ctest.log
grep -E 'tests passed, [0-9]+ tests failed out of' /tmp/out/ctest.log >/tmp/out/summary.txt
cp -L /tmp/build/libjson-c.so.5 /tmp/out/
cd /tmp && tar -cJf /dev/sdb out
