#!/usr/bin/env bash
# The README's test command: set up (once) and run the whole suite. pytest's exit 5 (nothing collected) fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
bash tools/setup_browser.sh  # chromium + playwright-core for tests/browser (apt, npm)
set +e
.venv/bin/python -m pytest -c tests/pytest.ini -q tests "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit $rc
