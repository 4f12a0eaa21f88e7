"""Ready for the Comfy Registry: pyproject metadata by the registry's rules, a .comfyignore that keeps development
files out of the archive but everything ComfyUI loads in, and an install hook that installs nothing."""
from __future__ import annotations

import ast
import fnmatch
import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_registry_fields(pyproject):
    project, comfy = pyproject["project"], pyproject["tool"]["comfy"]
    name = project["name"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", name) and len(name) < 100
    assert "comfyui" not in name.lower(), "a registry rule: the node id must not contain 'ComfyUI'"
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert (REPO / project["license"]["file"]).is_file()
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert any(c.startswith("Operating System ::") for c in project["classifiers"])
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"].startswith("https://")
    assert (REPO / "assets" / Path(comfy["Icon"]).name).is_file(), "the icon the URL points at is in the repository"
    assert re.fullmatch(r"(>=|<=|<|>|~=|!=)\d+\.\d+\.\d+", comfy["requires-comfyui"])
    assert project["dependencies"] == [line.split("#")[0].strip() for line in
                                       (REPO / "requirements.txt").read_text().splitlines()
                                       if line.split("#")[0].strip()]


def archive() -> list[str]:
    """The files the registry would pack: tracked files less .comfyignore's patterns (directory and glob rules)."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    rules = [r.strip() for r in (REPO / ".comfyignore").read_text().splitlines()
             if r.strip() and not r.startswith("#")]

    def ignored(path):
        return any(path.startswith(r) if r.endswith("/") else fnmatch.fnmatch(path, r) for r in rules)

    return [f for f in files if not ignored(f)]


def test_archive_holds_the_pack_and_no_development_files():
    packed = archive()
    for needed in ("__init__.py", "perfusion_comfy/__init__.py", "perfusion_ops/__init__.py", "js/perfusion.js",
                   "requirements.txt", "pyproject.toml", "LICENSE", "README.md", "install.py"):
        assert needed in packed, needed
    assert any(f.startswith("example_workflows/") and f.endswith(".json") for f in packed)
    assert not [f for f in packed if f.startswith(("tests/", "bench/", "tools/", ".ci/"))]


OWN = ("perfusion_ops", "perfusion_comfy", "perfusion_webui", "tools", "bench")  # pyproject's packages


def own_imports(path: str) -> list[Path]:
    """What a file imports from the repo, as module paths without .py (relative imports resolved against the file);
    ``from m import x`` gives m/x, which is either a submodule or a name defined in m."""
    found = []
    for node in ast.walk(ast.parse((REPO / path).read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = Path(path).parents[node.level - 1]
                module = base.joinpath(*node.module.split(".")) if node.module else base
            elif node.module.split(".")[0] in OWN:
                module = Path(*node.module.split("."))
            else:
                continue
            found += [module / alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [Path(*a.name.split(".")) for a in node.names if a.name.split(".")[0] in OWN]
    return found


def test_the_pack_imports_only_what_the_archive_holds():
    """Every repo module the ComfyUI entry reaches (``__init__.py`` → perfusion_comfy → perfusion_ops) is packed, and
    none of it imports the development packages or the webui adapter."""
    packed = set(archive())

    def is_module(m: Path) -> bool:
        return f"{m}.py" in packed or f"{m}/__init__.py" in packed

    pack_code = [p for p in packed if p.endswith(".py") and (p == "__init__.py" or p.split("/")[0] in OWN)]
    assert {"__init__.py", "perfusion_comfy/__init__.py", "perfusion_ops/__init__.py"} <= set(pack_code)
    for path in pack_code:
        for module in own_imports(path):
            assert module.parts[0] not in ("tools", "bench", "perfusion_webui"), (path, str(module))
            assert is_module(module) or is_module(module.parent), (path, str(module))


def test_install_hook_installs_nothing_and_names_what_is_missing(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("perfusion_install", REPO / "install.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    assert "subprocess" not in (REPO / "install.py").read_text() and "run_pip" not in (REPO / "install.py").read_text()
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("einops>=0.7\nno_such_package_perfusion>=1\n")
    hook.REQUIREMENTS = requirements
    assert hook.missing_requirements() == ["no_such_package_perfusion>=1"]
    assert hook.main() == 1
    assert "missing Python packages: no_such_package_perfusion>=1" in capsys.readouterr().out
    run = subprocess.run([sys.executable, str(REPO / "install.py")], capture_output=True, text=True)
    assert run.returncode == (1 if importlib.util.find_spec("einops") is None else 0), run.stdout
