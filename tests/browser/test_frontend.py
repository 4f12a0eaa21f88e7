"""The front-end extension (js/perfusion.js) and its route (perfusion_comfy/routes.py) in a real ComfyUI server.

The route and the served script are checked over HTTP. The browser test drives ComfyUI's own web UI in headless
Chromium (Debian's package, through playwright-core; set up by tools/setup_browser.sh, skipped with the reason when
absent), once per renderer the tree's front end has: classic canvas nodes (2024 and current front ends) and Vue
nodes ("Nodes 2.0", current front end only). Each run loads every workflow in example_workflows/ (no missing nodes;
the prompt the UI would queue equals tools/workflow_api.py's conversion), queues train_concept.json with tiny
settings through the Queue/Run button and checks the live loss chart, step counter, preview render and toast, feeds
the panel a resumed run's messages, queues a run the node refuses (error in the panel and a toast), then checks the
trigger/superclass/β-τ labels on Load Concept and Apply,
the recommended-β/τ menu item, and a corrupt file's error. Screenshots go to
.cache/artifacts/browser/<tree>-<renderer>/.
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

from tools import comfy_host
from tools import workflow_api as wa

from browser_env import ARTIFACTS, BROWSER_DIR, CONCEPT, PHOTO, REPO, browser_missing, tree_name, vue_nodes_missing

JS = REPO / "js" / "perfusion.js"
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
TRAIN_STEPS = 3
PANEL_NODES = {"PerfusionTrainConcept", "PerfusionLoadConcept", "PerfusionApply"}  # the nodes the extension extends
CORRUPT = "corrupt.safetensors"  # written by conftest.py
OWN_GATE, GATE_INDEX = "beta and tau widgets", 6  # Apply's gate that uses beta/tau; its place in widgets_values
MEAN_BLUE, ERROR_RED = "rgb(90, 169, 255)", "rgb(255, 107, 107)"  # the panel's β/τ line and error line
UI_TIMEOUT_MS, TRAIN_TIMEOUT_MS = 60_000, 300_000


def _tree():
    try:
        return comfy_host.comfy_root()
    except RuntimeError:
        return None  # no host: the server fixture fails with the fix


TREE = _tree()
RENDERERS = [pytest.param("classic", id="classic"),
             pytest.param("vue", id="vue", marks=pytest.mark.skipif(
                 TREE is None or vue_nodes_missing(TREE) is not None,
                 reason=f"no Vue nodes: {TREE and vue_nodes_missing(TREE)}"))]


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


def legacy_apply(workflow, trailing: list) -> dict:
    """``workflow`` as saved before Apply had its gate widget: Apply's values end at end_at (then ``trailing``)."""
    wf = copy.deepcopy(workflow)
    for node in wf["nodes"]:
        if node["type"] == "PerfusionApply":
            node["widgets_values"] = node["widgets_values"][:GATE_INDEX] + trailing
    return wf


def ui_settings(renderer: str) -> dict:
    """User settings stored on the server before the page loads: the renderer, and no first-start dialogs over the
    canvas (the template browser, the missing-models warning for the example workflows' checkpoint names)."""
    return {"Comfy.VueNodes.Enabled": renderer == "vue", "Comfy.TutorialCompleted": True,
            "Comfy.Workflow.ShowMissingModelsWarning": False}


def run_driver(plan: dict, tmp_path: Path, artifacts: Path) -> dict:
    plan_path, result_path = tmp_path / "plan.json", tmp_path / "result.json"
    plan_path.write_text(json.dumps(plan))
    run = subprocess.run(["node", str(BROWSER_DIR / "ui_driver.mjs"), str(plan_path), str(result_path)],
                         cwd=BROWSER_DIR, capture_output=True, text=True, timeout=600)
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if result_path.is_file():
        shutil.copy(result_path, artifacts / "result.json")
    context = f"driver rc {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}\nerror: {result.get('error')}"
    assert run.returncode == 0 and not result.get("error"), context
    return result


