#!/bin/sh
# GNU hello's own build and test suite, run in its upstream tree (/opt/job/src):
#   examples/gnu-hello/fetch /tmp/gnu-hello     (or: corpus/fetch gnu-hello /tmp/gnu-hello)
#   construir-pack --dir /tmp/gnu-hello/hello-2.10 --script examples/gnu-hello/build.sh --image i1 --name gnu-hello
set -e
mkdir -p /tmp/out
./configure --quiet --disable-nls >/tmp/out/configure.log 2>&1 || { tail -n 30 /tmp/out/configure.log; exit 1; }
make -j"$(nproc)" >/tmp/out/make.log 2>&1 || { tail -n 30 /tmp/out/make.log; exit 1; }
make check >/tmp/out/check.log 2>&1 || { tail -n 40 /tmp/out/check.log; exit 1; }
grep -E '^# (TOTAL|PASS|SKIP|XFAIL|FAIL|XPASS|ERROR):' /tmp/out/check.log | tee /tmp/out/check-summary.txt
./hello | tee /tmp/out/run.txt
# What the corpus (corpus/gnu-hello) compares: the same text on every run.
cat /tmp/out/check-summary.txt /tmp/out/run.txt >/tmp/out/summary.txt
cp hello /tmp/out/
cd /tmp && tar -cJf /dev/sdb out
