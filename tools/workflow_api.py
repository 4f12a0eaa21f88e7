"""ComfyUI workflows: UI format (what the browser saves and drag-and-drop loads) → API format (POST /prompt).

A UI workflow stores each node's widget values as a positional list (``widgets_values``) and its connections as
link records; the API format names every input. The mapping needs the node definitions (``/object_info``, or
:func:`object_info_in_process` on an in-process host), and reproduces what the front end's ``graphToPrompt``
sends (the browser test compares the two on every workflow in ``example_workflows/``):

* widgets are the inputs whose type is a combo list, ``COMBO``, INT, FLOAT, STRING or BOOLEAN, in definition
  order (required, then optional); a seed widget (INT named ``seed``/``noise_seed``, or with
  ``control_after_generate``) is followed by its "control_after_generate" value, and an ``image_upload`` combo
  adds an ``upload`` button value after the required widgets; both are skipped;
* a widget converted to an input (an input record with a ``widget`` field) takes its link, or the value of the
  PrimitiveNode feeding it;
* front-end-only nodes (Note, MarkdownNote, PrimitiveNode, Reroute) are dropped; links through Reroutes are
  followed; muted nodes (mode 2) are dropped and bypassed nodes (mode 4) pass their input of the same type on;
* links become ``[origin node id, origin slot]`` with string ids.

Stdlib only.  CLI: ``python tools/workflow_api.py workflow.json --server http://127.0.0.1:8188 > prompt.json``
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from dataclasses import dataclass
from typing import Any

FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
SEED_NAMES = {"seed", "noise_seed"}
MUTED, BYPASSED = 2, 4


class WorkflowError(ValueError):
    """A workflow that cannot be converted; the message names the node."""


@dataclass(frozen=True)
class Widget:
    """One widget slot of a node in the front end: ``name`` is the input it sets (None for the extra
    control/upload slots, which are not inputs)."""

    name: str | None
    spec: tuple | None = None  # (type or combo list, options) from /object_info
    extra: str = ""  # "control" or "upload" for the slots that are not inputs


def input_specs(info: dict) -> dict[str, tuple]:
    """``{input name: spec}`` of a node definition, required then optional (hidden inputs are not inputs)."""
    spec = info.get("input", {})
    order = info.get("input_order") or {}
    out: dict[str, tuple] = {}
    for group in ("required", "optional"):
        entries = spec.get(group) or {}
        for name in order.get(group) or entries:
            if name in entries:
                out[name] = tuple(entries[name])
    return out


def spec_type(spec: tuple) -> str:
    """``COMBO`` for a combo (list of values, or the newer ``["COMBO", {"options": [...]}]``), else the type."""
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def combo_values(spec: tuple) -> list:
    if isinstance(spec[0], list):
        return spec[0]
    return list((spec[1] if len(spec) > 1 else {}).get("options", []))


def spec_options(spec: tuple) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec: tuple) -> bool:
    """Widget-typed inputs get a widget (and a widgets_values slot), ``forceInput`` ones too (shown as inputs)."""
    return spec_type(spec) in WIDGET_TYPES


def has_control(name: str, spec: tuple) -> bool:
    """Whether the front end puts a "control_after_generate" widget after this one."""
    opts = spec_options(spec)
    return bool(opts.get("control_after_generate")) or (spec_type(spec) == "INT" and name in SEED_NAMES)


def widgets_of(info: dict) -> list[Widget]:
    """The node's widget slots in the order of ``widgets_values`` (see the module docstring)."""
    required = set((info.get("input", {}).get("required") or {}))
    widgets: list[Widget] = []
    upload_after_required = False
    specs = input_specs(info)
    names = list(specs)
    for k, name in enumerate(names):
        spec = specs[name]
        if is_widget(spec):
            widgets.append(Widget(name, spec))
            if has_control(name, spec):
                widgets.append(Widget(None, None, "control"))
            if spec_options(spec).get("image_upload"):
                upload_after_required = True
        last_required = name in required and (k + 1 == len(names) or names[k + 1] not in required)
        if last_required and upload_after_required:
            widgets.append(Widget(None, None, "upload"))
            upload_after_required = False
    return widgets


def _widget_positions(values: list, info: dict):
    """``(input name, index into values)`` of a UI node's list of widget values, control and upload slots skipped.

    Tolerant of the two front ends: a control slot is consumed only if the value there is a control word, so a
    workflow saved by a front end that adds no control widget after a seed still maps correctly."""
    position = 0
    for w in widgets_of(info):
        if position >= len(values):
            return
        if w.extra == "control":
            if isinstance(values[position], str) and values[position] in CONTROL_VALUES:
                position += 1
            continue
        if w.extra != "upload":  # the upload button's label ("image") is not an input
            yield w.name, position
        position += 1


def widget_values(node: dict, info: dict) -> dict[str, Any]:
    """``{input name: value}`` of a UI node's widgets (control and upload slots dropped)."""
    values = node.get("widgets_values")
    if values is None:
        return {}
    if isinstance(values, dict):  # some newer nodes save {name: value}
        return {w.name: values[w.name] for w in widgets_of(info) if w.name and w.name in values}
    return {name: values[position] for name, position in _widget_positions(values, info)}


