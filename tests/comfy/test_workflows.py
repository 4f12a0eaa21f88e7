"""The example workflows (example_workflows/*.json, UI format) against a real ComfyUI: well-formed, every node type and
link and widget value accepted by the host's node definitions, reproducible by tools/build_workflows.py, and each
one, converted by tools/workflow_api.py, runs to completion headless on the small random SD1.5 checkpoint.

File combos (checkpoint, photo, concept names) name files a user has; before the strict checks and runs they are
replaced by the test's files (:func:`substitute`), and sizes, steps and training settings by tiny ones
(:data:`TINY`). Unsubstituted, those combos are only checked for a plausible file name.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from tools import workflow_api as wa
from tools.build_workflows import build_all, stale_files

REPO = Path(__file__).resolve().parents[2]
FOLDER = REPO / "example_workflows"
EXPECTED = {"train_concept", "single_concept", "global_key_lock", "multi_concept", "strength_sweep",
            "finetuned_transfer"}
WORKFLOWS = sorted(FOLDER.glob("*.json"))
FILE_COMBOS = {"ckpt_name": (".safetensors", ".ckpt"), "image": (".png", ".jpg", ".jpeg", ".webp"),
               "concept_name": (".safetensors",)}
# CPU-sized settings for the runs: (class, input) -> value
TINY = {
    ("EmptyLatentImage", "width"): 64, ("EmptyLatentImage", "height"): 64, ("EmptyLatentImage", "batch_size"): 1,
    ("KSampler", "steps"): 1,
    ("PerfusionTrainConcept", "steps"): 1, ("PerfusionTrainConcept", "batch_size"): 1,
    ("PerfusionTrainConcept", "grad_accum"): 1, ("PerfusionTrainConcept", "resolution"): 64,
    ("PerfusionTrainConcept", "covariance_captions"): 16, ("PerfusionTrainConcept", "checkpoint_every"): 0,
    ("PerfusionTrainConcept", "save_name"): "workflow-test-hugsy",  # never overwrite the session's hugsy
}


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def ids(path):
    return path.stem


@pytest.fixture(scope="module")
def object_info(comfy):
    assert comfy.pack is not None, comfy.pack_error
    return wa.object_info_in_process(comfy)


@pytest.fixture(scope="module")
def test_files(comfy, small_checkpoint, photo_name):
    """What file combos become: input name -> files the host lists, used in turn. Load Concept nodes get two valid
    random concepts for the small checkpoint's layers (hugsy, zorbo: the multi-concept workflow gets both);
    training is covered by train_concept.json itself."""
    from perfusion_ops.concept_file import save_concept as save
    from tools.factories import random_concept
    from tools.smoke_checkpoint import attn2_layers

    names = []
    for seed, (trigger, superclass) in enumerate((("hugsy", "teddy"), ("zorbo", "teapot"))):
        concept = random_concept(seed=seed, layers=attn2_layers("small"), trigger=trigger, superclass=superclass)
        names.append(f"workflow-{trigger}.safetensors")
        save(concept, comfy.layout.folder("perfusion") / names[-1])
    comfy.refresh_models()
    return {"ckpt_name": [small_checkpoint.name], "image": [photo_name], "concept_name": names}


def substitute(workflow: dict, object_info: dict, files: dict, tiny: bool) -> dict:
    """A copy with file combos replaced by ``files`` (cycled per input name) and, if ``tiny``, TINY settings."""
    wf = copy.deepcopy(workflow)
    used = {name: 0 for name in files}
    for node in wf["nodes"]:
        info = object_info.get(node["type"])
        if info is None:
            continue
        values = wa.widget_values(node, info)
        for name in values:
            if name in files:
                options = files[name]
                wa.set_widget(node, name, options[used[name] % len(options)], info)
                used[name] += 1
            elif tiny and (node["type"], name) in TINY:
                wa.set_widget(node, name, TINY[node["type"], name], info)
    return wf


def spec_problem(value, spec) -> str | None:
    """Why ``value`` does not fit the input spec, or None (as ComfyUI's validation sees it)."""
    kind, opts = wa.spec_type(spec), wa.spec_options(spec)
    if kind == "COMBO":
        return None if value in wa.combo_values(spec) else f"{value!r} is not one of the combo's values"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{value!r} is not a number"
        if kind == "INT" and not float(value).is_integer():
            return f"{value!r} is not an integer"
        if "min" in opts and value < opts["min"]:
            return f"{value} < min {opts['min']}"
        if "max" in opts and value > opts["max"]:
            return f"{value} > max {opts['max']}"
        return None
    return f"unknown widget type {kind}"


def widget_problems(workflow: dict, object_info: dict, check_files: bool) -> list[str]:
    problems = []
    for node in workflow["nodes"]:
        info = object_info.get(node["type"])
        if info is None:
            continue
        slots = wa.widgets_of(info)
        if len(node.get("widgets_values", [])) != len(slots):
            problems.append(f"node {node['id']} {node['type']}: {len(node.get('widgets_values', []))} widget values, "
                            f"the front end makes {len(slots)} widgets")
        specs = wa.input_specs(info)
        for k, (w, value) in enumerate(zip(slots, node.get("widgets_values", []))):
            where = f"node {node['id']} {node['type']}.{w.name or w.extra}"
            if w.extra == "control":
                if value not in wa.CONTROL_VALUES:
                    problems.append(f"{where}: control_after_generate {value!r}")
                continue
            if w.extra == "upload":
                continue
            if w.name in FILE_COMBOS and not check_files:
                if not (isinstance(value, str) and value.lower().endswith(FILE_COMBOS[w.name])):
                    problems.append(f"{where}: {value!r} is not a {'/'.join(FILE_COMBOS[w.name])} file name")
                continue
            why = spec_problem(value, specs[w.name])
            if why:
                problems.append(f"{where}: {why}")
    return problems


# --------------------------------------------------------------------------------------- static checks
def test_the_six_workflows_exist():
    assert {p.stem for p in WORKFLOWS} == EXPECTED


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids)
def test_workflow_is_well_formed(path):
    wf = load(path)
    assert wf["version"] == 0.4 and isinstance(wf["nodes"], list) and isinstance(wf["links"], list)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf["last_node_id"] >= max(nodes) and wf["last_link_id"] >= max((l[0] for l in wf["links"]), default=0)
    notes = [n for n in wf["nodes"] if n["type"] == "Note"]
    assert notes and all(len(n["widgets_values"][0]) > 100 for n in notes), "each workflow explains itself in a Note"
    seen = set()
    for link_id, origin, slot, target, target_slot, kind in wf["links"]:
        assert link_id not in seen
        seen.add(link_id)
        assert link_id in (nodes[origin]["outputs"][slot]["links"] or []), f"link {link_id} not listed at its origin"
        assert nodes[target]["inputs"][target_slot]["link"] == link_id, f"link {link_id} not at its target slot"
    for node in wf["nodes"]:
        for out in node.get("outputs", []):
            for link_id in out["links"] or []:
                assert link_id in seen, f"node {node['id']} lists unknown link {link_id}"
        for inp in node.get("inputs", []):
            assert inp["link"] is None or inp["link"] in seen


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids)
def test_node_types_exist_in_the_host(path, object_info):
    missing = {n["type"] for n in load(path)["nodes"]} - set(object_info) - wa.FRONTEND_ONLY
    assert not missing, f"not in /object_info: {missing}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids)
