#!/usr/bin/env bash
# The README's main-job command: set up (once), then train a concept and render with it in a real ComfyUI: the current
# tree (v0.33.0, with its own venv) where the set-up installed it, else the 2024-03 tree; COMFYUI_PATH picks another.
# Arguments go to tools/main_job.py (e.g. --checkpoint, --images, --trigger, --superclass, --steps).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
current=.cache/comfyui-0.33.0
if [ -z "${COMFYUI_PATH:-}" ] && [ -x "$current/venv/bin/python" ] && [ -f "$current/ComfyUI/main.py" ]; then
  COMFYUI_PATH="$PWD/$current/ComfyUI" exec "$current/venv/bin/python" tools/main_job.py "$@"
fi
exec .venv/bin/python tools/main_job.py "$@"
