"""Shared by conftest.py and the tests here: paths, test file names, and whether a headless browser can run."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BROWSER_DIR = Path(__file__).resolve().parent
ARTIFACTS = REPO / ".cache" / "artifacts" / "browser"  # screenshots and the driver's result (not committed)
CHROMIUM = Path("/usr/bin/chromium")
PHOTO = "chelsea.png"
CONCEPT = "hugsy-random.safetensors"
if str(REPO / "tools") not in sys.path:
    sys.path.append(str(REPO / "tools"))


def browser_missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is absent (run: bash tools/setup_browser.sh)"
    if shutil.which("node") is None:
        return "Node.js is absent (run: bash tools/setup_browser.sh)"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "tests/browser/node_modules/playwright-core is absent (run: bash tools/setup_browser.sh)"
    return None
