"""HTTP route for the front-end extension: ``GET /perfusion/concept_info?name=<file in models/perfusion>``.

Answers the concept's trigger word, superclass, recommended β/τ, layer count, file size and whether its keys
were trained, so Load Concept and Apply can show them on the node (js/perfusion.js). Errors are JSON too:
``{"error": message}`` with 400 (no name), 404 (no such file) or 422 (not a usable concept).
Registered at import time on ``server.PromptServer.instance.routes``; without a server (headless use) it is skipped.
The file is read and parsed in a worker thread, never on the server's event loop (which serves every request and
websocket), and the core refuses a file beyond the concept envelope (header size, tensor count) before parsing it.
"""
from __future__ import annotations

import asyncio
import logging
import os

import folder_paths

from perfusion_ops.concept import ConceptError
from perfusion_ops.concept_file import load_concept
from .folders import FOLDER

log = logging.getLogger("perfusion")
ROUTE = "/perfusion/concept_info"


def concept_info(name: str) -> tuple[int, dict]:
    """(HTTP status, JSON body) for the concept file ``name`` in the perfusion model folders."""
    if not name:
        return 400, {"error": "missing ?name=<concept file in models/perfusion>"}
    path = folder_paths.get_full_path(FOLDER, name)  # only files inside the configured perfusion folders
    if path is None or not os.path.isfile(path):
        return 404, {"error": f"'{name}' is not in models/perfusion", "name": name}
    try:
        concept = load_concept(path)
    except ConceptError as err:
        return 422, {"error": str(err), "name": name}
    except Exception as err:  # noqa: BLE001  (a route must answer; the node will say the same when it runs)
        log.warning("[perfusion] concept_info %s: %s", name, err)
        return 422, {"error": f"'{name}' could not be read: {err}", "name": name}
    (beta_local, tau_local), (beta_global, tau_global) = concept.recommended("local"), concept.recommended("global")
    return 200, {
        "name": name,
        "trigger": concept.trigger,
        "superclass": concept.superclass,
        "beta_local": beta_local,
        "tau_local": tau_local,
        "beta_global": beta_global,
        "tau_global": tau_global,
        "train_beta": concept.train_beta,
        "train_tau": concept.train_tau,
        "layers": len(concept.layers),
        "size": os.path.getsize(path),
        "trained_k": concept.trained_keys,
        "clip_layer": concept.clip_layer,
        "model_family": concept.model_family,
        "text_encoder": concept.text_encoder,
        "width": concept.width,
        "vectors": int(concept.embedding.shape[0]),
        "info": dict(concept.info),
    }


def register() -> bool:
    """Add the route to the running PromptServer (once); False when there is none."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None or getattr(instance, "routes", None) is None:
        return False
    if any(getattr(r, "path", None) == ROUTE for r in instance.routes):
        return True

    @instance.routes.get(ROUTE)
    async def get_concept_info(request):
        status, body = await asyncio.to_thread(concept_info, request.rel_url.query.get("name", ""))
        return web.json_response(body, status=status)

    return True


register()