def test_links_join_outputs_and_inputs_of_one_type(path, object_info):
    wf = load(path)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, origin, slot, target, target_slot, kind in wf["links"]:
        src, dst = nodes[origin], nodes[target]
        if src["type"] == "PrimitiveNode":
            out_type = src["outputs"][0]["type"]
        else:
            out_type = object_info[src["type"]]["output"][slot]
            out_type = "COMBO" if isinstance(out_type, list) else out_type
        name = dst["inputs"][target_slot]["name"]
        in_type = wa.spec_type(wa.input_specs(object_info[dst["type"]])[name])
        assert out_type == in_type == kind == dst["inputs"][target_slot]["type"], \
            f"link {link_id}: {src['type']}[{slot}] {out_type} -> {dst['type']}.{name} {in_type} (link says {kind})"


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids)
def test_widget_values_fit_the_node_definitions(path, object_info, test_files, comfy):
    wf = load(path)
    assert widget_problems(wf, object_info, check_files=False) == []
    substituted = substitute(wf, object_info, test_files, tiny=False)
    listing = wa.object_info_in_process(comfy)  # now, with the test files in the model folders' combo lists
    assert widget_problems(substituted, listing, check_files=True) == []
    comfy.validate(wa.to_api(substituted, listing))  # and ComfyUI's own validation, at the real settings


def test_builder_reproduces_the_committed_files(object_info):
    """In every tree: the files depend only on the pack's own node definitions and the pinned core ones."""
    stale = stale_files(build_all(object_info), FOLDER)
    assert not stale, (f"example_workflows/ differ from tools/build_workflows.py: {stale} "
                       "(run it and commit the result)")


