"""comfyui-perfusion: Perfusion (key-locked rank-1 editing, SIGGRAPH 2023) as ComfyUI nodes.

ComfyUI loads this folder as a package; everything below imports relatively."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
