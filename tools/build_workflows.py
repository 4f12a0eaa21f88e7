"""Builds the example workflows in ``example_workflows/`` (ComfyUI's UI format, loadable by drag-and-drop).

Each workflow is a short spec below: nodes by class name with their widget values and connections by output
name. The node definitions (``/object_info``) supply everything else: widget order, defaults, the seed
"control_after_generate" slots, input and output types. The pack's own nodes are read from the host; ComfyUI's core
nodes from ``workflow_core_nodes.json`` beside this file, their definitions as pinned from the 2024-03 tree, so the
files do not change with a host's core widget layout (v0.33 gives Preview Image an output, for instance; the front
end reconciles such differences when it loads a file). ``tests/comfy/test_workflows.py`` checks that the committed
files equal what this script builds, and, separately in each tree, that they validate and run there. Each workflow
gets a ``.jpg`` thumbnail of its graph, which the template browser of current ComfyUI shows.

    .venv/bin/python tools/build_workflows.py                 # in-process ComfyUI host, writes example_workflows/
    .venv/bin/python tools/build_workflows.py --check         # exit 1 if a committed file differs
    .venv/bin/python tools/build_workflows.py --server http://127.0.0.1:8188
    .venv/bin/python tools/build_workflows.py --pin-core      # re-pin the core node definitions from the host

File names in the workflows are the ones a user has (``v1-5-pruned-emaonly.safetensors``, ``hugsy.safetensors``);
tests substitute their own files.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from tools.workflow_api import (
    combo_values,
    input_specs,
    is_widget,
    object_info_from_server,
    spec_options,
    spec_type,
    widgets_of,
)
from tools.workflow_thumbnail import thumbnail

REPO = Path(__file__).resolve().parents[1]

# PerfusionApply's gate where a workflow sets β itself (perfusion_comfy/inference.py GATES)
OWN_GATE = "beta and tau widgets"

OUT_DIR = REPO / "example_workflows"
CORE_NODES = REPO / "tools" / "workflow_core_nodes.json"
PACK_PREFIX = "Perfusion"  # the pack's node class names; every other class is a core node
SD15 = "v1-5-pruned-emaonly.safetensors"
INKPUNK = "Inkpunk-Diffusion-v2.safetensors"
NEGATIVE = "blurry, low quality, deformed, watermark, text"
COL = 440  # column width in graph units
TITLE_H = 30  # litegraph title bar (node.size excludes it)


# ------------------------------------------------------------------------------------------------ builder
class Out:
    """An output slot of a node, for wiring: ``node["MODEL"]`` or ``node[0]``."""

    def __init__(self, node: "Node", slot: int):
        self.node, self.slot = node, slot


class Node:
    def __init__(self, wf: "Workflow", node_id: int, kind: str, data: dict):
        self.wf, self.id, self.kind, self.data = wf, node_id, kind, data

    def __getitem__(self, key) -> Out:
        if isinstance(key, int):
            return Out(self, key)
        names = [o["name"] for o in self.data["outputs"]]
        if key not in names:
            raise KeyError(f"{self.kind} has no output '{key}' (has {names})")
        return Out(self, names.index(key))

    @property
    def bottom(self) -> float:
        return self.data["pos"][1] + self.data["size"][1]


class Primitive(Node):
    """A front-end PrimitiveNode: one value shared by the widgets it is wired to (``seed=prim``)."""


class Workflow:
    def __init__(self, object_info: dict):
        self.info = object_info
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.groups: list[dict] = []
        self.columns: dict[float, float] = {}  # column x -> next free y

    # -- nodes
    def _place(self, col: float, y: float | None, size: tuple[float, float]) -> list[float]:
        x = 40 + col * COL
        if y is None:
            y = self.columns.get(col, 80)
        self.columns[col] = max(self.columns.get(col, 80), y + size[1] + TITLE_H + 30)
        return [x, y]

    def _new(self, kind: str, data: dict, cls=Node) -> Node:
        node = cls(self, len(self.nodes) + 1, kind, data)
        data.update(id=node.id, type=kind)
        self.nodes.append(node)
        return node

    def add(self, kind: str, col: float, y: float | None = None, *, title: str | None = None,
            size: tuple[float, float] | None = None, **values: Any) -> Node:
        """A ComfyUI node; keyword arguments are widget values (by input name) or ``Out``/``Primitive`` wires."""
        info = self.info[kind]
        specs = input_specs(info)
        unknown = set(values) - set(specs)
        if unknown:
            raise KeyError(f"{kind} has no input(s) {sorted(unknown)}")
        inputs, widget_values = [], []
        for name, spec in specs.items():
            if not is_widget(spec):
                inputs.append({"name": name, "type": spec[0], "link": None})
        for w in widgets_of(info):
            if w.extra == "control":
                widget_values.append("fixed")
            elif w.extra == "upload":
                widget_values.append("image")
            else:
                value = values.get(w.name, _default(w.spec))
                if isinstance(value, Primitive):
                    value = value.data["widgets_values"][0]
                elif isinstance(value, Out):
                    value = _default(w.spec)
                widget_values.append(value)
        outputs = [{"name": (info.get("output_name") or [None] * len(info["output"]))[k] or t,
                    "type": "COMBO" if isinstance(t, list) else t, "links": None, "slot_index": k}
                   for k, t in enumerate(info["output"])]
        for k, is_list in enumerate(info.get("output_is_list") or []):
            if is_list:
                outputs[k]["shape"] = 6
        wired = {name for name, v in values.items() if isinstance(v, (Out, Primitive))}  # shown as inputs, not widgets
        shown = [w for w in widgets_of(info) if w.name not in wired]
        size = size or _size(len(inputs) + len(wired), len(outputs), shown, kind)
        data = {"pos": self._place(col, y, size), "size": list(size), "flags": {}, "order": 0, "mode": 0,
                "inputs": inputs, "outputs": outputs, "properties": {"Node name for S&R": kind},
                "widgets_values": widget_values}
        if title:
            data["title"] = title
        node = self._new(kind, data)
        for name, value in values.items():
            if isinstance(value, (Out, Primitive)):
                self.connect(value, node, name)
        return node

    def primitive(self, value: Any, col: float, y: float | None = None, *, title: str) -> Primitive:
        """A PrimitiveNode holding ``value``; wire it to widgets by passing it as their value."""
        size = (315, 82)
        data = {"pos": self._place(col, y, size), "size": list(size), "flags": {}, "order": 0, "mode": 0,
                "inputs": [], "outputs": [{"name": "connect to widget input", "type": "*", "links": None,
                                           "slot_index": 0}],
                "title": title, "properties": {"Run widget replace on values": False},
                "widgets_values": [value]}
        return self._new("PrimitiveNode", data, Primitive)

    def note(self, text: str, col: float, y: float | None = None, *, width: float = 400,
             title: str = "Note") -> Node:
        lines = sum(max(1, -(-len(line) // 58)) for line in text.splitlines())
        size = (width, 30 + 17 * lines)
        data = {"pos": self._place(col, y, size), "size": list(size), "flags": {}, "order": 0, "mode": 0,
                "title": title, "properties": {"text": ""}, "widgets_values": [text],
                "color": "#432", "bgcolor": "#653"}
        return self._new("Note", data)

    # -- wires and groups
    def connect(self, src: Out | Primitive, dst: Node, name: str) -> None:
        spec = input_specs(self.info[dst.kind])[name]
        link_id = len(self.links) + 1
        if isinstance(src, Primitive):
            origin, slot = src, 0
            kind = spec_type(spec)
            out = src.data["outputs"][0]
            if out["type"] not in ("*", kind):
                raise TypeError(f"primitive '{src.data['title']}' is {out['type']}, {dst.kind}.{name} is {kind}")
            out.update(name=kind, type=kind, widget={"name": name})
            if len(src.data["widgets_values"]) == 1 and kind in ("INT", "FLOAT", "COMBO"):
                src.data["widgets_values"].append("fixed")  # the primitive's own control_after_generate
        else:
            origin, slot = src.node, src.slot
            kind = origin.data["outputs"][slot]["type"]
        if isinstance(src, Primitive) or is_widget(spec):
            if kind != spec_type(spec):
                raise TypeError(f"{origin.kind}[{slot}] is {kind}, widget {dst.kind}.{name} is {spec_type(spec)}")
            dst.data["inputs"].append({"name": name, "type": spec_type(spec), "link": link_id,
                                       "widget": {"name": name}})
        else:
            target = next(i for i in dst.data["inputs"] if i["name"] == name)
            if target["type"] != kind:
                raise TypeError(f"{origin.kind}[{slot}] is {kind}, {dst.kind}.{name} wants {target['type']}")
            target["link"] = link_id
        out = origin.data["outputs"][slot]
        out["links"] = (out["links"] or []) + [link_id]
        target_slot = next(k for k, i in enumerate(dst.data["inputs"]) if i["name"] == name)
        self.links.append([link_id, origin.id, slot, dst.id, target_slot, kind])

    def group(self, title: str, nodes: list[Node], color: str = "#3f789e") -> None:
        pad = 20
        x0 = min(n.data["pos"][0] for n in nodes) - pad
        y0 = min(n.data["pos"][1] for n in nodes) - TITLE_H - pad - 34
        x1 = max(n.data["pos"][0] + n.data["size"][0] for n in nodes) + pad
        y1 = max(n.bottom for n in nodes) + pad
        self.groups.append({"title": title, "bounding": [x0, y0, x1 - x0, y1 - y0], "color": color,
                            "font_size": 24})

    # -- output
    def to_json(self) -> dict:
        order = _execution_order(self.nodes, self.links)
        for node in self.nodes:
            node.data["order"] = order[node.id]
        xs = [n.data["pos"][0] for n in self.nodes] + [g["bounding"][0] for g in self.groups]
        ys = [n.data["pos"][1] - TITLE_H for n in self.nodes] + [g["bounding"][1] for g in self.groups]
        x1 = max(n.data["pos"][0] + n.data["size"][0] for n in self.nodes)
        y1 = max(n.bottom for n in self.nodes)
        scale = round(min(1.0, 1800 / (x1 - min(xs) + 40), 960 / (y1 - min(ys) + 40)), 3)
        scale = max(scale, 0.5)  # below 0.5 the front end hides text boxes
        offset = [round(20 / scale - min(xs), 1), round(20 / scale - min(ys), 1)]
        keys = ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "title",
                "properties", "widgets_values", "color", "bgcolor")
        nodes = [{k: n.data[k] for k in keys if k in n.data and n.data[k] != []} for n in self.nodes]
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": nodes,
                "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": scale, "offset": offset}}, "version": 0.4}


def _default(spec) -> Any:
    opts = spec_options(spec)
    if "default" in opts:
        return opts["default"]
    kind = spec_type(spec)
    if kind == "COMBO":
        values = combo_values(spec)
        return values[0] if values else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


PANELS = {"PerfusionTrainConcept": 140, "PerfusionLoadConcept": 64, "PerfusionApply": 64}  # js/perfusion.js


def _size(n_inputs: int, n_outputs: int, widgets, kind: str = "") -> tuple[float, float]:
    """Roughly litegraph's computeSize (the front end grows a node that is too small, never shrinks it), plus the
    panel js/perfusion.js draws under the pack's nodes."""
    height = max(n_inputs, n_outputs, 1) * 20 + 10 + PANELS.get(kind, 0)
    for w in widgets:
        multiline = w.spec is not None and spec_type(w.spec) == "STRING" and spec_options(w.spec).get("multiline")
        height += 120 if multiline else 24
    return (315, height)