@pytest.mark.parametrize("renderer", RENDERERS)
def test_ui_trains_with_live_chart_toast_and_labels_concepts(request, renderer, tmp_path):
    why = browser_missing()
    if why:
        pytest.skip(why)
    ui_server = request.getfixturevalue("ui_server")
    for key, value in ui_settings(renderer).items():
        ui_server._request(f"/settings/{key}", json.dumps(value).encode())
    info = ui_server.get("/object_info")
    trained = f"hugsy-{renderer}"  # a new file per run: the server's cache would skip an identical training
    gallery = {p.stem: json.loads(p.read_text()) for p in WORKFLOWS}
    tiny = {"ckpt_name": "sd15-small-random.safetensors", "image": PHOTO,
            ("EmptyLatentImage", "width"): 64, ("EmptyLatentImage", "height"): 64, ("KSampler", "steps"): 1,
            ("PerfusionTrainConcept", "steps"): TRAIN_STEPS, ("PerfusionTrainConcept", "batch_size"): 1,
            ("PerfusionTrainConcept", "grad_accum"): 1, ("PerfusionTrainConcept", "resolution"): 64,
            ("PerfusionTrainConcept", "covariance_captions"): 16, ("PerfusionTrainConcept", "checkpoint_every"): 0,
            ("PerfusionTrainConcept", "preview_prompts"): "a photo of a <trigger>",  # one render, at the last step
            ("PerfusionTrainConcept", "save_name"): trained}
    train = substitute(gallery["train_concept"], info, tiny)
    refused = substitute(train, info, {("PerfusionTrainConcept", "superclass"): ""})
    labels = substitute(gallery["single_concept"], info, {**tiny, "concept_name": f"{trained}.safetensors"})
    legacy = [legacy_apply(gallery["single_concept"], trailing) for trailing in ([], [None])]
    artifacts = ARTIFACTS / f"{tree_name(ui_server.root)}-{renderer}"
    shutil.rmtree(artifacts, ignore_errors=True)
    artifacts.mkdir(parents=True)
    plan = {"url": ui_server.url, "artifacts": str(artifacts), "renderer": renderer, "timeout_ms": UI_TIMEOUT_MS,
            "train_timeout_ms": TRAIN_TIMEOUT_MS, "gallery": gallery,
            "legacy": [{"workflow": wf, "node": node_id(wf, "PerfusionApply")} for wf in legacy],
            "train": {"workflow": train, "node": node_id(train, "PerfusionTrainConcept")},
            "fail": {"workflow": refused, "node": node_id(refused, "PerfusionTrainConcept")},
            "labels": {"workflow": labels, "load_node": node_id(labels, "PerfusionLoadConcept"),
                       "apply_node": node_id(labels, "PerfusionApply"), "corrupt": CORRUPT}}
    try:
        result = run_driver(plan, tmp_path, artifacts)
    except AssertionError as e:
        raise AssertionError(f"{e}\nserver log:\n{ui_server.log_tail(40)}") from None
    assert result["frontend"]["vue_nodes"] in ((renderer == "vue"), None), result["frontend"]  # None: 2024 UI

    # every workflow loads in the real UI, and the UI queues exactly what the converter makes (the 2024 UI also
    # sends LoadImage's upload button as an input "upload"; ComfyUI ignores undeclared inputs, the converter omits it)
    for name, workflow in gallery.items():
        assert result["missing"][name] == [], (name, result["missing"][name])
        ui_prompt, extra = declared_inputs(result["prompts"][name], info)
        assert ui_prompt == wa.to_api(workflow, info), name
        assert extra <= {("LoadImage", "upload", "image")}, extra
    # the panel is not a widget value when the UI saves a workflow (the 2024 UI stores a trailing null for it)
    panel_value = [] if result["frontend"]["version"] else [None]
    for name, workflow in gallery.items():
        original = {str(n["id"]): n["widgets_values"] + (panel_value if n["type"] in PANEL_NODES else [])
                    for n in workflow["nodes"] if n["type"].startswith("Perfusion")}
        assert result["saved"][name] == original, name
    # an Apply saved before the gate widget (its values end at end_at, or at the 2024 UI's null for the panel) keeps
    # using its beta and tau widgets; a new one uses the concept's recommendation
    assert result["legacy"] == [{"widget": OWN_GATE, "queued": OWN_GATE}] * 2, result["legacy"]
    assert result["prompts"]["single_concept"][str(node_id(gallery["single_concept"], "PerfusionApply"))]["inputs"][
        "gate"] == "recommended (local lock)"
    # no uncaught exception, and no console error from the extension (the current front end logs its own, e.g. the
    # templates it cannot fetch offline; concept_info answers 404/422 for the missing and the corrupt file)
    assert result["page_errors"] == [], result["page_errors"]
    ours = [e for e in result["console_errors"]
            if "perfusion" in (e["url"] + e["text"]).lower() and "Failed to load resource" not in e["text"]]
    assert ours == [], ours

    # the live loss chart and step counter on the Train node, then the toast
    t = result["train"]
    assert t["status"] == "done" and t["steps"] == TRAIN_STEPS and t["step"] == TRAIN_STEPS, t
    assert len(t["losses"]) == TRAIN_STEPS and all(math.isfinite(x) and x > 0 for x in t["losses"])
    assert t["drawn"]["points"] == TRAIN_STEPS and t["drawn"]["label"].startswith(f"done: {TRAIN_STEPS} steps")
    assert f"saved {trained}.safetensors" in t["drawn"]["label"]
    assert t["panel"]["visible"] and t["panel"]["lines"][0]["text"] == t["drawn"]["label"], t["panel"]
    assert t["chart_pixels"] > 20, "no running-mean line on the panel's chart"
    assert (ui_server.layout.folder("perfusion") / f"{trained}.safetensors").is_file()
    if t.get("running_seen"):  # a frame during training (CPU steps are slow enough, but don't depend on it)
        seen = t["running_seen"]
        assert seen["status"] == "running" and seen["step"] < TRAIN_STEPS, seen
        assert seen["panel"]["visible"] and seen["panel"]["lines"][0]["text"].startswith(f"step {seen['step']}/")
    assert f"{TRAIN_STEPS} steps · saved {trained}.safetensors" in t["toast"], t["toast"]
    # the preview render beside the chart (previews every 50 steps by default, and at the end), saved beside the file
    assert (t["drawn"]["previews"], t["drawn"]["previewStep"], t["panel"]["previews"]) == (1, TRAIN_STEPS, 1), t
    assert (ui_server.layout.folder("perfusion") / f"{trained}.png").is_file()

    # a resumed run's curve: the checkpoint's losses first, then the new ones; from a finished concept, its own only
    resumed = result["resumed"]
    assert resumed["checkpoint"]["losses"] == [0.9, 0.7, 0.5, 0.4] and resumed["checkpoint"]["first"] == 1
    assert resumed["checkpoint"]["points"] == 4 and resumed["checkpoint"]["chart_pixels"] > 20
    assert resumed["checkpoint"]["label"].startswith("step 4/5 · loss 0.4000")
    assert resumed["finished"]["losses"] == [0.3] and resumed["finished"]["first"] == 11

    # a refused run: the error in the panel and in an error toast
    refusal = "the superclass word is empty"
    assert result["fail"]["drawn"]["label"].startswith("error: ") and refusal in result["fail"]["drawn"]["label"]
    assert refusal in result["fail"]["toast"], result["fail"]

    # trigger word, superclass and recommended β/τ on Load Concept and Apply
    load, apply = result["labels"]["load"], result["labels"]["apply"]
    for drawn in (load, apply):
        assert drawn["info"]["trigger"] == "hugsy" and drawn["info"]["superclass"] == "teddy", drawn
        assert drawn["lines"][0] == 'trigger "hugsy" → superclass "teddy"', drawn["lines"]
        assert drawn["lines"][1] == "β/τ local 0.70/0.15 · global 0.50/0.15", drawn["lines"]
        assert drawn["panel"]["visible"] and [x["text"] for x in drawn["panel"]["lines"]] == drawn["lines"], drawn
        assert drawn["panel"]["lines"][1]["color"] == MEAN_BLUE, drawn["panel"]
    assert load["lines"][2].startswith("7 layers · ") and load["lines"][2].endswith("KB · keys locked")
    assert apply["lines"][2] == f"from {trained}.safetensors"
    # "recommended β/τ (global lock)" from the menu: the file's values in the widgets, which now count
    assert result["labels"]["menu"] == {"beta": 0.5, "tau": 0.15, "gate": OWN_GATE}

    # a corrupt file: its error in red, on Load Concept and on Apply
    for drawn in result["labels"]["corrupt"].values():
        first = drawn["panel"]["lines"][0]
        assert drawn["panel"]["visible"] and "corrupt" in first["text"] and first["color"] == ERROR_RED, drawn

    names = {Path(p).name for p in result["screenshots"]}
    assert {"train-node.png", "train-toast.png", "concept-labels.png", "concept-error.png"} <= names, names
    assert all((artifacts / name).is_file() for name in names)
