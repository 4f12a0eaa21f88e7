"""Command line: inspect a concept file, or export its trigger embedding as a textual-inversion file."""
from __future__ import annotations

import argparse
from pathlib import Path

from .concept import ConceptError
from .concept_file import export_embedding, load_concept


def describe(path: Path) -> str:
    """A human-readable summary of the concept at ``path``: words, gate settings, layers, file size."""
    c = load_concept(path)
    widths = sorted({t.shape[0] for t in c.value_outputs.values()})
    lines = [
        f"file            {path} ({path.stat().st_size / 1024:.1f} KB)",
        f"trigger         {c.trigger}",
        f"superclass      {c.superclass}",
        f"text encoder    {c.text_encoder} (width {c.width}, clip layer {c.clip_layer}, "
        f"fingerprint {c.encoder_fingerprint or '-'})",
        f"model family    {c.model_family}",
        f"layers          {len(c.value_outputs)} cross-attention layers (widths {', '.join(map(str, widths))})",
        f"key pathway     {'trained K (no key lock)' if c.trained_keys else 'key-locked to the superclass'}",
        f"embedding       {c.embedding.shape[0]} vector(s) of {c.embedding.shape[1]}",
        f"training gate   beta {c.train_beta:g}, tau {c.train_tau:g}, "
        + (f"first-opening over {c.gate_window}-token windows" if c.gate_window else "on every token (Eq. 3)"),
        f"recommended     local lock: beta {c.beta_local:g}, tau {c.tau_local:g}; "
        f"global lock: beta {c.beta_global:g}, tau {c.tau_global:g}",
    ]
    lines += [f"info.{key:<10} {value}" for key, value in sorted(c.info.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perfusion_ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print a concept file's metadata, layer count and size")
    info.add_argument("file", type=Path)
    export = sub.add_parser("export-embedding", help="write the trigger embedding as a textual-inversion file")
    export.add_argument("file", type=Path)
    export.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            print(describe(args.file))
        else:
            out = export_embedding(load_concept(args.file), args.out)
            print(f"wrote {out} ({out.stat().st_size} bytes); use it in prompts as embedding:{out.stem}")
    except ConceptError as err:
        print(f"error: {err}")
        return 2
    return 0