def _execution_order(nodes: list[Node], links: list[list]) -> dict[int, int]:
    deps = {n.id: set() for n in nodes}
    for _, origin, _, target, _, _ in links:
        deps[target].add(origin)
    order, done = {}, set()
    while len(done) < len(nodes):
        ready = sorted(i for i, d in deps.items() if i not in done and d <= done)
        for i in ready:
            order[i] = len(order)
        done.update(ready)
    return order


# ----------------------------------------------------------------------------------------------- the specs
def sampler(wf, col, model, positive, negative, latent, seed, *, y=None, title=None):
    """A KSampler with the workflows' sampling settings (25 steps of DPM++ 2M Karras, CFG 7)."""
    return wf.add("KSampler", col, y, title=title, model=model, positive=positive, negative=negative,
                  latent_image=latent, seed=seed, steps=25, cfg=7.0, sampler_name="dpmpp_2m", scheduler="karras")


def train_concept(info) -> dict:
    wf = Workflow(info)
    wf.note(
        "TRAIN A PERFUSION CONCEPT\n\n"
        "1. Load Checkpoint: your SD1.5-family model.\n"
        "2. Load Image: 4–8 photos of your object (add Load Image + Batch Images nodes for more; "
        "square-ish, object centred). Optional: wire a MASK to 'masks'.\n"
        "3. Perfusion Train Concept: trigger_word = a new rare word (hugsy), superclass = what it is in one "
        "common word (teddy, cat, mug). 300–400 steps, batch 4 × grad_accum 4 (paper settings). "
        "Turn flip off for asymmetric objects. The concept is saved to models/perfusion/<save_name>.safetensors.\n"
        "4. Queue: the node shows the loss live; the preview renders with the fresh concept.\n\n"
        "First run: the text covariance C is estimated once per CLIP (cached in models/perfusion_cache).",
        0, 40, width=420, title="Note: train a concept")
    ckpt = wf.add("CheckpointLoaderSimple", 0, ckpt_name=SD15)
    photos = [wf.add("LoadImage", 1, image=f"hugsy_{k}.png", size=(315, 314)) for k in (1, 2, 3)]
    batch = wf.add("ImageBatch", 2, 40, image1=photos[0]["IMAGE"], image2=photos[1]["IMAGE"])
    batch = wf.add("ImageBatch", 2, image1=batch["IMAGE"], image2=photos[2]["IMAGE"])
    train = wf.add("PerfusionTrainConcept", 3, 40, size=(360, 720), model=ckpt["MODEL"], clip=ckpt["CLIP"],
                   vae=ckpt["VAE"], images=batch["IMAGE"], trigger_word="hugsy", superclass="teddy", steps=300,
                   batch_size=4, grad_accum=4, flip=True, resolution=512, seed=0, save_name="hugsy",
                   checkpoint_every=100)
    wf.add("PreviewImage", 4, 40, title="Loss curve", size=(420, 260), images=train["loss_curve"])
    apply = wf.add("PerfusionApply", 4, model=ckpt["MODEL"], clip=ckpt["CLIP"], concept=train["concept"],
                   beta=0.7, tau=0.15, lock="local")
    pos = wf.add("CLIPTextEncode", 4, title="Prompt (positive)", size=(420, 140), clip=apply["CLIP"],
                 text="a photo of a hugsy on a sandy beach at sunset")
    neg = wf.add("CLIPTextEncode", 4, title="Negative", size=(420, 110), clip=ckpt["CLIP"], text=NEGATIVE)
    latent = wf.add("EmptyLatentImage", 4, width=512, height=512, batch_size=1)
    k = sampler(wf, 5, apply["MODEL"], pos["CONDITIONING"], neg["CONDITIONING"], latent["LATENT"], 42, y=40)
    decode = wf.add("VAEDecode", 5, samples=k["LATENT"], vae=ckpt["VAE"])
    wf.add("PreviewImage", 5, title="Preview with the new concept", size=(360, 380), images=decode["IMAGE"])
    return wf.to_json()


