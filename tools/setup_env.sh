#!/usr/bin/env bash
# Fresh-machine set-up: .venv/ with the test/benchmark requirements, and a real ComfyUI test host under .cache/.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements-stamp
want=$(cat requirements*.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-bench.txt
  echo "$want" > "$stamp"
fi
.venv/bin/python tools/comfy_host.py --install
