#!/usr/bin/env bash
# The README's main-job command: set up (once), then train a concept and render with it in a real ComfyUI.
# Arguments go to tools/main_job.py (e.g. --checkpoint, --images, --trigger, --superclass, --steps).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
exec .venv/bin/python tools/main_job.py "$@"
