"""Test-wide checks: the packages under test are this checkout's (the editable install of tools/setup_env.sh)."""
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Fail at once, naming the fix, where the project is not installed into this Python or another checkout is."""
    for package in ("perfusion_ops", "perfusion_comfy", "perfusion_webui", "tools", "bench"):
        spec = importlib.util.find_spec(package)
        where = Path(spec.origin).resolve().parent.parent if spec and spec.origin else None
        if where != REPO:
            raise pytest.UsageError(
                f"`{package}` {'imports from ' + str(where) if where else 'is not importable'}, not from {REPO}: "
                f"install this checkout into the test venv with `bash tools/setup_env.sh` "
                f"(it runs `pip install --no-deps -e .`)")


def pytest_report_header(config):
    """Which ComfyUI tree the host tests run against (the CI log shows one run per tree)."""
    from tools import comfy_host  # stdlib only
    try:
        return f"ComfyUI test host: {comfy_host.tree_label(comfy_host.comfy_root())}"
    except RuntimeError as err:
        return f"ComfyUI test host: none ({err})"
