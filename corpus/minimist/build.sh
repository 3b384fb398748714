#!/bin/sh
# minimist's whole dependency tree installed offline from the packed npm cache (npm ci), its own
# tests run the way its package.json runs them (nyc tape), and the package packed by npm.
set -e
mkdir -p /tmp/out
log() { tail -n 40 "$1"; exit 1; }
npm ci --offline --ignore-scripts --no-audit --no-fund >/tmp/out/ci.log 2>&1 || log /tmp/out/ci.log
npm run --silent tests-only >/tmp/out/test.log 2>&1 || log /tmp/out/test.log
grep -E '^# (tests|pass|fail)' /tmp/out/test.log >/tmp/out/summary.txt
node -e 'console.log(JSON.stringify(require("./")(["-x", "3", "--name=construir", "-abc", "rest"])))' >>/tmp/out/summary.txt
npm pack --silent --ignore-scripts --pack-destination /tmp/out >/dev/null 2>>/tmp/out/test.log || log /tmp/out/test.log
cd /tmp && tar -cJf /dev/sdb out