# ------------------------------------------------------------------------------------------ the converter
def test_converter_maps_seed_controls_primitives_and_notes(object_info):
    api = wa.to_api(load(FOLDER / "strength_sweep.json"), object_info)
    assert not any(n["class_type"] in wa.FRONTEND_ONLY for n in api.values())
    samplers = [n["inputs"] for n in api.values() if n["class_type"] == "KSampler"]
    assert len(samplers) == 4 and {s["seed"] for s in samplers} == {2024}  # from the shared seed primitive
    assert all(s["steps"] == 25 and s["sampler_name"] == "dpmpp_2m" for s in samplers)  # control value skipped
    texts = {n["inputs"]["text"] for n in api.values() if n["class_type"] == "CLIPTextEncode"}
    assert "a hugsy made of lego bricks, on a kitchen table" in texts
    betas = sorted(n["inputs"]["beta"] for n in api.values() if n["class_type"] == "PerfusionApply")
    assert betas == [0.5, 0.6, 0.7, 0.8]
    train = next(n for n in wa.to_api(load(FOLDER / "train_concept.json"), object_info).values()
                 if n["class_type"] == "PerfusionTrainConcept")["inputs"]
    assert train["seed"] == 0 and train["save_name"] == "hugsy"  # seed's control slot skipped
    assert train["images"][1] == 0 and isinstance(train["images"][0], str)


def test_converter_tolerates_other_front_ends(object_info):
    """No control slot after a seed (front ends that add none), dict widgets_values, reroutes, bypass, mute."""
    info = object_info["PerfusionTrainConcept"]
    node = {"id": 1, "type": "PerfusionTrainConcept", "widgets_values": []}
    for w in wa.widgets_of(info):
        if not w.extra:
            node["widgets_values"].append(wa.input_specs(info)[w.name][1].get("default"))
    assert wa.widget_values(node, info)["save_name"] == "hugsy"
    node["widgets_values"] = {"steps": 5, "seed": 3}
    assert wa.widget_values(node, info) == {"steps": 5, "seed": 3}
    wf = {"nodes": [
        {"id": 1, "type": "CheckpointLoaderSimple", "widgets_values": ["a.safetensors"],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]}]},
        {"id": 2, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": 1}],
         "outputs": [{"name": "", "type": "MODEL", "links": [2]}]},
        {"id": 3, "type": "FreeU", "mode": 4, "inputs": [{"name": "model", "type": "MODEL", "link": 2}],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [3]}], "widgets_values": [1.1, 1.2, 0.9, 0.2]},
        {"id": 4, "type": "ModelSamplingDiscrete", "inputs": [{"name": "model", "type": "MODEL", "link": 3}],
         "widgets_values": ["eps", False]},
        {"id": 5, "type": "SaveImage", "mode": 2, "widgets_values": ["x"]},
    ], "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"], [3, 3, 0, 4, 0, "MODEL"]]}
    api = wa.to_api(wf, object_info)
    assert set(api) == {"1", "4"}
    assert api["4"]["inputs"] == {"sampling": "eps", "zsnr": False, "model": ["1", 0]}
    with pytest.raises(wa.WorkflowError, match="NoSuchNode"):
        wa.to_api({"nodes": [{"id": 1, "type": "NoSuchNode"}], "links": []}, object_info)


# ---------------------------------------------------------------------------------------------- the runs
def isolated(prompt: dict, tag: str) -> dict:
    """The prompt with node ids unique to this workflow, except checkpoint loaders (``ckpt0``, ``ckpt1``, ...).

    The 2024 executor reuses a cached output when a node id and its inputs match the previous prompt's, whatever
    the class, so ids shared between workflows could hide a node that never ran; the loaders alone keep shared
    ids, so the session loads the checkpoint once instead of once per workflow."""
    loaders = [k for k, n in prompt.items() if n["class_type"] == "CheckpointLoaderSimple"]
    rename = {k: f"ckpt{loaders.index(k)}" if k in loaders else f"{tag}.{k}" for k in prompt}
    link = lambda v: [rename[v[0]], v[1]] if isinstance(v, list) and len(v) == 2 and v[0] in rename else v  # noqa: E731
    return {rename[k]: {**n, "inputs": {name: link(v) for name, v in n["inputs"].items()}} for k, n in prompt.items()}


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids)
def test_workflow_runs_headless(path, comfy, object_info, test_files):
    wf = substitute(load(path), object_info, test_files, tiny=True)
    prompt = isolated(wa.to_api(wf, object_info), path.stem)
    result = comfy.run(prompt)
    assert all(result.outputs.get(k) is not None for k in prompt), "a node did not run"
    shown = [k for k, n in prompt.items() if n["class_type"] in ("PreviewImage", "SaveImage")]
    assert shown and all(result.ui.get(k, {}).get("images") for k in shown), "an image node showed nothing"
    for node_id, node in prompt.items():
        if node["class_type"] == "VAEDecode":
            image = result[node_id][0]
            assert tuple(image.shape) == (1, 64, 64, 3) and bool(image.isfinite().all())
        if node["class_type"] == "PerfusionTrainConcept":
            saved = comfy.layout.folder("perfusion") / f"{TINY['PerfusionTrainConcept', 'save_name']}.safetensors"
            assert saved.is_file() and saved.stat().st_size < 64 * 1024
            assert result[node_id][0].trigger == "hugsy"
