"""Proof that Perfusion learns: a small text-to-image world trained here, and the paper's key claims in it (issue #6).

1. The world (``bench/tinyworld/``): procedural 32×32 scenes with captions; a 1.2M-parameter v-prediction UNet with
   SD1.5's block structure and cross-attention, conditioned by the pretrained all-MiniLM-L6-v2 text encoder; a
   fine-tuned copy (outlined objects); a feature net trained on the renderer's labels. Trained once, cached.
2. Two personal concepts the world never saw (novel colour teal / pink with a texture), 5 renderings each, trained
   with the project's own Perfusion loop (``perfusion_ops.training``) through ``bench/tinyworld/host.py``:
   key-locked (the paper), trained-K (Fig. 9b ablation), and embedding-only (textual inversion).
3. Measured on fixed seeds: caption control of the world model; visual fidelity (a direct pixel statistic: the
   object-colour histogram intersection with the renderings; the feature-net cosine is reported beside it); text
   alignment (procedural checks of position, background, colour, size); the fidelity–alignment plane as β sweeps; two concepts in one prompt; transfer to the fine-tuned copy.

Run: .venv/bin/python bench/tinyworld.py --threads 2   (trains the world on first use, ~36 min on 2 cores; then ~5 min;
``--quick`` for a tiny smoke run)
Writes under --out: results.md (table), results.json, pareto.png, samples.png; last line is the summary.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
from bench.common import machine  # noqa: E402
from bench.tinyworld import render as R  # noqa: E402
from bench.tinyworld.host import TinyWorldHost, concept_images, drawer, train_concept, train_embedding_only  # noqa: E402
from bench.tinyworld.measure import SMALL_AREA, analyse, colour_fidelity, cosine_fidelity, template_shape, to_rgb255  # noqa: E402
from bench.tinyworld.text import TextEncoder  # noqa: E402
from bench.tinyworld.train_world import WorldSettings, build_world, load_world, world_path  # noqa: E402
from perfusion_ops.covariance import ridge_inverse  # noqa: E402
from perfusion_ops.edit import AppliedConcept  # noqa: E402
from perfusion_ops.training import TrainSettings  # noqa: E402

CONCEPTS = {  # trigger -> (the thing, its superclass word); both colours are absent from the world's data
    "sks": (R.Thing("square", "teal", "striped", "large", "center"), "square"),
    "zwx": (R.Thing("circle", "pink", "dotted", "large", "center"), "circle"),
}
FIDELITY_TEMPLATES = ("a photo of a {}", "A photograph of {}")
ALIGNMENT = [  # (prompt template, check name, expected value)
    ("a photo of a {} on the left", "position", "left"),
    ("a photo of a {} on the right", "position", "right"),
    ("a photo of a {} at the top", "position", "top"),
    ("a photo of a {} at the bottom", "position", "bottom"),
    ("a photo of a {} on a black background", "background", "black"),
    ("a photo of a {} on a white background", "background", "white"),
    ("a photo of a red {}", "colour", "red"),
    ("a photo of a yellow {}", "colour", "yellow"),
    ("a photo of a small {}", "size", "small"),
]


def passes(info: dict, check: str, expected: str) -> bool:
    if check == "size":
        return 8 <= info["area"] < SMALL_AREA
    return info.get(check) == expected


class Bench:
    def __init__(self, args):
        self.args = args
        self.log_lines: list[str] = []

    def log(self, msg: str) -> None:
        print(msg, flush=True)
        self.log_lines.append(msg)

    # -- measurements ---------------------------------------------------------------------------------------
    def control(self, host: TinyWorldHost, features) -> dict:
        """Caption control of the world model: fully specified single-object captions, and two-object ones."""
        rng = random.Random(1234)
        prompts, wants = [], []
        for _ in range(self.args.control):
            t = R.Thing(rng.choice(R.SHAPES), rng.choice(list(R.COLOURS)), rng.choice(R.TEXTURES),
                        rng.choice(list(R.SIZES)), rng.choice(list(R.POSITIONS)))
            bg = rng.choice(list(R.BACKGROUNDS))
            words = dict.fromkeys(("size", "colour", "texture", "position", "background"), True)
            prompts.append(R.caption(R.Scene((t,), bg), "a photo of a {}", words))
            wants.append((t, bg))
        images = host.sample(prompts, list(range(len(prompts))), steps=self.args.steps)
        infos, pred = analyse(images), features.predict(images)
        acc = {k: [] for k in ("colour", "shape", "position", "background", "size", "texture", "shape_featnet")}
        for k, ((t, bg), info) in enumerate(zip(wants, infos)):
            acc["colour"].append(info["colour"] == t.colour)
            acc["shape"].append(template_shape(info["mask"]) == t.shape)
            acc["shape_featnet"].append(pred["shape"][k] == t.shape)
            acc["position"].append(info["position"] == t.position)
            acc["background"].append(info["background"] == bg)
            acc["size"].append(pred["size"][k] == t.size)
            acc["texture"].append(pred["texture"][k] == t.texture)
        out = {k: float(np.mean(v)) for k, v in acc.items()}
        out["control"] = float(np.mean([out["colour"], out["shape"], out["position"]]))
        # two objects: each half's object has the colour named for its side
        pairs, prompts = [], []
        for _ in range(self.args.control // 3):
            a, b = rng.sample(list(R.COLOURS), 2)
            sa, sb = rng.choice(R.SHAPES), rng.choice(R.SHAPES)
            prompts.append(f"a photo of a {a} {sa} on the left and a {b} {sb} on the right")
            pairs.append((a, b))
        images = host.sample(prompts, list(range(100, 100 + len(prompts))), steps=self.args.steps)
        ok = []
        for img, (a, b) in zip(images, pairs):
            left, right = analyse(img[None, :, :, :16])[0], analyse(img[None, :, :, 16:])[0]
            ok.append(left["colour"] == a and right["colour"] == b)
        out["two_objects"] = float(np.mean(ok))
        out["samples"] = images[:8]
        return out

    def evaluate(self, host: TinyWorldHost, features, subject: str, references: torch.Tensor, applied=(),
                 embeddings=(), seed: int = 0) -> dict:
        """Fidelity on neutral prompts and alignment on attribute prompts around ``subject`` (fixed seeds)."""
        a = self.args
        fid_prompts = [t.format(subject) for t in FIDELITY_TEMPLATES for _ in range(a.fid_seeds)]
        fid_seeds = [seed + k for k in range(len(fid_prompts))]
        al = [(t.format(subject), c, e) for t, c, e in ALIGNMENT for _ in range(a.align_seeds)]
        al_seeds = [seed + 1000 + k for k in range(len(al))]
        images = host.sample(fid_prompts + [p for p, _, _ in al], fid_seeds + al_seeds, list(applied),
                             list(embeddings), steps=a.steps)
        fid_images, al_images = images[: len(fid_prompts)], images[len(fid_prompts):]
        with torch.no_grad():
            feature_fidelity = cosine_fidelity(features.features(fid_images), features.features(references))
        fidelity = torch.from_numpy(colour_fidelity(fid_images, references))
        by_check: dict[str, list[bool]] = {}
        for (_, check, expected), info in zip(al, analyse(al_images)):
            by_check.setdefault(check, []).append(passes(info, check, expected))
        alignment = float(np.mean([x for v in by_check.values() for x in v]))
        gates = {}
        if applied:  # how open the concept's gate is at its own trigger token, in each prompt set
            from perfusion_ops.edit import JointEdit
            stack = JointEdit(list(applied)).shared.stack
            for name, prompts in (("gate_fid", fid_prompts[:: a.fid_seeds]), ("gate_align", [t.format(subject) for t, _, _ in ALIGNMENT])):
                context, slots = host.context(prompts, [x.concept for x in applied])
                g = stack.split(context)[1]
                gates[name] = float(np.mean([float(g[b, slot[0], 0]) for b, slot in enumerate(slots[subject.lower()])]))
        outline = np.array(R.OUTLINE, np.float32)
        outlined = [float((np.linalg.norm(img - outline, axis=-1) < 45).sum() >= 6) for img in to_rgb255(images)]
        return {"fidelity": float(fidelity.mean()), "fidelity_sem": float(fidelity.std() / len(fidelity) ** 0.5),
                "fidelity_features": float(feature_fidelity.mean()),
                "alignment": alignment, **{f"align_{k}": float(np.mean(v)) for k, v in by_check.items()},
                **gates, "outlined": float(np.mean(outlined)),
                "samples": torch.cat([fid_images[:4], al_images[:: a.align_seeds][:8]])}

    def multi(self, host, concepts: dict, beta: float) -> dict:
        """Two concepts trained separately in one prompt: each in place, and each gate shut on the other's token."""
        s1, s2 = concepts["sks"], concepts["zwx"]
        applied = [AppliedConcept(s1, beta, 0.15), AppliedConcept(s2, beta, 0.15)]
        colour = {"sks": np.array(R.NOVEL_COLOURS["teal"], np.float32), "zwx": np.array(R.NOVEL_COLOURS["pink"], np.float32)}
        prompts, sides = [], []
        for left, right in (("sks", "zwx"), ("zwx", "sks")):
            for _ in range(self.args.multi_seeds):
                prompts.append(f"a photo of a {left} on the left and a {right} on the right")
                sides.append((left, right))
        images = host.sample(prompts, [500 + k for k in range(len(prompts))], applied, steps=self.args.steps)

        def nearest(info):  # which concept colour the half's object is closer to (None: no object)
            if info["colour"] is None:
                return None
            rgb = info["mean_rgb"]
            return min(colour, key=lambda t: float(np.linalg.norm(rgb - colour[t])))

        ok = []
        for img, (left, right) in zip(images, sides):
            l_info, r_info = analyse(img[None, :, :, :16])[0], analyse(img[None, :, :, 16:])[0]
            ok.append(nearest(l_info) == left and nearest(r_info) == right)
        # gates on the prompt's own encodings
        context, slots = host.context([prompts[0]], [s1, s2])
        from perfusion_ops.edit import JointEdit
        _, gates = JointEdit(applied).shared.stack.split(context[0])
        g = gates.numpy()
        i1, i2 = slots["sks"][0][0], slots["zwx"][0][0]
        others = [k for k in range(int((context[0].abs().amax(-1) > 0).sum())) if k not in (i1, i2)]
        return {"both_in_place": float(np.mean(ok)), "gate_s1_at_s1": float(g[i1, 0]), "gate_s2_at_s2": float(g[i2, 1]),
                "gate_s1_at_s2": float(g[i2, 0]), "gate_s2_at_s1": float(g[i1, 1]),
                "gate_max_other_tokens": float(g[others].max()), "samples": images[:8]}

    # -- the run --------------------------------------------------------------------------------------------
    def run(self) -> int:
        a = self.args
        start = time.time()
        cache, out = Path(a.cache), Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        settings = WorldSettings(captions=600, steps=40, finetune_steps=4, feature_steps=40) if a.quick else WorldSettings()
        path = world_path(cache, settings)
        world_built = False
        if not path.is_file():
            self.log(f"[tinyworld] no cached world at {path}: training it (once)")
            build_world(cache, settings, self.log)
            world_built = True
        world = load_world(path)
        self.log(f"[tinyworld] machine: {machine()}")
        self.log(f"[tinyworld] world {path.name}: trained in {world.timings.get('total_s', float('nan')) / 60:.1f} min "
                 f"(world model {world.timings.get('world_s', float('nan')) / 60:.1f} min)")
        text = TextEncoder.pretrained()
        host = TinyWorldHost(world.base, text)
        host.guidance = a.guidance
        inverse = ridge_inverse(world.covariance).float()
        features = world.features
        results: dict = {"machine": machine(), "world": world.timings, "world_settings": dict(settings.__dict__)}
        grids: list[tuple[str, torch.Tensor]] = []

        # the checker checked: the feature net's accuracy on fresh renderings (with noise) it never saw
        from bench.tinyworld.measure import feature_batch
        images, labels = feature_batch(random.Random(99), np.random.default_rng(99), 256)
        pred = features(images)
        results["feature_net_accuracy"] = {k: float((pred[k].argmax(1) == labels[k]).float().mean())
                                           for k in ("shape", "texture", "size", "background")}
        self.log("[tinyworld] feature net accuracy on fresh renderings: "
                 + " ".join(f"{k}={v:.2f}" for k, v in results["feature_net_accuracy"].items()))
        t = time.time()
        control = self.control(host, features)
        grids.append(("world: captions", control.pop("samples")))
        results["control"] = control
        self.log("[tinyworld] control: " + " ".join(f"{k}={v:.2f}" for k, v in control.items()) +
                 f" (chance: colour {1 / 6:.2f}, shape 0.25, position 0.20; {time.time() - t:.0f}s)")

        # concepts
        t = time.time()
        data, refs = {}, {}
        for trigger, (thing, _) in CONCEPTS.items():
            images, masks = concept_images(thing, "gray", a.shots, seed=7)
            data[trigger] = drawer(images, masks, trigger)
            refs[trigger] = images
            grids.append((f"{trigger} renderings", images))
        ts = TrainSettings(steps=a.concept_steps, batch_size=a.concept_batch, grad_accum=1, seed=a.seed,
                           ema_decay=a.ema_decay)
        trained = {}
        for name, trigger, trained_k in (("locked", "sks", False), ("trained-K", "sks", True), ("locked", "zwx", False)):
            c0 = time.time()
            concept, losses = train_concept(host, trigger, CONCEPTS[trigger][1], inverse, data[trigger],
                                            replace(ts, trained_k=trained_k))
            trained[(name, trigger)] = concept
            self.log(f"[tinyworld] trained {trigger} ({name}): loss {np.mean(losses[:10]):.4f} → "
                     f"{np.mean(losses[-10:]):.4f} in {time.time() - c0:.0f}s")
        c0 = time.time()
        ti, losses = train_embedding_only(host, "sks", "square", data["sks"], a.concept_steps, a.concept_batch,
                                          a.ti_lr, a.seed)
        self.log(f"[tinyworld] trained sks (embedding only): loss {np.mean(losses[:10]):.4f} → "
                 f"{np.mean(losses[-10:]):.4f} in {time.time() - c0:.0f}s")
        results["concept_training_s"] = time.time() - t
        locked, trained_k = trained[("locked", "sks")], trained[("trained-K", "sks")]
        with torch.no_grad():
            ctx, slots = host.context(["a photo of a sks"], [locked])
            e = ctx[0, slots["sks"][0][0]]
            s_self = float((e @ locked.target_key) / (locked.target_input @ locked.target_key))
        self.log(f"[tinyworld] similarity s of 'sks' in 'a photo of a sks' to i: {s_self:.3f}")

        # the plane
        t = time.time()
        rows = []

        def record(method, beta, r, model="base"):
            label = f"{method[:14]} b={beta}" if beta is not None else method
            grids.append((label + (" FT" if model != "base" else ""), r.pop("samples")))
            rows.append({"method": method, "beta": beta, "model": model, **r})
            self.log(f"[tinyworld] {model:9s} {method:22s} β={beta if beta is not None else '-'}: fidelity "
                     f"{r['fidelity']:.3f} alignment {r['alignment']:.3f} "
                     + " ".join(f"{k[6:]}={v:.2f}" for k, v in r.items() if k.startswith("align_")))

        record("superclass only", None, self.evaluate(host, features, "square", refs["sks"]))
        record("described: large striped square", None, self.evaluate(host, features, "large striped square", refs["sks"]))
        record("embedding only (TI)", None, self.evaluate(host, features, "sks", refs["sks"], embeddings=[ti]))
        for beta in a.betas:
            record("Perfusion key-locked", beta, self.evaluate(host, features, "sks", refs["sks"],
                                                               [AppliedConcept(locked, beta, a.tau, "local")]))
            record("Perfusion trained-K", beta, self.evaluate(host, features, "sks", refs["sks"],
                                                              [AppliedConcept(trained_k, beta, a.tau, "trained-k")]))
        self.log(f"[tinyworld] plane measured in {time.time() - t:.0f}s")

        # multi-concept
        t = time.time()
        multi = self.multi(host, {"sks": locked, "zwx": trained[("locked", "zwx")]}, a.beta)
        grids.append(("sks + zwx", multi.pop("samples")))
        base_pairs = self.multi_baseline(host)
        multi["superclass_both_in_place"] = base_pairs
        results["multi"] = multi
        self.log("[tinyworld] multi-concept: " + " ".join(f"{k}={v:.3f}" for k, v in multi.items()) +
                 f" ({time.time() - t:.0f}s)")

        # transfer to the fine-tuned copy
        t = time.time()
        tuned = TinyWorldHost(world.finetuned, text)
        tuned.guidance = a.guidance
        record("superclass only", None, self.evaluate(tuned, features, "square", refs["sks"]), "finetuned")
        record("Perfusion key-locked", a.beta, self.evaluate(tuned, features, "sks", refs["sks"],
                                                             [AppliedConcept(locked, a.beta, a.tau, "local")]), "finetuned")
        self.log(f"[tinyworld] transfer measured in {time.time() - t:.0f}s")
        results["rows"] = rows

        # summary
        pick = lambda m, b, model="base": next(r for r in rows if r["method"] == m and r["beta"] == b and r["model"] == model)
        head = pick("Perfusion key-locked", a.beta)
        base = pick("superclass only", None)
        sweep = lambda m: [r for r in rows if r["method"] == m and r["model"] == "base"]
        at_head, matched = lock_gain_at(head, sweep("Perfusion trained-K"))
        lock_gain, reach = front_gain(sweep("Perfusion key-locked"), sweep("Perfusion trained-K"))
        results["summary"] = {"control": control["control"], "fidelity": head["fidelity"],
                              "baseline_fidelity": base["fidelity"], "alignment": head["alignment"],
                              "lock_gain": lock_gain, "front_fidelity_reach": reach,
                              "lock_gain_at_headline_beta": at_head, "headline_matched": matched, "s_self": s_self}
        results["timings"] = {"total_s": time.time() - start, "cpu_s": time.process_time(), "world_built_here": world_built}
        self.write(out, results, grids)
        self.log(f"[tinyworld] total {time.time() - start:.0f}s wall, {time.process_time():.0f}s CPU "
                 f"(world training {'included' if world_built else 'cached'})")
        print(f"tinyworld control={control['control']:.3f} fidelity={head['fidelity']:.3f} "
              f"baseline_fidelity={base['fidelity']:.3f} alignment={head['alignment']:.3f} lock_gain={lock_gain:+.3f}")
        return 0

    def multi_baseline(self, host) -> float:
        """Superclass words in the two-object prompt: how often the halves are coloured teal/pink by chance."""
        prompts = ["a photo of a square on the left and a circle on the right"] * self.args.multi_seeds
        images = host.sample(prompts, [500 + k for k in range(len(prompts))], steps=self.args.steps)
        teal, pink = (np.array(R.NOVEL_COLOURS[c], np.float32) for c in ("teal", "pink"))
        ok = []
        for img in images:
            l, r = analyse(img[None, :, :, :16])[0], analyse(img[None, :, :, 16:])[0]
            near = lambda i: None if i["colour"] is None else (
                "t" if np.linalg.norm(i["mean_rgb"] - teal) < np.linalg.norm(i["mean_rgb"] - pink) else "p")
            ok.append(near(l) == "t" and near(r) == "p")
        return float(np.mean(ok))

    # -- output -----------------------------------------------------------------------------------------------
    def write(self, out: Path, results: dict, grids) -> None:
        a = self.args
        rows = results["rows"]
        checks = [k for k in rows[0] if k.startswith("align_")]
        extra = ("fidelity_features", "gate_fid", "gate_align", "outlined")
        lines = ["# TinyWorld: Perfusion measured in a small text-to-image world", "",
                 f"Machine: {results['machine']}", "",
                 "Feature net (shape/texture/size checker) accuracy on fresh renderings: "
                 + ", ".join(f"{k} {v:.2f}" for k, v in results["feature_net_accuracy"].items()), "",
                 "## World model caption control (procedural checks; chance: colour 0.17, shape 0.25, position 0.20, "
                 "background 0.33, size 0.50, texture 0.33)", "",
                 "(shape: procedural, best IoU of the object mask with ideal shapes of its area, 0.94 on clean "
                 "renderings; shape_featnet: the feature net's shape head, unreliable where its accuracy above is low; "
                 "size and texture: the feature net; control = mean of colour, shape, position)", "",
                 "| " + " | ".join(k for k in results["control"]) + " |",
                 "|" + "---|" * len(results["control"]),
                 "| " + " | ".join(f"{v:.3f}" for v in results["control"].values()) + " |", "",
                 "## Concept sks (teal striped square, superclass 'square'): fidelity vs text alignment", "",
                 "Fidelity: object-colour histogram intersection with the renderings (pixels binned to the nearest "
                 "object colour or its dark stripe/dot shade; background pixels dropped; 1 = same colour make-up). "
                 "fid_feat: cosine similarity of feature-net vectors (background and size dominate it).", "",
                 "| model | method | β | fidelity (±sem) | alignment | " + " | ".join(c[6:] for c in checks) + " | "
                 + " | ".join(e.replace("fidelity_features", "fid_feat") for e in extra) + " |", "|---|---|---|---|---|" + "---|" * (len(checks) + len(extra))]
        for r in rows:
            lines.append(f"| {r['model']} | {r['method']} | {r['beta'] if r['beta'] is not None else '-'} | "
                         f"{r['fidelity']:.3f} ± {r['fidelity_sem']:.3f} | {r['alignment']:.3f} | "
                         + " | ".join(f"{r.get(c, float('nan')):.2f}" for c in (*checks, *extra)) + " |")
        m = results["multi"]
        lines += ["", "## Two concepts trained separately, one prompt ('a photo of a sks on the left and a zwx on the right', "
                  "and swapped)", "", "| " + " | ".join(m) + " |", "|" + "---|" * len(m),
                  "| " + " | ".join(f"{v:.3f}" for v in m.values()) + " |", "", "## Summary", "",
                  "lock_gain: mean alignment difference of the Pareto fronts (best alignment at fidelity ≥ f) of the "
                  "key-locked and trained-K β sweeps, over the fidelities both reach; front_fidelity_reach: the "
                  "highest fidelity each sweep reaches; lock_gain_at_headline_beta: the locked point at --beta "
                  "against the trained-K sweep interpolated to its fidelity.", "",
                  "```", json.dumps(results["summary"], indent=1), "```", "",
                  f"Settings: {json.dumps(vars(a))}", ""]
        (out / "results.md").write_text("\n".join(lines))
        (out / "results.json").write_text(json.dumps({k: v for k, v in results.items()}, indent=1, default=str))
        (out / "log.txt").write_text("\n".join(self.log_lines))
        pareto_png(rows, out / "pareto.png")
        samples_png(grids, out / "samples.png")
        print("\n".join(lines))


