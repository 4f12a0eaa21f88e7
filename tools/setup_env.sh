#!/usr/bin/env bash
# Fresh-machine set-up: .venv/ with the test/benchmark requirements, this project (editable) and the 2024-03 ComfyUI
# test host, plus the current
# ComfyUI (v0.33.0) under .cache/ with a venv of its own where ../shared/hosts/ holds it.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements-stamp
# the project itself is installed editable, so everything imports by package name; the stamp holds this checkout's
# path too, since the editable install points at it
want=$( (cat requirements.txt requirements-dev.txt requirements-host.txt requirements-bench.txt pyproject.toml; pwd) \
  | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-bench.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
fi
.venv/bin/python tools/comfy_host.py --install
# rc 3: ../shared/hosts is absent (a user's clone); tools/test.sh says so and skips that tree
.venv/bin/python tools/comfy_host.py --install-current || [ $? -eq 3 ]
