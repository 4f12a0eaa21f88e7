"""``python -m perfusion_ops info FILE`` and ``python -m perfusion_ops export-embedding FILE OUT``."""
from .cli import main

raise SystemExit(main())
