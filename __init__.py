"""comfyui-perfusion: Perfusion (key-locked rank-1 editing, SIGGRAPH 2023) as ComfyUI nodes.

The ComfyUI entry point. ComfyUI loads this folder under a name of its own choosing (the folder name, or its
path); the folder is appended to ``sys.path`` so that the adapter (``perfusion_comfy``) and the core
(``perfusion_ops``) load once, under their package names, as the webui extension and the tests load them.
Appended, not prepended: the pack must never shadow a module of ComfyUI or of another pack."""
import os
import sys

_ROOT = os.path.dirname(os.path.realpath(__file__))
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

import perfusion_comfy  # noqa: E402
from perfusion_comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

_LOADED = os.path.dirname(os.path.dirname(os.path.realpath(perfusion_comfy.__file__)))
if _LOADED != _ROOT:  # another copy of the pack loaded first: its Python would serve this copy's front end
    import logging
    logging.getLogger("perfusion").warning(
        "[perfusion] %s uses the Perfusion code of %s: two copies of the pack are installed; remove one",
        _ROOT, _LOADED)

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
