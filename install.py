"""Install hook, run by ComfyUI-Manager and by the webui's extension loader: checks the requirements, installs nothing.

Installing packages at run time is what the Comfy Registry's scan refuses, and both hosts already ship what the pack
needs (einops comes with ComfyUI and with the webuis). A missing package is named with the command that installs it."""
import importlib.util
import sys
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"


def missing_requirements() -> list[str]:
    """Requirement lines whose module is not importable (module name = distribution name here)."""
    lines = [line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines()]
    names = [line for line in lines if line]
    return [line for line in names if importlib.util.find_spec(line.split(">")[0].split("=")[0].strip()) is None]


def main() -> int:
    missing = missing_requirements()
    if missing:
        print(f"[perfusion] missing Python packages: {', '.join(missing)}; install them into the Python that runs "
              f"ComfyUI or the webui: {sys.executable} -m pip install {' '.join(repr(m) for m in missing)}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
