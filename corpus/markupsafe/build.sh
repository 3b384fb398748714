#!/bin/sh
# MarkupSafe's sdist into a wheel with its C speedups (the image's setuptools, no build isolation:
# nothing is fetched), installed in a venv with pytest from the packed wheelhouse, and its own
# tests run against the installed wheel.
set -e
mkdir -p /tmp/out
log() { tail -n 40 "$1"; exit 1; }
python3 -m build --wheel --no-isolation --outdir /tmp/out . >/tmp/out/build.log 2>&1 || log /tmp/out/build.log
python3 -m venv /tmp/venv
/tmp/venv/bin/pip install -q -r requirements-test.txt >/tmp/out/pip.log 2>&1 || log /tmp/out/pip.log
/tmp/venv/bin/pip install -q --no-deps /tmp/out/markupsafe-*.whl >>/tmp/out/pip.log 2>&1 || log /tmp/out/pip.log
# The tests import the installed wheel, not src/: run from a directory without the package.
cp -r tests /tmp/tests
cd /tmp
/tmp/venv/bin/python -c 'import markupsafe._speedups as s; print("speedups:", s.__file__.rsplit("/", 1)[1].split(".")[0])' >/tmp/out/summary.txt
/tmp/venv/bin/python -m pytest -q -p no:cacheprovider /tmp/tests >/tmp/out/pytest.log 2>&1 || log /tmp/out/pytest.log
tail -n 1 /tmp/out/pytest.log | sed -E 's/ in [0-9.]+s.*//; s/^=+ //' >>/tmp/out/summary.txt
tar -cJf /dev/sdb out