def front(rows: list[dict], f: float) -> float:
    """The Pareto front of a β sweep: the best alignment among its points with fidelity ≥ f."""
    return max((r["alignment"] for r in rows if r["fidelity"] >= f), default=float("nan"))


def front_gain(locked: list[dict], trained_k: list[dict], grid: int = 200) -> tuple[float, dict]:
    """lock_gain: the mean of front(locked) − front(trained-K) over the fidelities both fronts reach (Fig. 9b compares
    the curves, not one β; a sweep need not be monotone in fidelity). Also each front's highest fidelity."""
    top = {"locked": max(r["fidelity"] for r in locked), "trained-K": max(r["fidelity"] for r in trained_k)}
    lo, hi = min(r["fidelity"] for r in locked + trained_k), min(top.values())
    fs = np.linspace(lo, hi, grid)
    return float(np.mean([front(locked, f) - front(trained_k, f) for f in fs])), top


def lock_gain_at(head: dict, trained_k: list[dict]) -> tuple[float, str]:
    """alignment(locked) − alignment(trained-K) at the locked point's fidelity: trained-K's alignment linearly
    interpolated along its β sweep (sorted by fidelity); outside its fidelity range, its nearest point."""
    pts = sorted((r["fidelity"], r["alignment"], r["beta"]) for r in trained_k)
    f = head["fidelity"]
    for (f0, a0, b0), (f1, a1, b1) in zip(pts, pts[1:]):
        if f0 <= f <= f1 and f1 > f0:
            w = (f - f0) / (f1 - f0)
            return head["alignment"] - (a0 + w * (a1 - a0)), f"interpolated between trained-K β={b0} and β={b1}"
    near = min(pts, key=lambda p: abs(p[0] - f))
    return head["alignment"] - near[1], f"nearest trained-K point β={near[2]} (fidelity {near[0]:.3f} vs {f:.3f})"


