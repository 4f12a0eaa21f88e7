"""Entry of the Perfusion extension for AUTOMATIC1111's stable-diffusion-webui and its Forge fork.

The webui imports every ``scripts/*.py`` of an extension with the extension's folder first on ``sys.path``
(only while importing); the folder is appended here for good, so the pack's modules import later too.
Everything lives in ``perfusion_webui/host.py``; ComfyUI never reads this folder.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from perfusion_webui import host as _host  # noqa: E402
from perfusion_webui.host import PerfusionScript  # noqa: E402,F401  (the webui registers Script subclasses found here)

_host.setup()
