"""Test-wide set-up: make the core importable without shadowing ComfyUI's own top-level modules.

The repo root is appended (not prepended) to sys.path: ComfyUI has a top-level ``nodes`` module and this
pack has a ``nodes/`` package, and the ComfyUI host must win that name."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (str(REPO), str(REPO / "tests")):
    if path not in sys.path:
        sys.path.append(path)


def pytest_report_header(config):
    """Which ComfyUI tree the host tests run against (the CI log shows one run per tree)."""
    sys.path.append(str(REPO / "tools"))
    import comfy_host  # stdlib only
    try:
        return f"ComfyUI test host: {comfy_host.tree_label(comfy_host.comfy_root())}"
    except RuntimeError as err:
        return f"ComfyUI test host: none ({err})"