def pareto_png(rows: list[dict], path: Path) -> None:
    from PIL import Image, ImageDraw
    w, h, m = 720, 520, 70
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    fs = [r["fidelity"] for r in rows]
    al = [r["alignment"] for r in rows]
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
    d.text((8, 20), "text alignment (fraction of procedural checks passed)", fill="black")
    styles = {("Perfusion key-locked", "base"): "blue", ("Perfusion trained-K", "base"): "red",
              ("embedding only (TI)", "base"): "green", ("superclass only", "base"): "gray",
              ("described: large striped square", "base"): "black",
              ("Perfusion key-locked", "finetuned"): "cyan", ("superclass only", "finetuned"): "orange"}
    legend_y = m + 8
    for (method, model), colour in styles.items():
        pts = sorted((r["fidelity"], r["alignment"], r["beta"]) for r in rows if r["method"] == method and r["model"] == model)
        if not pts:
            continue
        if len(pts) > 1:
            d.line([(X(f), Y(a)) for f, a, _ in pts], fill=colour, width=2)
        for f, a, b in pts:
            d.ellipse([X(f) - 5, Y(a) - 5, X(f) + 5, Y(a) + 5], fill=colour)
            if b is not None:
                d.text((X(f) + 7, Y(a) - 12), f"b={b}", fill=colour)
        d.rectangle([w - m - 200, legend_y, w - m - 190, legend_y + 10], fill=colour)
        d.text((w - m - 185, legend_y - 2), f"{method} ({model})", fill="black")
        legend_y += 16
    img.save(path)


