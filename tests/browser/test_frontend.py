"""The front-end extension (js/perfusion.js) and its route (nodes/routes.py) in a real ComfyUI server.

The route and the served script are checked over HTTP. The browser test drives ComfyUI's own bundled web UI in
headless Chromium (Debian's package, through playwright-core; set up by tools/setup_browser.sh, skipped with the
reason when absent): it loads every workflow in example_workflows/ (no missing nodes; the prompt the UI would queue equals
tools/workflow_api.py's conversion), queues train_concept.json with tiny settings through the Queue button and
checks the live loss chart and step counter, then checks the trigger/superclass/β-τ labels on Load Concept and
Apply. Screenshots go to .cache/artifacts/browser/.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import urllib.error
from pathlib import Path

import pytest

from browser_env import ARTIFACTS, BROWSER_DIR, CONCEPT, PHOTO, REPO, browser_missing  # puts tools/ on sys.path

import comfy_host  # noqa: E402
import workflow_api as wa  # noqa: E402

JS = REPO / "js" / "perfusion.js"
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
TRAIN_STEPS = 3
TRAINED = "hugsy-browser"


def get_json(server, path):
    """(status, body) of a GET that answers JSON, errors included."""
    try:
        return 200, json.loads(server._request(path))
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ------------------------------------------------------------------------------------------- no browser
@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is absent (run: bash tools/setup_browser.sh)")
def test_extension_script_parses(tmp_path):
    module = tmp_path / "perfusion.mjs"  # --check parses .mjs as an ES module
    module.write_text(JS.read_text())
    subprocess.run(["node", "--check", str(module)], check=True, capture_output=True, text=True)


def test_extension_is_served(ui_server):
    scripts = ui_server.get("/extensions")
    path = f"/extensions/{comfy_host.PACK_NAME}/perfusion.js"
    assert path in scripts, scripts
    assert ui_server._request(path) == JS.read_bytes()


def test_concept_info_route(ui_server):
    status, info = get_json(ui_server, f"/perfusion/concept_info?name={CONCEPT}")
    assert status == 200, info
    assert info["trigger"] == "hugsy" and info["superclass"] == "teddy"
    assert (info["beta_local"], info["tau_local"], info["beta_global"], info["tau_global"]) == (0.7, 0.15, 0.5, 0.15)
    assert info["layers"] == 7 and info["trained_k"] is False and info["width"] == 768
    assert info["size"] == (ui_server.layout.folder("perfusion") / CONCEPT).stat().st_size
    for query, code, words in [("", 400, "missing"), ("?name=nope.safetensors", 404, "not in models/perfusion"),
                               ("?name=../checkpoints/sd15-small-random.safetensors", 404, "not in"),
                               ("?name=corrupt.safetensors", 422, "corrupt")]:
        status, body = get_json(ui_server, "/perfusion/concept_info" + query)
        assert status == code and words in body["error"], (query, status, body)


# ---------------------------------------------------------------------------------------------- browser
def substitute(workflow, info, values: dict) -> dict:
    """Copy of a UI workflow with widget values replaced: ``values[(class, input)]`` or ``values[input]``."""
    wf = copy.deepcopy(workflow)
    for node in wf["nodes"]:
        if node["type"] not in info:
            continue
        for name in wa.widget_values(node, info[node["type"]]):
            for key in ((node["type"], name), name):
                if key in values:
                    wa.set_widget(node, name, values[key], info[node["type"]])
                    break
    return wf


def declared_inputs(prompt: dict, info: dict) -> tuple[dict, set]:
    """The prompt without inputs its node definitions do not declare, and those inputs as (class, name, value)."""
    kept, extra = {}, set()
    for node_id, node in prompt.items():
        declared = wa.input_specs(info[node["class_type"]])
        extra |= {(node["class_type"], k, json.dumps(v).strip('"'))
                  for k, v in node["inputs"].items() if k not in declared}
        kept[node_id] = {"class_type": node["class_type"],
                         "inputs": {k: v for k, v in node["inputs"].items() if k in declared}}
    return kept, extra


def node_id(workflow, kind, index=0):
    return [n["id"] for n in workflow["nodes"] if n["type"] == kind][index]


def test_ui_loads_workflows_trains_with_live_chart_and_labels_concepts(ui_server, tmp_path):
    why = browser_missing()
    if why:
        pytest.skip(why)
    info = ui_server.get("/object_info")
    gallery = {p.stem: json.loads(p.read_text()) for p in WORKFLOWS}
    tiny = {"ckpt_name": "sd15-small-random.safetensors", "image": PHOTO,
            ("EmptyLatentImage", "width"): 64, ("EmptyLatentImage", "height"): 64, ("KSampler", "steps"): 1,
            ("PerfusionTrainConcept", "steps"): TRAIN_STEPS, ("PerfusionTrainConcept", "batch_size"): 1,
            ("PerfusionTrainConcept", "grad_accum"): 1, ("PerfusionTrainConcept", "resolution"): 64,
            ("PerfusionTrainConcept", "covariance_captions"): 16, ("PerfusionTrainConcept", "checkpoint_every"): 0,
            ("PerfusionTrainConcept", "save_name"): TRAINED}
    train = substitute(gallery["train_concept"], info, tiny)
    labels = substitute(gallery["single_concept"], info, {**tiny, "concept_name": f"{TRAINED}.safetensors"})
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    plan = {"url": ui_server.url, "artifacts": str(ARTIFACTS), "timeout_ms": 480_000, "gallery": gallery,
            "train": {"workflow": train, "node": node_id(train, "PerfusionTrainConcept")},
            "labels": {"workflow": labels, "load_node": node_id(labels, "PerfusionLoadConcept"),
                       "apply_node": node_id(labels, "PerfusionApply")}}
    plan_path, result_path = tmp_path / "plan.json", tmp_path / "result.json"
    plan_path.write_text(json.dumps(plan))
    run = subprocess.run(["node", str(BROWSER_DIR / "ui_driver.mjs"), str(plan_path), str(result_path)],
                         cwd=BROWSER_DIR, capture_output=True, text=True, timeout=560)
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    shutil.copy(result_path, ARTIFACTS / "result.json") if result_path.is_file() else None
    context = (f"driver rc {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n"
               f"error: {result.get('error')}\nserver log:\n{ui_server.log_tail(40)}")
    assert run.returncode == 0 and not result.get("error"), context

    # every workflow loads in the real UI, and the UI queues exactly what the converter makes (the 2024 UI also
    # sends LoadImage's upload button as an input "upload"; ComfyUI ignores undeclared inputs, the converter omits it)
    for name, workflow in gallery.items():
        assert result["missing"][name] == [], (name, result["missing"][name])
        ui_prompt, extra = declared_inputs(result["prompts"][name], info)
        assert ui_prompt == wa.to_api(workflow, info), name
        assert extra <= {("LoadImage", "upload", "image")}, extra
    assert result["page_errors"] == [], result["page_errors"]
    errors = [e for e in result["console_errors"] if "Failed to load resource" not in e]
    assert errors == [], errors

    # the live loss chart and step counter on the Train node
    t = result["train"]
    assert t["status"] == "done" and t["steps"] == TRAIN_STEPS and t["step"] == TRAIN_STEPS, t
    assert len(t["losses"]) == TRAIN_STEPS and all(math.isfinite(x) and x > 0 for x in t["losses"])
    assert t["drawn"]["points"] == TRAIN_STEPS and t["drawn"]["label"].startswith(f"done: {TRAIN_STEPS} steps")
    assert f"saved {TRAINED}.safetensors" in t["drawn"]["label"]
    assert t["chart_pixels"] > 20, "no running-mean line on the canvas"
    assert (ui_server.layout.folder("perfusion") / f"{TRAINED}.safetensors").is_file()
    if t.get("running_seen"):  # a frame during training (CPU steps are slow enough, but don't depend on it)
        assert t["running_seen"]["status"] == "running" and t["running_seen"]["step"] < TRAIN_STEPS

    # trigger word, superclass and recommended β/τ on Load Concept and Apply
    load, apply = result["labels"]["load"], result["labels"]["apply"]
    for drawn in (load, apply):
        assert drawn["info"]["trigger"] == "hugsy" and drawn["info"]["superclass"] == "teddy", drawn
        assert drawn["lines"][0] == 'trigger "hugsy" → superclass "teddy"', drawn["lines"]
        assert drawn["lines"][1] == "β/τ local 0.70/0.15 · global 0.50/0.15", drawn["lines"]
    assert load["lines"][2].startswith("7 layers · ") and load["lines"][2].endswith("KB · keys locked")
    assert apply["lines"][2] == f"from {TRAINED}.safetensors"
    assert result["labels"]["menu"]["beta"] == 0.5  # "recommended β/τ (global lock)" from the context menu
    assert all((ARTIFACTS / Path(p).name).is_file() for p in result["screenshots"])