def single_concept(info) -> dict:
    wf = Workflow(info)
    wf.note(
        "USE ONE CONCEPT (local key lock)\n\n"
        "• Perfusion Load Concept: a file from models/perfusion (trained with train_concept.json). The node "
        "shows its trigger word, superclass and recommended β/τ.\n"
        "• Put the trigger word in the prompt: 'a photo of a hugsy ...'.\n"
        "• gate 'recommended (local lock)': the β/τ measured when the concept was trained (the node shows them). "
        "To set them yourself choose 'beta and tau widgets': lower beta = more likeness, higher = more prompt "
        "freedom (0.6–0.75 for the local lock), tau 0.15.\n"
        "• Works on any SD1.5-family checkpoint; chain LoRAs before or after Apply.",
        0, 40, width=420, title="Note: one concept")
    ckpt = wf.add("CheckpointLoaderSimple", 0, ckpt_name=SD15)
    concept = wf.add("PerfusionLoadConcept", 0, concept_name="hugsy.safetensors")
    apply = wf.add("PerfusionApply", 1, 40, model=ckpt["MODEL"], clip=ckpt["CLIP"],
                   concept=concept["concept"], beta=0.7, tau=0.15, lock="local")
    pos = wf.add("CLIPTextEncode", 1, title="Prompt (positive)", size=(400, 140), clip=apply["CLIP"],
                 text="a photo of a hugsy wearing a wizard hat in an autumn forest")
    neg = wf.add("CLIPTextEncode", 1, title="Negative", size=(400, 110), clip=apply["CLIP"], text=NEGATIVE)
    latent = wf.add("EmptyLatentImage", 2, 40, width=512, height=512, batch_size=1)
    k = sampler(wf, 2, apply["MODEL"], pos["CONDITIONING"], neg["CONDITIONING"], latent["LATENT"], 7)
    decode = wf.add("VAEDecode", 3, 40, samples=k["LATENT"], vae=ckpt["VAE"])
    wf.add("SaveImage", 3, size=(400, 440), images=decode["IMAGE"], filename_prefix="perfusion/hugsy")
    return wf.to_json()


