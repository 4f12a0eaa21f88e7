"""Install hook, run by ComfyUI-Manager and by the webui's extension loader: install requirements if missing.

Safe under either host: the webui's ``launch`` helpers are used only when they import."""
import importlib.util
import subprocess
import sys
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"


def missing_requirements() -> list[str]:
    """Requirement lines whose module is not importable (module name = distribution name here)."""
    lines = [line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines()]
    names = [line for line in lines if line]
    return [line for line in names if importlib.util.find_spec(line.split(">")[0].split("=")[0].strip()) is None]


def main() -> None:
    missing = missing_requirements()
    if not missing:
        return
    try:
        import launch  # the webui's installer, which uses the webui's own pip settings

        for requirement in missing:
            launch.run_pip(f"install {requirement}", f"comfyui-perfusion requirement: {requirement}")
    except ImportError:
        subprocess.check_call([sys.executable, "-m", "pip", "install", *missing])


if __name__ == "__main__":
    main()