def set_widget(node: dict, name: str, value: Any, info: dict) -> None:
    """Set input ``name``'s widget value in a UI node in place (e.g. to substitute test files)."""
    values = node.setdefault("widgets_values", [])
    if isinstance(values, dict):
        values[name] = value
        return
    for widget, position in _widget_positions(values, info):
        if widget == name:
            values[position] = value
            return
    raise WorkflowError(f"node {node.get('id')} ({node.get('type')}) has no widget '{name}'")


class Graph:
    """Index of a UI workflow: nodes by id, links by id."""

    def __init__(self, workflow: dict):
        if not isinstance(workflow, dict) or "nodes" not in workflow:
            raise WorkflowError("not a UI-format workflow (no 'nodes'): an API-format prompt needs no conversion")
        self.workflow = workflow
        self.nodes = {int(n["id"]): n for n in workflow["nodes"]}
        self.links: dict[int, tuple] = {}
        for link in workflow.get("links") or []:
            if isinstance(link, dict):  # newer serialisation
                link = (link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                        link.get("type"))
            self.links[int(link[0])] = tuple(link)

    def link(self, link_id) -> tuple | None:
        return None if link_id is None else self.links.get(int(link_id))

    def source(self, link_id, want_type=None) -> tuple[dict, int] | None:
        """(origin node, origin slot) of a link, following Reroutes and bypassed nodes (which pass on an input
        of the type the target wants, as the front end does); None if the chain ends unconnected."""
        seen = set()
        while True:
            link = self.link(link_id)
            if link is None:
                return None
            origin, slot = self.nodes.get(int(link[1])), int(link[2])
            if origin is None:
                raise WorkflowError(f"link {link[0]} starts at missing node {link[1]}")
            if origin["id"] in seen:
                raise WorkflowError(f"link cycle through node {origin['id']}")
            seen.add(origin["id"])
            if origin.get("type") == "Reroute":
                link_id = (origin.get("inputs") or [{}])[0].get("link")
            elif origin.get("mode") == BYPASSED:
                link_id = _bypass_input(origin, slot, want_type)
            else:
                return origin, slot


def _bypass_input(node: dict, slot: int, want_type) -> Any:
    """The link a bypassed node passes on: its input at the output's slot, else its first input, of the type
    the target wants."""
    inputs = node.get("inputs") or []
    for k in [slot, *range(len(inputs))]:
        if k < len(inputs) and inputs[k].get("type") == want_type:
            return inputs[k].get("link")
    return None


def to_api(workflow: dict, object_info: dict, *, titles: bool = False) -> dict:
    """Convert a UI workflow to an API prompt ``{id: {"class_type", "inputs"}}`` for ``object_info``.

    Raises :class:`WorkflowError` for a node type the host lacks or a dangling link. ``titles`` adds
    ``_meta.title`` as newer front ends do."""
    graph = Graph(workflow)
    prompt: dict[str, dict] = {}
    for node_id, node in sorted(graph.nodes.items()):
        kind = node.get("type")
        if kind in FRONTEND_ONLY or node.get("mode") in (MUTED, BYPASSED):
            continue
        info = object_info.get(kind)
        if info is None:
            raise WorkflowError(f"node {node_id}: type '{kind}' is not installed in this ComfyUI")
        inputs = widget_values(node, info)
        for inp in node.get("inputs") or []:
            converted = (inp.get("widget") or {}).get("name")
            key = converted or inp.get("name")
            found = graph.source(inp.get("link"), inp.get("type"))
            if found is None:
                if converted:  # a converted widget without a link is not sent (the front end sends nothing)
                    inputs.pop(key, None)
                continue
            origin, slot = found
            if origin.get("type") == "PrimitiveNode":  # the primitive's value replaces the widget's at queue time
                inputs[key] = (origin.get("widgets_values") or [None])[0]
            else:
                inputs[key] = [str(origin["id"]), slot]
        entry = {"class_type": kind, "inputs": inputs}
        if titles:
            entry["_meta"] = {"title": node.get("title") or info.get("display_name") or kind}
        prompt[str(node_id)] = entry
    return prompt


# ------------------------------------------------------------------------------------------ node definitions
def object_info_from_server(url: str, timeout: float = 60) -> dict:
    with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=timeout) as r:
        return json.loads(r.read())


def object_info_in_process(host) -> dict:
    """``/object_info`` of an in-process ComfyUI (``tools/comfy_host.Host``), from the server's own route handler,
    so it is exactly what the HTTP route would answer."""
    for route in host.prompt_server.routes:
        if getattr(route, "method", None) == "GET" and getattr(route, "path", None) == "/object_info":
            response = host.loop.run_until_complete(route.handler(None))
            return json.loads(response.body if response.body is not None else response.text)
    raise RuntimeError("this ComfyUI has no GET /object_info route")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Convert a UI-format ComfyUI workflow to the API format.")
    ap.add_argument("workflow", help="UI-format workflow .json")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--server", help="a running ComfyUI, e.g. http://127.0.0.1:8188 (reads /object_info)")
    source.add_argument("--object-info", help="a saved /object_info .json")
    a = ap.parse_args(argv)
    with open(a.workflow, encoding="utf-8") as f:
        workflow = json.load(f)
    if a.server:
        info = object_info_from_server(a.server)
    else:
        with open(a.object_info, encoding="utf-8") as f:
            info = json.load(f)
    try:
        json.dump(to_api(workflow, info), sys.stdout, indent=1)
    except WorkflowError as e:
        print(f"workflow_api: {e}", file=sys.stderr)
        return 1
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