def shared_panel_inputs(wf, prompt: str, seed: int):
    """Column 0 of a side-by-side comparison: checkpoint, concept, the prompt and seed every panel shares (edited
    once), the negative prompt and the latent."""
    ckpt = wf.add("CheckpointLoaderSimple", 0, ckpt_name=SD15)
    concept = wf.add("PerfusionLoadConcept", 0, concept_name="hugsy.safetensors")
    text = wf.primitive(prompt, 0, title="Prompt (shared)")
    seed = wf.primitive(seed, 0, title="Seed (shared)")
    neg = wf.add("CLIPTextEncode", 0, title="Negative", size=(400, 110), clip=ckpt["CLIP"], text=NEGATIVE)
    latent = wf.add("EmptyLatentImage", 0, width=512, height=512, batch_size=1)
    return ckpt, concept, text, seed, neg, latent


def global_key_lock(info) -> dict:
    wf = Workflow(info)
    wf.note(
        "LOCAL vs GLOBAL KEY LOCK (paper App. C)\n\n"
        "Both panels use the same concept, prompt and seed (edit them once in the two shared nodes).\n"
        "• Local lock (left): CLIP Text Encode; the concept's keys follow its superclass. β 0.6–0.75.\n"
        "• Global lock (right): Perfusion Global Key Lock encodes the prompt twice — K sees it with the trigger "
        "replaced by the superclass word, V sees the real prompt. Use a lower β (0.4–0.6).\n"
        "The global lock usually follows the prompt's layout more closely; the local lock keeps more likeness.",
        0, 40, width=420, title="Note: key locks")
    ckpt, concept, text, seed, neg, latent = shared_panel_inputs(
        wf, "a hugsy playing a guitar on a stage, concert lights", 1234)
    panels = []
    for col, (lock, beta, encoder) in enumerate((("local", 0.7, "CLIPTextEncode"),
                                                 ("global", 0.5, "PerfusionGlobalKeyLock")), start=1):
        col = 1 + (col - 1) * 2
        apply = wf.add("PerfusionApply", col, 80, title=f"Apply ({lock} lock)",
                       model=ckpt["MODEL"], clip=ckpt["CLIP"], concept=concept["concept"], gate=OWN_GATE,
                       beta=beta, tau=0.15, lock="local")
        pos = wf.add(encoder, col, title=f"Prompt ({lock} lock)", clip=apply["CLIP"], text=text)
        k = sampler(wf, col, apply["MODEL"], pos["CONDITIONING"], neg["CONDITIONING"], latent["LATENT"], seed)
        decode = wf.add("VAEDecode", col + 1, 80, samples=k["LATENT"], vae=ckpt["VAE"])
        image = wf.add("PreviewImage", col + 1, size=(400, 440), title=f"{lock} key lock, β {beta:.2f}",
                       images=decode["IMAGE"])
        panels.append((lock, beta, [apply, pos, k, decode, image]))
    for lock, beta, nodes in panels:
        wf.group(f"{lock} key lock (β {beta:.2f})", nodes, "#3f789e" if lock == "local" else "#8a5a9e")
    return wf.to_json()


