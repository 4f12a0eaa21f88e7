"""The tiny world's outputs: results.md (tables), results.json, pareto.png (Fig. 9b's plane) and samples.png."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CHANCE = {"colour": 1 / 6, "shape": 1 / 4, "position": 1 / 5, "background": 1 / 3, "size": 1 / 2, "texture": 1 / 3,
          **{f"two objects {layout}{order}": 1 / 30 for layout in ("left/right", "top/bottom")
             for order in ("", ", object first")}}


def pm(value, se=None, digits=3) -> str:
    if isinstance(value, (tuple, list)):
        value, se = value
    return f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None and np.isfinite(se) else "")


def spread(values) -> str:
    return f"{' / '.join(f'{v:.3f}' for v in values)} (spread {max(values) - min(values):.3f})"


def tables(results: dict) -> list[str]:
    s = results["summary"]
    lines = ["# TinyWorld v2: Perfusion's claims in a CLIP-conditioned small world", "",
             f"Machine: {results['machine']}; torch threads {results['threads']}; deterministic algorithms on. "
             f"World ({results['world_settings']['encoder']}, seed {results['world_settings']['seed']}) trained in "
             f"{results['world'].get('total_s', float('nan')) / 60:.1f} min; this run "
             f"{results['timings']['total_s'] / 60:.1f} min wall "
             f"(world {'trained here' if results['timings']['world_built_here'] else 'cached'}).", ""]
    if "clip_zero_shot" in results:
        z = results["clip_zero_shot"]
        lines += ["## The tiny CLIP: zero-shot accuracy on fresh renderings (chance in brackets)", "",
                  "| " + " | ".join(z) + " |", "|" + "---|" * len(z),
                  "| " + " | ".join(f"{v:.2f} ({CHANCE[k]:.2f})" for k, v in z.items()) + " |", ""]
    c = results["control"]
    lines += ["## World model caption control (procedural checks, fixed seeds; ± standard error; chance)", "",
              "| attribute | control | chance |", "|---|---|---|"]
    lines += [f"| {k} | {pm(v)} | {CHANCE.get(k, float('nan')):.2f} |" for k, v in c.items() if k != "control"]
    lines += ["", f"control (mean of colour, shape, position) = {c['control'][0]:.3f}", ""]
    runs = len(results["runs"])
    lines += [f"## Fidelity and alignment, pooled over {runs} runs (± standard error over images)", "",
              "Fidelity: object-colour histogram intersection with the run's renderings of sks. Alignment: the "
              "fraction of its prompt's two checks an image passes (8 prompts). Outline: the fine-tuned style's "
              "score.", "",
              "| model | method | β | fidelity | alignment | images | per-run alignment | checks | outline |",
              "|---|---|---|---|---|---|---|---|---|"]
    per_run = {(p["model"], p["method"], p["beta"]): p for p in results["points_per_run"]}
    for p in results["points"]:
        pr = per_run[(p["model"], p["method"], p["beta"])]
        lines.append(f"| {p['model']} | {p['method']} | {p['beta'] if p['beta'] is not None else '-'} | "
                     f"{pm(p['fidelity'], p['fidelity_se'])} | {pm(p['alignment'], p['alignment_se'])} | "
                     f"{p['images']} | "
                     f"{spread(pr['alignment'])} | " + " ".join(f"{k} {v:.2f}" for k, v in p["checks"].items())
                     + f" | {pm(p['outline'])} |")
    lines += ["", f"Largest alignment standard error: {s['max_alignment_se']:.3f}.", "",
              "## Key lock vs trained-K (Fig. 9b)", "",
              "lock_gain: mean over the fidelities both β fronts reach of front(locked) − front(trained-K), "
              "front(f) = best alignment at fidelity ≥ f. Its standard error is the larger of a bootstrap over "
              "images (sampling noise only) and the runs' spread / √runs (each run trains its own concepts).", "",
              f"- pooled lock_gain = {s['lock_gain']:+.3f} ± {s['lock_gain_se']:.3f} (images: "
              f"{s['lock_gain_se_images']:.3f}, runs: {s['lock_gain_se_runs']:.3f})",
              f"- per run: {' / '.join(f'{g:+.3f}' for g in s['lock_gain_runs'])}",
              "- highest fidelity on each front: "
              + ", ".join(f"{k} {v:.3f}" for k, v in s["front_fidelity_reach"].items()),
              f"- verdict: **{s['lock_verdict']}**", ""]
    au = s["automatic_beta"]
    lines += ["## Automatic β (the gate Train Concept recommends)", "",
              "Chosen per run from where s separates the trigger (32 held-out world captions) from every other token "
              "(256 world captions, and the held-out prompts with the superclass word); H: harmonic mean of fidelity "
              "and alignment (the paper's 'Best H').", "",
              f"- chosen β (local lock) per run: {' / '.join(f'{b:.3f}' for b in au['beta_runs'])}; τ "
              f"{' / '.join(f'{t:.3f}' for t in au['tau_runs'])}; measured (not the paper's fallback): "
              f"{' / '.join(str(c) for c in au['chosen_runs'])}",
              f"- H automatic {au['H']:.3f}; H at the fixed β {results['settings']['beta']} {au['H_fixed_beta']:.3f}; "
              f"best H of the β sweep {au['best_H_of_sweep']:.3f} (β {au['best_H_beta']})", ""]
    for r, run in enumerate(results["runs"]):
        lines += [f"- run {r}, {t}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in g.items()) for t, g in run["gates"].items()]
    lines += ["",
              "## Two concepts trained separately, in one prompt (β = headline, τ 0.15)", "",
              "In place: each half's object matches its own concept's colour make-up (histogram intersection > 0.3 "
              "and above the other concept's); 'named': a concept beside an ordinary object whose colour is named. "
              "Prompts say each position before its object (\"on the left a photo of a sks and on the right a zwx\"); "
              "'object first' says it after (\"a photo of a sks on the left and a zwx on the right\").",
              "",
              "| trainer | key lock | both in place (all) | left/right | top/bottom | object first "
              "| concept + named object | per-run (all) |",
              "|---|---|---|---|---|---|---|---|"]
    for m in results["multi"]:
        lines.append(f"| {m['trainer']} | {m['lock']} | {pm(m['two'])} | {pm(m['two left/right'])} | "
                     f"{pm(m['two top/bottom'])} | {pm(m['two, object first'])} | {pm(m['named'])} | "
                     f"{spread(m['per_run'])} |")
    lines += ["", "Superclass words in the same prompts, halves matching the concepts by chance: "
              + " / ".join(f"{run['multi_superclass']:.3f}" for run in results["runs"]), "",
              "Gates in the composed prompts (β headline, τ 0.15) per run: own trigger (min), other's trigger (max), "
              "other tokens (max); and the share of each trigger's cross-attention from its own half (0.5 = not "
              "localised):", ""]
    for r, run in enumerate(results["runs"]):
        for label, c in run["compositions"].items():
            lines.append(f"- run {r}, {label}: gates {c['own_gate_min']:.3f}, {c['cross_gate']:.3f}, "
                         f"{c['other_tokens_gate_max']:.3f}; attention "
                         + ", ".join(f"{k} {v:.2f}" for k, v in c["attention"].items()))
        lines.append(f"- run {r}, superclass words' attention: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in run["superclass_attention"].items()))
    lines.append("")
    for label, c in results["runs"][0]["compositions"].items():
        table = c["gate_tables"][0]
        lines += [f"Per token, run 0, {label}, '{table['prompt']}':", "",
                  "| token | " + " | ".join(table["tokens"]) + " |", "|---|" + "---|" * len(table["tokens"])]
        for j, t in enumerate(("sks", "zwx")):
            lines += [f"| s {t} | " + " | ".join(f"{row[j]:.2f}" for row in table["s"]) + " |",
                      f"| g {t} | " + " | ".join(f"{row[j]:.2f}" for row in table["g"]) + " |"]
        lines.append("")
    lines += [
              "## Where each concept's gate opens (per run)", "",
              "s_train: s at the trigger in the 9 training templates; s_at_superclass: s of the bare superclass "
              "word's encoding e_sup; i_moved: ‖i − e_sup‖ / ‖e_sup‖ in the C⁻¹ metric; embedding_moved: relative "
              "change of the trigger's input embedding.", ""]
    names = list(next(iter(results["runs"][0]["diagnosis"].values())))
    lines += ["| run | concept | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r, run in enumerate(results["runs"]):
        lines += [f"| {r} | {k} | " + " | ".join(f"{v[n]:.3f}" for n in names) + " |"
                  for k, v in run["diagnosis"].items()]
    lines += ["", f"Fine-tuned copy: mean relative change of the cross-attention K/V weights "
              f"{results['finetune_weight_change']:.3f}.", "", "## Summary", "", "```",
              json.dumps(s, indent=1), "```", "", f"Settings: {json.dumps(results['settings'])}", ""]
    return lines


def write(out: Path, results: dict, grids, log_lines: list[str]) -> None:
    lines = tables(results)
    (out / "results.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(results, indent=1,
                                                 default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    (out / "log.txt").write_text("\n".join(log_lines))
    pareto_png(results["points"], results["points_per_run"], out / "pareto.png")
    samples_png(grids, out / "samples.png")
    print("\n".join(lines))


STYLES = {("key-locked", "base"): "blue", ("trained-K", "base"): "red", ("embedding only (TI)", "base"): "green",
          ("superclass only", "base"): "gray", ("key-locked 1-shot", "base"): "purple",
          ("key-locked, first-opening", "base"): "magenta",
          ("trained-K, first-opening", "base"): "pink", ("key-locked, trigger's slot only", "base"): "olive",
          ("key-locked, automatic β", "base"): "brown",
          ("key-locked", "finetuned"): "cyan", ("trained-K", "finetuned"): "orange",
          ("superclass only", "finetuned"): "black"}


def pareto_png(points: list[dict], per_run: list[dict], path: Path) -> None:
    """Fidelity against alignment: pooled points with ±1 SE bars, each run's β sweeps as thin lines."""
    from PIL import Image, ImageDraw
    w, h, m = 760, 540, 70
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    fs = [p["fidelity"] for p in points] + [f for p in per_run for f in p["fidelity"]]
    al = [p["alignment"] for p in points] + [a for p in per_run for a in p["alignment"]]
    fx0, fx1 = min(fs) - 0.02, max(fs) + 0.02
    ay0, ay1 = max(0.0, min(al) - 0.05), min(1.0, max(al) + 0.05)
    X = lambda f: m + (f - fx0) / (fx1 - fx0) * (w - 2 * m)
    Y = lambda a: h - m - (a - ay0) / (ay1 - ay0) * (h - 2 * m)
    d.rectangle([m, m, w - m, h - m], outline="black")
    for k in range(6):
        f, a = fx0 + k * (fx1 - fx0) / 5, ay0 + k * (ay1 - ay0) / 5
        d.text((X(f) - 12, h - m + 6), f"{f:.2f}", fill="black")
        d.text((m - 40, Y(a) - 6), f"{a:.2f}", fill="black")
    d.text((w / 2 - 120, h - 30), "visual fidelity (object-colour histogram intersection)", fill="black")
    d.text((8, 20), "text alignment (fraction of procedural checks passed); thin lines: single runs", fill="black")
    legend_y = h - m - 8 - 16 * len(STYLES)  # lower left: the fronts run along the top right
    for (method, model), colour in STYLES.items():
        mine = sorted((p for p in points if p["method"] == method and p["model"] == model),
                      key=lambda p: p["fidelity"])
        if not mine:
            continue
        runs = [p for p in per_run if p["method"] == method and p["model"] == model]
        for r in range(len(runs[0]["fidelity"])):
            line = sorted((p["fidelity"][r], p["alignment"][r]) for p in runs)
            if len(line) > 1:
                d.line([(X(f), Y(a)) for f, a in line], fill=colour, width=1)
        if len(mine) > 1:
            d.line([(X(p["fidelity"]), Y(p["alignment"])) for p in mine], fill=colour, width=3)
        for p in mine:
            x, y = X(p["fidelity"]), Y(p["alignment"])
            d.line([(x, Y(p["alignment"] - p["alignment_se"])), (x, Y(p["alignment"] + p["alignment_se"]))],
                   fill=colour, width=2)
            d.line([(X(p["fidelity"] - p["fidelity_se"]), y), (X(p["fidelity"] + p["fidelity_se"]), y)],
                   fill=colour, width=2)
            d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour)
            if p["beta"] is not None:
                d.text((x + 7, y - 12), f"b={p['beta']}", fill=colour)
        d.rectangle([m + 10, legend_y, m + 20, legend_y + 10], fill=colour)
        label = f"{method} ({model})".replace("β", "beta")  # PIL's default font has no β
        d.text((m + 25, legend_y - 2), label, fill="black")
        legend_y += 16
    img.save(path)


def samples_png(grids, path: Path, scale: int = 2) -> None:
    from PIL import Image, ImageDraw
    cols = max(len(g) for _, g in grids)
    cell = 32 * scale + 4
    img = Image.new("RGB", (170 + cols * cell, len(grids) * cell), "white")
    d = ImageDraw.Draw(img)
    for row, (label, images) in enumerate(grids):
        d.text((4, row * cell + cell // 2 - 6), label[:28], fill="black")
        arr = ((images.clamp(-1, 1) + 1) * 127.5).byte().permute(0, 2, 3, 1).numpy()
        for col, a in enumerate(arr):
            tile = Image.fromarray(a).resize((32 * scale, 32 * scale), Image.NEAREST)
            img.paste(tile, (170 + col * cell, row * cell + 2))
    img.save(path)

