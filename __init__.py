"""comfyui-perfusion: Perfusion (key-locked rank-1 editing, SIGGRAPH 2023) as ComfyUI nodes.

The ComfyUI entry point. ComfyUI loads this folder under a name of its own choosing (the folder name, or its
path); the folder is appended to ``sys.path`` so that the adapter (``perfusion_comfy``) and the core
(``perfusion_ops``) load once, under their package names, as the webui extension and the tests load them.
Appended, not prepended: the pack must never shadow a module of ComfyUI or of another pack."""
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from perfusion_comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