def multi_concept(info) -> dict:
    wf = Workflow(info)
    wf.note(
        "TWO CONCEPTS IN ONE PROMPT (Eq. 4)\n\n"
        "hugsy (a teddy) and zorbo (e.g. a teapot) were trained separately with train_concept.json. Chain "
        "one Perfusion Apply per concept: the result is one joint edit, each concept with its own β/τ.\n"
        "• Use both trigger words in the prompt.\n"
        "• Each Apply uses its concept's recommended β/τ (gate). If one concept dominates, set its gate to "
        "'beta and tau widgets' and raise its beta (or lower the other's). Applying the same concept twice "
        "replaces it.",
        0, 40, width=420, title="Note: two concepts")
    ckpt = wf.add("CheckpointLoaderSimple", 0, ckpt_name=SD15)
    hugsy = wf.add("PerfusionLoadConcept", 0, concept_name="hugsy.safetensors")
    zorbo = wf.add("PerfusionLoadConcept", 0, concept_name="zorbo.safetensors")
    a = wf.add("PerfusionApply", 1, 40, title="Apply hugsy", model=ckpt["MODEL"],
               clip=ckpt["CLIP"], concept=hugsy["concept"], beta=0.7, tau=0.15, lock="local")
    b = wf.add("PerfusionApply", 1, title="Apply zorbo", model=a["MODEL"], clip=a["CLIP"],
               concept=zorbo["concept"], beta=0.7, tau=0.15, lock="local")
    pos = wf.add("CLIPTextEncode", 2, 40, title="Prompt (positive)", size=(400, 140), clip=b["CLIP"],
                 text="a hugsy sailing inside a zorbo on a calm lake, golden hour")
    neg = wf.add("CLIPTextEncode", 2, title="Negative", size=(400, 110), clip=b["CLIP"], text=NEGATIVE)
    latent = wf.add("EmptyLatentImage", 2, width=512, height=512, batch_size=1)
    k = sampler(wf, 3, b["MODEL"], pos["CONDITIONING"], neg["CONDITIONING"], latent["LATENT"], 99, y=40)
    decode = wf.add("VAEDecode", 3, samples=k["LATENT"], vae=ckpt["VAE"])
    wf.add("SaveImage", 4, 40, size=(400, 440), images=decode["IMAGE"], filename_prefix="perfusion/hugsy-zorbo")
    return wf.to_json()