def samples_png(grids, path: Path, scale: int = 2) -> None:
    from PIL import Image, ImageDraw
    cols = max(len(g) for _, g in grids)
    cell = 32 * scale + 4
    img = Image.new("RGB", (150 + cols * cell, len(grids) * cell), "white")
    d = ImageDraw.Draw(img)
    for row, (label, images) in enumerate(grids):
        d.text((4, row * cell + cell // 2 - 6), label[:26], fill="black")
        arr = ((images.clamp(-1, 1) + 1) * 127.5).byte().permute(0, 2, 3, 1).numpy()
        for col, a in enumerate(arr):
            tile = Image.fromarray(a).resize((32 * scale, 32 * scale), Image.NEAREST)
            img.paste(tile, (150 + col * cell, row * cell + 2))
    img.save(path)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", default=str(ROOT / ".cache" / "tinyworld"))
    p.add_argument("--out", default=str(ROOT / ".cache" / "tinyworld" / "out"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="tiny world and evaluation (pipeline smoke run, numbers meaningless)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=12, help="sampler steps (ancestral DDIM)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--control", type=int, default=48)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--concept-steps", type=int, default=300)
    p.add_argument("--concept-batch", type=int, default=8)
    p.add_argument("--ti-lr", type=float, default=0.02)
    p.add_argument("--fid-seeds", type=int, default=8)
    p.add_argument("--align-seeds", type=int, default=12)
    p.add_argument("--multi-seeds", type=int, default=6)
    p.add_argument("--ema-decay", type=float, default=0.99,
                   help="EMA of the target input i (paper: 0.99 over 400 steps; over much shorter runs it leaves i "
                        "between e_sup and the concept's encoding and the gate saturates for every β)")
    p.add_argument("--betas", type=float, nargs="+", default=[0.55, 0.7, 0.85, 1.0])
    p.add_argument("--beta", type=float, default=0.7, help="β of the headline numbers, multi-concept and transfer")
    p.add_argument("--tau", type=float, default=0.15)
    args = p.parse_args(argv)
    if args.quick:
        args.control, args.concept_steps, args.fid_seeds, args.align_seeds, args.multi_seeds = 6, 2, 1, 1, 1
        args.betas, args.steps = [0.7], 3
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
