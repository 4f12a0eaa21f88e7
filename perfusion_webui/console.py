"""The extension's console lines. The webui leaves Python logging unconfigured (INFO reaches no handler), so this
logger has a handler of its own that writes each line to stdout with the ``[Perfusion]`` prefix."""
from __future__ import annotations

import logging
import sys


class _Stdout(logging.StreamHandler):
    """A handler on the ``sys.stdout`` of the moment: the webui (and pytest) may replace it after import."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _):
        pass  # StreamHandler.__init__ sets it; the property always answers sys.stdout


log = logging.getLogger("perfusion.webui")
if not log.handlers:
    _handler = _Stdout()
    _handler.setFormatter(logging.Formatter("[Perfusion] %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # a webui that does configure logging would print every line twice