def strength_sweep(info) -> dict:
    wf = Workflow(info)
    betas = (0.5, 0.6, 0.7, 0.8)
    wf.note(
        "STRENGTH SWEEP (paper Fig. 7)\n\n"
        "One concept, one prompt, one seed, four gate biases β. Lower β opens the gate wider: more likeness "
        "to your photos, less freedom for the prompt; higher β: the reverse. Pick the β that balances both "
        "and use it in your graphs. Edit the prompt and seed once in the shared nodes; change β on each "
        "Apply node (τ 0.15 throughout).",
        0, 40, width=420, title="Note: β sweep")
    ckpt, concept, text, seed, neg, latent = shared_panel_inputs(
        wf, "a hugsy made of lego bricks, on a kitchen table", 2024)
    panels = []
    for k, beta in enumerate(betas):
        col = 1 + k
        apply = wf.add("PerfusionApply", col, 80, title=f"Apply β {beta:.2f}",
                       model=ckpt["MODEL"], clip=ckpt["CLIP"], concept=concept["concept"], gate=OWN_GATE,
                       beta=beta, tau=0.15, lock="local")
        pos = wf.add("CLIPTextEncode", col, title=f"Prompt (β {beta:.2f})", clip=apply["CLIP"],
                     text=text)
        ks = sampler(wf, col, apply["MODEL"], pos["CONDITIONING"], neg["CONDITIONING"], latent["LATENT"], seed)
        decode = wf.add("VAEDecode", col, samples=ks["LATENT"], vae=ckpt["VAE"])
        image = wf.add("PreviewImage", col, size=(400, 440), title=f"β {beta:.2f}", images=decode["IMAGE"])
        panels.append((beta, [apply, pos, ks, decode, image]))
    for beta, nodes in panels:
        label = {0.5: "more likeness", 0.8: "more prompt freedom"}.get(beta, "")
        wf.group(f"β {beta:.2f}" + (f" — {label}" if label else ""), nodes)
    return wf.to_json()


def finetuned_transfer(info) -> dict:
    wf = Workflow(info)
    wf.note(
        "A CONCEPT ON A FINE-TUNED CHECKPOINT\n\n"
        "The concept was trained on SD1.5 (left). Perfusion locks its keys to the superclass and recomputes "
        "them from each model's own weights, so the same file works on a fine-tune of SD1.5 (right: an "
        "InkPunk-style model; use its own trigger 'nvinkpunk' in the prompt).\n"
        "• Pick any SD1.5-family fine-tune in the right Load Checkpoint.\n"
        "• Style fine-tunes often need a lower β (0.6) to keep the likeness.",
        0, 40, width=420, title="Note: transfer")
    concept = wf.add("PerfusionLoadConcept", 0, concept_name="hugsy.safetensors")
    seed = wf.primitive(77, 0, title="Seed (shared)")
    latent = wf.add("EmptyLatentImage", 0, width=512, height=512, batch_size=1)
    panels = []
    for k, (ckpt_name, label, beta, prompt) in enumerate((
            (SD15, "SD1.5 (trained on)", 0.7, "a photo of a hugsy riding a bicycle in a neon city street"),
            (INKPUNK, "InkPunk fine-tune", 0.6, "nvinkpunk, a hugsy riding a bicycle in a neon city street"))):
        col = 1 + 2 * k
        ckpt = wf.add("CheckpointLoaderSimple", col, 80, title=f"Load Checkpoint ({label})", ckpt_name=ckpt_name)
        apply = wf.add("PerfusionApply", col, model=ckpt["MODEL"], clip=ckpt["CLIP"],
                       concept=concept["concept"], gate=OWN_GATE, beta=beta, tau=0.15, lock="local")
        pos = wf.add("CLIPTextEncode", col, size=(400, 140), title="Prompt", clip=apply["CLIP"], text=prompt)
        neg = wf.add("CLIPTextEncode", col, size=(400, 110), title="Negative", clip=ckpt["CLIP"], text=NEGATIVE)
        ks = sampler(wf, col + 1, apply["MODEL"], pos["CONDITIONING"], neg["CONDITIONING"], latent["LATENT"], seed,
                     y=80)
        decode = wf.add("VAEDecode", col + 1, samples=ks["LATENT"], vae=ckpt["VAE"])
        image = wf.add("PreviewImage", col + 1, size=(400, 440), title=label, images=decode["IMAGE"])
        panels.append((label, [ckpt, apply, pos, neg, ks, decode, image]))
    for label, nodes in panels:
        wf.group(label, nodes)
    return wf.to_json()


WORKFLOWS = {
    "train_concept": train_concept,
    "single_concept": single_concept,
    "global_key_lock": global_key_lock,
    "multi_concept": multi_concept,
    "strength_sweep": strength_sweep,
    "finetuned_transfer": finetuned_transfer,
}


# ------------------------------------------------------------------------------------------------- output
def layout_info(object_info: dict) -> dict:
    """The definitions the workflows are built from: the pack's nodes from ``object_info``, core nodes pinned."""
    pinned = json.loads(CORE_NODES.read_text(encoding="utf-8"))
    return {**pinned, **{k: v for k, v in object_info.items() if k.startswith(PACK_PREFIX)}}


def pin_core(object_info: dict) -> dict:
    """The core node definitions the workflows use, taken from ``object_info`` (what ``--pin-core`` writes)."""
    used = {node["type"] for build in WORKFLOWS.values() for node in build(object_info)["nodes"]}
    return {k: object_info[k] for k in sorted(used) if k in object_info and not k.startswith(PACK_PREFIX)}


def build_all(object_info: dict) -> dict[str, dict]:
    info = layout_info(object_info)
    return {name: build(info) for name, build in WORKFLOWS.items()}


def dumps(workflow: dict) -> str:
    """Stable JSON: 2-space indent, short lists of scalars (positions, links, widget values) on one line."""
    def enc(value, indent):
        pad, inner = "  " * indent, "  " * (indent + 1)
        if isinstance(value, dict):
            if not value:
                return "{}"
            items = [f"{inner}{json.dumps(k)}: {enc(v, indent + 1)}" for k, v in value.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(value, list):
            if not value:
                return "[]"
            flat = json.dumps(value, ensure_ascii=False)
            if all(not isinstance(v, (dict, list)) for v in value) and len(flat) <= 100:
                return flat
            return "[\n" + ",\n".join(inner + enc(v, indent + 1) for v in value) + "\n" + pad + "]"
        return json.dumps(value, ensure_ascii=False)
    return enc(workflow, 0) + "\n"


def stale_files(built: dict[str, dict], folder: Path) -> list[str]:
    """Names of workflow files (and thumbnails) in ``folder`` that differ from ``built``.

    A thumbnail counts as current when its pixels are within JPEG noise of a fresh drawing (encoders may differ)."""
    import numpy as np
    from PIL import Image

    stale = []
    for name, workflow in built.items():
        path, jpg = folder / f"{name}.json", folder / f"{name}.jpg"
        if not path.is_file() or path.read_text(encoding="utf-8") != dumps(workflow):
            stale.append(path.name)
        want = np.asarray(thumbnail(workflow), dtype=np.float32)
        have = np.asarray(Image.open(jpg).convert("RGB"), dtype=np.float32) if jpg.is_file() else None
        if have is None or have.shape != want.shape or np.abs(have - want).mean() > 4:
            stale.append(jpg.name)
    return stale


def host_object_info() -> dict:
    """/object_info of an in-process ComfyUI test host with this pack loaded (tools/comfy_host.py)."""
    from tools import comfy_host
    from tools.workflow_api import object_info_in_process
    host = comfy_host.start_in_process(Path(tempfile.mkdtemp(prefix="perfusion-workflows-")))
    if host.pack is None:
        raise RuntimeError(f"the pack did not load: {host.pack_error}")
    return object_info_in_process(host)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build example_workflows/*.json from the specs in this file.")
    ap.add_argument("--server", help="read /object_info from a running ComfyUI instead of an in-process host")
    ap.add_argument("--object-info", type=Path, help="read a saved /object_info .json")
    ap.add_argument("--check", action="store_true", help="only compare with the committed files")
    ap.add_argument("--pin-core", action="store_true",
                    help=f"first re-pin the core node definitions ({CORE_NODES.name})")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    a = ap.parse_args(argv)
    if a.server:
        info = object_info_from_server(a.server)
    elif a.object_info:
        info = json.loads(a.object_info.read_text())
    else:
        info = host_object_info()
    if a.pin_core:
        CORE_NODES.write_text(dumps(pin_core(info)), encoding="utf-8")
    stale = stale_files(build_all(info), a.out) if a.check else []
    if not a.check:
        for name, workflow in build_all(info).items():
            a.out.mkdir(parents=True, exist_ok=True)
            (a.out / f"{name}.json").write_text(dumps(workflow))
            thumbnail(workflow).save(a.out / f"{name}.jpg", quality=85)
            print(f"wrote {name}.json and {name}.jpg in {a.out}")
    if stale:
        print(f"out of date: {', '.join(stale)} (run tools/build_workflows.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
