"""Proof that Perfusion learns, v2: a CLIP-like tiny world; the paper's claims, measured with enough seeds to decide.

1. The world (``bench/tinyworld/``): procedural 32×32 scenes with captions; a tiny CLIP (causal text tower, image
   CNN) trained contrastively on them and frozen; a 0.97M-parameter v-prediction UNet with SD1.5's block structure
   conditioned on the CLIP's last hidden states, taught (``--localise``) that an object's words are attended on its
   own pixels; shapes have typical colours (``--typical``: a shape word carries an appearance when the caption names
   no colour, as SD's nouns do); a fine-tuned copy in another style (outlined objects); a feature net. Trained
   once, cached.
   ``--encoder minilm`` builds the earlier world on the pretrained all-MiniLM-L6-v2.
2. Two personal concepts the world never saw (novel colours teal / pink with a texture), trained with the project's
   own Perfusion loop (``perfusion_ops.training``) through ``bench/tinyworld/host.py``: key-locked (the paper),
   trained-K (Fig. 9b), embedding-only (textual inversion), and key-locked from one rendering (Fig. 8).
3. ``--runs`` independent runs (own concept renderings, training seed and sampling seeds), each measured on fixed
   seeds: fidelity (object-colour histogram intersection with the renderings) and text alignment (procedural checks
   of position, background, colour, size; two per prompt) per β; two concepts in one prompt (left/right, top/bottom)
   with every gate at every token, also with joint gates (each gate read from the concepts' joint coordinates,
   ``perfusion_ops.stack.ConceptStack``); transfer to the fine-tuned copy. Figures pool the runs' images and carry
   standard errors; lock_gain has a bootstrap standard error and a verdict that must hold in every run.

Run: .venv/bin/python -m bench.tinyworld --threads 2   (trains the world on first use; ``--quick``: smoke run;
``--no-first-opening``: without the concepts trained and applied with first-opening gates; ``--slot-context``: also
with each trigger confined to its own token, ``variants.py``). On an idle 2-core machine two threads train the world
1.6× faster than one; on one shared with other jobs, use one (two threads wait on each other). Results are
bit-identical for a given thread count on a given CPU; the thread count is part of the world's key, the CPU is not
(the same key built on another CPU gives other weights, and other figures).
Writes under --out: results.md (tables), results.json, pareto.png, samples.png, log.txt; last line is the summary.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.common import machine
from perfusion_ops.covariance import ridge_inverse
from perfusion_ops.edit import AppliedConcept, JointEdit
from perfusion_ops.gate_choice import choose_gate
from perfusion_ops.stack import similarity
from perfusion_ops.training import TEMPLATES, TrainSettings

from . import render as R
from . import report
from .host import TinyWorldHost, concept_images, drawer, train_concept, train_embedding_only
from .measure import SMALL_AREA, analyse, colour_fidelity, outline_score, template_shape
from .stats import bootstrap_gain, front_gain, mean_se, summarise, verdict
from .train_world import WorldSettings, build_world, load_world, world_path
from .variants import SlotContextHost

ROOT = Path(__file__).resolve().parents[2]

CONCEPTS = {  # trigger -> (the thing, its superclass word); both colours are absent from the world's data
    "sks": (R.Thing("square", "teal", "striped", "large", "center"), "square"),
    "zwx": (R.Thing("circle", "pink", "dotted", "large", "center"), "circle"),
}
FIDELITY_TEMPLATES = ("a photo of a {}", "A photograph of {}")
ALIGNMENT = [  # (prompt template, checks); an image scores the fraction of its prompt's checks it passes
    ("a photo of a {} on the left on a black background", {"position": "left", "background": "black"}),
    ("a photo of a {} on the right on a white background", {"position": "right", "background": "white"}),
    ("a photo of a small {} at the top", {"size": "small", "position": "top"}),
    ("a photo of a small {} at the bottom", {"size": "small", "position": "bottom"}),
    ("a photo of a red {} on the right", {"colour": "red", "position": "right"}),
    ("a photo of a yellow {} at the bottom", {"colour": "yellow", "position": "bottom"}),
    ("a photo of a {} at the top on a black background", {"position": "top", "background": "black"}),
    ("a photo of a small {} on a white background", {"size": "small", "background": "white"}),
]
LAYOUTS = {"left/right": (("on the left", "on the right"), ("left", "right")),
           "top/bottom": (("at the top", "at the bottom"), ("top", "bottom"))}
ORDERS = {"": True, ", object first": False}  # position phrase before each object (the headline), or after it


def pair_prompt(first: str, second: str, layout: str, position_first: bool = True) -> str:
    """Two objects in one prompt in the world's grammar (``render.caption``): "on the left a photo of a sks and on
    the right a zwx", or "a photo of a sks on the left and a zwx on the right"."""
    where = LAYOUTS[layout][0]
    if position_first:
        return f"{where[0]} a photo of a {first} and {where[1]} a {second}"
    return f"a photo of a {first} {where[0]} and a {second} {where[1]}"
NAMED = ("yellow triangle", "blue diamond")  # ordinary objects beside a concept, their colour named


AUTOMATIC = "key-locked, automatic β"  # the gate Train Concept recommends (issue 12)
WINDOW = 32  # the tiny CLIP's context: every prompt is one window of the first-opening gate
FIRST, FIRST_K = "key-locked, first-opening", "trained-K, first-opening"  # concepts with first-opening gates
SLOT = "key-locked, trigger's slot only"  # variants.SlotContextHost
JOINT = ", joint gates"  # the same concepts composed with joint gates (perfusion_ops.stack.ConceptStack)


def trigger_prompts(trigger: str, count: int, seed: int) -> list[str]:
    """World captions with ``trigger`` in place of the first object's shape word: prompts with text after it."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        words = R.random_spec(rng)[1].split()
        words[next(k for k, w in enumerate(words) if w in R.SHAPES)] = trigger
        prompts.append(" ".join(words))
    return prompts


def passes(info: dict, check: str, expected: str) -> bool:
    if check == "size":
        return 8 <= info["area"] < SMALL_AREA
    return info.get(check) == expected


def half(images: torch.Tensor, side: str) -> torch.Tensor:
    """The half of each image where ``side`` ('left', 'right', 'top', 'bottom') lies."""
    return {"left": images[..., :16], "right": images[..., 16:], "top": images[..., :16, :],
            "bottom": images[..., 16:, :]}[side]


class Bench:
    def __init__(self, args):
        self.args = args
        self.log_lines: list[str] = []

    def log(self, msg: str) -> None:
        print(msg, flush=True)
        self.log_lines.append(msg)

    # -- the world ------------------------------------------------------------------------------------------
    def control(self, host: TinyWorldHost, features) -> dict:
        """Caption control of the world model: fully specified one-object captions, and two-object captions (each
        object the colour named for its place), on fixed seeds; every figure with its standard error."""
        rng = np.random.default_rng(1234)
        pick = lambda seq: seq[int(rng.integers(len(seq)))]
        prompts, wants = [], []
        for _ in range(self.args.control):
            t = R.Thing(pick(R.SHAPES), pick(list(R.COLOURS)), pick(R.TEXTURES), pick(list(R.SIZES)),
                        pick(list(R.POSITIONS)))
            bg = pick(list(R.BACKGROUNDS))
            words = dict.fromkeys(("size", "colour", "texture", "position", "background"), True)
            prompts.append(R.caption(R.Scene((t,), bg), "a photo of a {}", words))
            wants.append((t, bg))
        images = host.sample(prompts, list(range(len(prompts))), steps=self.args.steps)
        infos, pred = analyse(images), features.predict(images)
        acc = {k: [] for k in ("colour", "shape", "position", "background", "size", "texture")}
        for k, ((t, bg), info) in enumerate(zip(wants, infos)):
            acc["colour"].append(info["colour"] == t.colour)
            acc["shape"].append(template_shape(info["mask"]) == t.shape)
            acc["position"].append(info["position"] == t.position)
            acc["background"].append(info["background"] == bg)
            acc["size"].append(pred["size"][k] == t.size)
            acc["texture"].append(pred["texture"][k] == t.texture)
        pairs = []
        for order, position_first in ORDERS.items():
            for layout in LAYOUTS:
                for _ in range(self.args.control // 4):
                    a, b = (str(c) for c in rng.choice(list(R.COLOURS), 2, replace=False))
                    pairs.append((pair_prompt(f"{a} {pick(R.SHAPES)}", f"{b} {pick(R.SHAPES)}", layout,
                                              position_first), f"{layout}{order}", LAYOUTS[layout][1], (a, b)))
        two = host.sample([p for p, *_ in pairs], list(range(5000, 5000 + len(pairs))), steps=self.args.steps)
        for img, (_, label, sides, colours) in zip(two, pairs):
            acc.setdefault(f"two objects {label}", []).append(
                all(analyse(half(img[None], s))[0]["colour"] == c for s, c in zip(sides, colours)))
        out = {k: mean_se(v) for k, v in acc.items()}
        out["control"] = (float(np.mean([out[k][0] for k in ("colour", "shape", "position")])), float("nan"))
        return {"figures": out, "samples": torch.cat([images[:6], two[: self.args.control // 4][:3],
                                                      two[self.args.control // 4:][:3]])}

    # -- one point of the plane -----------------------------------------------------------------------------
    def evaluate(self, host: TinyWorldHost, subject: str, references: torch.Tensor, seed: int, applied=(),
                 embeddings=()) -> dict:
        """Per-image fidelity on neutral prompts and per-image alignment on attribute prompts around ``subject``."""
        a = self.args
        fid_prompts = [t.format(subject) for t in FIDELITY_TEMPLATES for _ in range(a.fid_seeds)]
        al = [(t.format(subject), checks) for t, checks in ALIGNMENT for _ in range(a.align_seeds)]
        seeds = [seed + k for k in range(len(fid_prompts))] + [seed + 1000 + k for k in range(len(al))]
        images = host.sample(fid_prompts + [p for p, _ in al], seeds, list(applied), list(embeddings), steps=a.steps)
        fid_images, al_images = images[: len(fid_prompts)], images[len(fid_prompts):]
        by_check: dict[str, list[bool]] = {}
        scores = []
        for (_, checks), info in zip(al, analyse(al_images)):
            ok = [passes(info, c, e) for c, e in checks.items()]
            for (c, _), x in zip(checks.items(), ok):
                by_check.setdefault(c, []).append(x)
            scores.append(np.mean(ok))
        return {"fid": colour_fidelity(fid_images, references), "align": np.array(scores),
                "checks": {k: float(np.mean(v)) for k, v in by_check.items()},
                "outline": outline_score(fid_images),
                "samples": torch.cat([fid_images[:4], al_images[:: a.align_seeds][:8]])}

    # -- two concepts in one prompt -------------------------------------------------------------------------
    def composed(self, host: TinyWorldHost, applied: list[AppliedConcept], refs: dict, seed: int,
                 global_lock: bool = False) -> dict:
        """Both concepts in place: each half holds an object whose colour make-up matches its own concept's
        renderings (histogram intersection above 0.3 and above the other concept's). Also a concept beside an
        ordinary object whose colour is named."""
        a = self.args
        jobs = []  # (prompt, [(side, expected trigger or colour name)], kind, layout)
        for layout, (_, sides) in LAYOUTS.items():
            for first, second in (("sks", "zwx"), ("zwx", "sks")):
                for order, position_first in ORDERS.items():
                    jobs += [(pair_prompt(first, second, layout, position_first),
                              [(sides[0], first), (sides[1], second)], f"two{order}", layout)] * a.multi_seeds
                obj = NAMED[first == "zwx"]
                jobs += [(pair_prompt(first, obj, layout), [(sides[0], first), (sides[1], obj.split()[0])], "named",
                          layout)] * (a.multi_seeds // 2)
        images = host.sample([j[0] for j in jobs], [seed + 7000 + k for k in range(len(jobs))], applied,
                             steps=a.steps, global_lock=global_lock)
        ok = {**{f"two{order}": [] for order in ORDERS}, "named": [], **{f"two {layout}": [] for layout in LAYOUTS}}
        for img, (_, wants, kind, layout) in zip(images, jobs):
            good = []
            for side, want in wants:
                part = half(img[None], side)
                if want in refs:
                    mine, other = (colour_fidelity(part, refs[t])[0]
                                   for t in (want, next(t for t in refs if t != want)))
                    good.append(mine > 0.3 and mine > other)
                else:
                    good.append(analyse(part)[0]["colour"] == want)
            ok[kind].append(all(good))
            if kind == "two":
                ok[f"two {layout}"].append(all(good))
        firsts = [k for k, j in enumerate(jobs) if j[2] == "two"][:: a.multi_seeds]
        return {"in_place": {k: np.array(v, np.float64) for k, v in ok.items()}, "samples": images[firsts]}

    def attention(self, host: TinyWorldHost, applied: list[AppliedConcept], seed: int, words=("sks", "zwx")) -> dict:
        """Where each of the two object words is attended: the share of its cross-attention (pixels' softmax mass,
        over heads, layers and sampling steps) that comes from its own half rather than the other object's half.
        0.5: no localisation. With the superclass words ("square", "circle") this is the world's own baseline."""
        jobs = [(pair_prompt(x, y, l, first), LAYOUTS[l][1], (x, y), l + order)
                for l in LAYOUTS for x, y in (words, words[::-1])
                for order, first in ORDERS.items()] * self.args.attention_seeds
        concepts = [x.concept for x in applied]
        with host.attention_by_side() as records:
            host.sample([j[0] for j in jobs], [seed + 8000 + k for k in range(len(jobs))], applied,
                        steps=self.args.steps)
        maps = torch.stack(records).mean(0)  # (B, side, tokens): left, right, top, bottom
        index = {"left": 0, "right": 1, "top": 2, "bottom": 3}
        shares = {}
        for b, (prompt, sides, order, layout) in enumerate(jobs):
            names = host.text.token_names(prompt, [c.trigger for c in concepts])
            for word, own, other in ((order[0], sides[0], sides[1]), (order[1], sides[1], sides[0])):
                k = names.index(word)
                mine, theirs = float(maps[b, index[own], k]), float(maps[b, index[other], k])
                shares.setdefault(f"{word} {layout}", []).append(mine / (mine + theirs))
        return {k: float(np.mean(v)) for k, v in shares.items()}

    def gate_tables(self, host: TinyWorldHost, applied: list[AppliedConcept], prompts: list[str]) -> list[dict]:
        """Per prompt and token: each concept's similarity s (Eq. 3) and gate g (first-opening where trained so)."""
        stack = JointEdit(applied, joint_gates=host.joint_gates).shared.stack
        out = []
        for prompt in prompts:
            context, slots = host.context([prompt], [x.concept for x in applied])
            names = host.text.token_names(prompt, [x.concept.trigger for x in applied])
            e = context[0, : len(names)]
            s = similarity(e.float(), stack.inputs, stack.keys)
            out.append({"prompt": prompt, "tokens": names, "s": s.numpy().round(3).tolist(),
                        "g": stack.split(e)[1].numpy().round(3).tolist(),
                        "slots": {t: v[0][0] for t, v in slots.items()}})
        return out

    def diagnose(self, host: TinyWorldHost, concept, inverse: torch.Tensor, embedding0: torch.Tensor) -> dict:
        """Where a concept's gate opens: s at its trigger in every training template; how far i moved from e_sup
        (C⁻¹ metric); s at the bare superclass word; how far the embedding moved from the superclass word's."""
        c = concept
        q, i, e_sup = c.target_key.float(), c.target_input.float(), c.superclass_encoding.float()
        s = lambda e: float(e @ q / (i @ q))
        norm = lambda v: float((v @ inverse @ v).sqrt())
        train_s = []
        for template in TEMPLATES:
            context, slots = host.context([template.format(c.trigger)], [c])
            train_s.append(s(context[0, slots[c.trigger][0][0]]))
        return {"s_train_mean": float(np.mean(train_s)), "s_train_min": float(np.min(train_s)),
                "s_train_max": float(np.max(train_s)), "s_at_superclass": s(e_sup),
                "i_moved": norm(i - e_sup) / norm(e_sup), "cos_i_esup": float(torch.cosine_similarity(i, e_sup, 0)),
                "embedding_moved": float((c.embedding.float() - embedding0).norm() / embedding0.norm())}

    # -- one independent run --------------------------------------------------------------------------------
    def run_once(self, r: int, host: TinyWorldHost, tuned: TinyWorldHost, covariance: torch.Tensor,
                 grids: list) -> dict:
        a = self.args
        inverse = ridge_inverse(covariance).float()
        seed = a.seed + r
        t0 = time.time()
        data, refs, one_shot = {}, {}, None
        for trigger, (thing, _) in CONCEPTS.items():
            images, masks = concept_images(thing, "gray", a.shots, seed=7 + 1000 * r)
            data[trigger], refs[trigger] = drawer(images, masks, trigger), images
            if trigger == "sks":
                one_shot = drawer(images[:1], masks[:1], trigger)
            if r == 0:
                grids.append((f"{trigger} renderings", images))
        ts = TrainSettings(steps=a.concept_steps, batch_size=a.concept_batch, grad_accum=1, seed=seed,
                           ema_decay=a.ema_decay)
        trained = {}
        for name, trigger, draw, trained_k in (("locked", "sks", data["sks"], False),
                                               ("trained-K", "sks", data["sks"], True),
                                               ("locked", "zwx", data["zwx"], False),
                                               ("1-shot", "sks", one_shot, False)):
            c0 = time.time()
            concept, losses = train_concept(host, trigger, CONCEPTS[trigger][1], inverse, draw,
                                            replace(ts, trained_k=trained_k))
            trained[(name, trigger)] = concept
            self.log(f"[tinyworld] run {r}: trained {trigger} ({name}): loss {np.mean(losses[:10]):.4f} → "
                     f"{np.mean(losses[-10:]):.4f} in {time.time() - c0:.0f}s")
        ti, _ = train_embedding_only(host, "sks", "square", data["sks"], a.concept_steps, a.concept_batch, a.ti_lr,
                                     seed)
        gates = {t: self.choose_gate(host, trained[("locked", t)], seed, r) for t in CONCEPTS}
        train_s = time.time() - t0

        t = time.time()
        locked, trained_k = trained[("locked", "sks")], trained[("trained-K", "sks")]
        points = []
        eval_seed = 100_000 * (r + 1)

        def point(method, beta, model, result):
            label = f"{method[:14]} b={beta}" if beta is not None else method
            if r == 0:
                grids.append((label + (" FT" if model != "base" else ""), result.pop("samples")))
            result.pop("samples", None)
            points.append({"run": r, "method": method, "beta": beta, "model": model, **result})
            self.log(f"[tinyworld] run {r}: {model:9s} {method:22s} β={beta if beta is not None else '-'}: fidelity "
                     f"{result['fid'].mean():.3f} alignment {result['align'].mean():.3f} "
                     + " ".join(f"{k}={v:.2f}" for k, v in result["checks"].items()))

        ev = lambda h, subject, **kw: self.evaluate(h, subject, refs["sks"], eval_seed, **kw)
        point("superclass only", None, "base", ev(host, "square"))
        point("embedding only (TI)", None, "base", ev(host, "sks", embeddings=[ti]))
        for beta in a.betas:
            point("key-locked", beta, "base", ev(host, "sks", applied=[AppliedConcept(locked, beta, a.tau, "local")]))
            point("trained-K", beta, "base",
                  ev(host, "sks", applied=[AppliedConcept(trained_k, beta, a.tau, "trained-k")]))
        auto = gates["sks"]
        point(AUTOMATIC, None, "base",
              ev(host, "sks", applied=[AppliedConcept(locked, auto.beta_local, auto.tau_local, "local")]))
        point("key-locked 1-shot", a.beta, "base",
              ev(host, "sks", applied=[AppliedConcept(trained[("1-shot", "sks")], a.beta, a.tau, "local")]))
        point("superclass only", None, "finetuned", ev(tuned, "square"))
        point("key-locked", a.beta, "finetuned",
              ev(tuned, "sks", applied=[AppliedConcept(locked, a.beta, a.tau, "local")]))
        point("trained-K", a.beta, "finetuned",
              ev(tuned, "sks", applied=[AppliedConcept(trained_k, a.beta, a.tau, "trained-k")]))
        plane_s = time.time() - t

        t = time.time()
        pair = [AppliedConcept(locked, a.beta, a.tau), AppliedConcept(trained[("locked", "zwx")], a.beta, a.tau)]
        compositions = {"paper": self.composition(host, pair, refs, eval_seed, r, "paper", grids)}
        automatic = [AppliedConcept(trained[("locked", t)], g.beta_local, g.tau_local) for t, g in gates.items()]
        compositions["automatic β"] = self.composition(host, automatic, refs, eval_seed, r, "automatic β", grids)
        joint = TinyWorldHost(host.unet, host.text, host.alphas_cumprod, joint_gates=True)
        joint.guidance = host.guidance
        compositions["paper" + JOINT] = self.composition(joint, pair, refs, eval_seed, r, "paper" + JOINT, grids,
                                                         with_global=False)
        if a.first_opening:  # the gate kept where it first opens (stack.first_opening), in training and inference
            for name, trigger, trained_k in ((FIRST, "sks", False), (FIRST_K, "sks", True), (FIRST, "zwx", False)):
                c0 = time.time()
                trained[name, trigger] = train_concept(
                    host, trigger, CONCEPTS[trigger][1], inverse, data[trigger],
                    replace(ts, trained_k=trained_k, gate_window=WINDOW))[0]
                self.log(f"[tinyworld] run {r}: trained {trigger} ({name}) in {time.time() - c0:.0f}s")
            for name, lock in ((FIRST, "local"), (FIRST_K, "trained-k")):
                point(name, a.beta, "base",
                      ev(host, "sks", applied=[AppliedConcept(trained[name, "sks"], a.beta, a.tau, lock)]))
            firsts = [AppliedConcept(trained[FIRST, t], a.beta, a.tau) for t in CONCEPTS]
            compositions[FIRST] = self.composition(host, firsts, refs, eval_seed, r, FIRST, grids)
            compositions[FIRST + JOINT] = self.composition(joint, firsts, refs, eval_seed, r, FIRST + JOINT, grids,
                                                           with_global=False)
        if a.slot_context:  # each trigger confined to its own token (variants.py), in training and inference
            confined = SlotContextHost(host, {t: superclass for t, (_, superclass) in CONCEPTS.items()})
            for trigger, (_, superclass) in CONCEPTS.items():
                trained[SLOT, trigger] = train_concept(confined, trigger, superclass, inverse, data[trigger], ts)[0]
            point(SLOT, a.beta, "base",
                  ev(confined, "sks", applied=[AppliedConcept(trained[SLOT, "sks"], a.beta, a.tau)]))
            compositions[SLOT] = self.composition(confined, [AppliedConcept(trained[SLOT, t], a.beta, a.tau)
                                                             for t in CONCEPTS], refs, eval_seed, r, SLOT, grids)
        base_pair = self.composed_baseline(host, refs, eval_seed)
        superclass_attention = self.attention(host, [], eval_seed, ("square", "circle"))
        self.log(f"[tinyworld] run {r}: attention share of the superclass words from their own half: "
                 + " ".join(f"{n}={v:.2f}" for n, v in superclass_attention.items()))
        multi_s = time.time() - t

        diagnosis = {f"{trigger} ({name})": self.diagnose(host, concept, inverse,
                                                          host.superclass(CONCEPTS[trigger][1])[0][0])
                     for (name, trigger), concept in trained.items()}
        for k, v in diagnosis.items():
            self.log(f"[tinyworld] run {r}: {k}: " + " ".join(f"{n}={x:.3f}" for n, x in v.items()))
        return {"points": points, "compositions": compositions, "multi_superclass": base_pair,
                "gates": {t: {**g.__dict__, "gap": g.gap} for t, g in gates.items()},
                "superclass_attention": superclass_attention, "diagnosis": diagnosis,
                "timings": {"train_s": train_s, "plane_s": plane_s, "multi_s": multi_s}}

    def choose_gate(self, host: TinyWorldHost, concept, seed: int, r: int):
        """The automatic gate (perfusion_ops/gate_choice.py), as Train Concept chooses it: held-out prompts are world
        captions with the trigger in an object's place (not the evaluation prompts), other tokens those of 256 world
        captions and of the held-out prompts with the superclass word."""
        rng = random.Random(seed + 17)
        captions = [R.random_spec(rng)[1] for _ in range(256)]
        held_out = tuple(trigger_prompts("{}", 32, seed + 18))
        choice = choose_gate(concept, host.encode, host.text.encode_plain, captions, prompts=held_out)
        self.log(f"[tinyworld] run {r}: {choice.describe(concept.trigger)}")
        return choice

    def composition(self, host: TinyWorldHost, pair: list[AppliedConcept], refs: dict, seed: int, r: int, label: str,
                    grids: list, with_global: bool = True) -> dict:
        """Two concepts in one prompt under the local key lock and (``with_global``) the global one; gates per token;
        attention by side."""
        multi = {}
        for mode, global_lock in (("local lock", False), ("global lock", True))[: 1 + with_global]:
            m = self.composed(host, pair, refs, seed, global_lock)
            if r == 0:
                grids.append((f"{label}: {mode}", m["samples"]))
            multi[mode] = m["in_place"]
            self.log(f"[tinyworld] run {r}: two concepts ({label}), {mode}: " + " ".join(
                f"{k}={v.mean():.3f}" for k, v in m["in_place"].items()))
        prompts = [pair_prompt(x, y, l, first) for l in LAYOUTS for x, y in (("sks", "zwx"), ("zwx", "sks"))
                   for first in ORDERS.values()]
        tables = self.gate_tables(host, pair, prompts)
        out = {"multi": multi, "gate_tables": tables, "attention": self.attention(host, pair, seed),
               "cross_gate": max(max(tb["g"][tb["slots"]["zwx"]][0], tb["g"][tb["slots"]["sks"]][1]) for tb in tables),
               "own_gate_min": min(min(tb["g"][tb["slots"]["sks"]][0], tb["g"][tb["slots"]["zwx"]][1])
                                   for tb in tables),
               "other_tokens_gate_max": max(max(g for k, row in enumerate(tb["g"]) if k not in tb["slots"].values()
                                                for g in row) for tb in tables)}
        self.log(f"[tinyworld] run {r}: gates in the composed prompts ({label}): "
                 f"own trigger ≥ {out['own_gate_min']:.3f}, "
                 f"other's trigger ≤ {out['cross_gate']:.3f}, other tokens ≤ {out['other_tokens_gate_max']:.3f}; "
                 "attention share from own half: " + " ".join(f"{k}={v:.2f}" for k, v in out["attention"].items()))
        return out

    def composed_baseline(self, host: TinyWorldHost, refs: dict, seed: int) -> float:
        """Superclass words in the two-object prompts: how often the halves match the concepts by chance."""
        prompts, wants = [], []
        for layout, (_, sides) in LAYOUTS.items():
            prompts += [pair_prompt("square", "circle", layout)] * self.args.multi_seeds
            wants += [sides] * self.args.multi_seeds
        images = host.sample(prompts, [seed + 9000 + k for k in range(len(prompts))], steps=self.args.steps)
        ok = [colour_fidelity(half(img[None], s0), refs["sks"])[0] > 0.3 and
              colour_fidelity(half(img[None], s1), refs["zwx"])[0] > 0.3 for img, (s0, s1) in zip(images, wants)]
        return float(np.mean(ok))

    # -- the whole bench ------------------------------------------------------------------------------------
    def run(self) -> int:
        a = self.args
        start = time.time()
        cache, out = Path(a.cache), Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        settings = WorldSettings(encoder=a.encoder, threads=torch.get_num_threads(), seed=a.world_seed)
        if a.localise is not None:
            settings = replace(settings, localise=a.localise)
        if a.typical is not None:
            settings = replace(settings, typical=a.typical)
        if a.quick:
            settings = replace(settings, captions=600, steps=40, finetune_steps=4, feature_steps=40, clip_steps=20,
                               clip_batch=64)
        path = world_path(cache, settings)
        world_built = not path.is_file()
        if world_built:
            self.log(f"[tinyworld] no cached world at {path}: training it (once)")
            build_world(cache, settings, self.log)
        world = load_world(path)
        self.log(f"[tinyworld] machine: {machine()}; deterministic algorithms on; load average "
                 f"{os.getloadavg()[0]:.1f}")
        self.log(f"[tinyworld] world {path.name} ({settings.encoder}): trained in "
                 f"{world.timings.get('total_s', float('nan')) / 60:.1f} min")
        host, tuned = TinyWorldHost(world.base, world.text), TinyWorldHost(world.finetuned, world.text)
        host.guidance = tuned.guidance = a.guidance
        results: dict = {"machine": machine(), "threads": torch.get_num_threads(), "world": world.timings,
                         "world_settings": dict(settings.__dict__), "settings": vars(a)}
        grids: list[tuple[str, torch.Tensor]] = []
        if hasattr(world.text, "image_features"):
            from bench.tinyworld.clip import zero_shot
            results["clip_zero_shot"] = zero_shot(world.text)
            self.log("[tinyworld] tiny CLIP zero-shot accuracy on fresh renderings: " +
                     " ".join(f"{k}={v:.2f}" for k, v in results["clip_zero_shot"].items()))
        t = time.time()
        control = self.control(host, world.features)
        grids.append(("world: captions", control["samples"]))
        results["control"] = control["figures"]
        self.control_value = control["figures"]["control"][0]
        self.log("[tinyworld] control: " + " ".join(f"{k}={v[0]:.2f}" for k, v in control["figures"].items()) +
                 f" ({time.time() - t:.0f}s)")
        weights = {name: [m.weight for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
                   for name, unet in (("base", world.base), ("finetuned", world.finetuned))}
        results["finetune_weight_change"] = float(np.mean([float((b - f).norm() / b.norm()) for b, f in
                                                           zip(weights["base"], weights["finetuned"])]))

        runs = []
        for r in range(a.runs):
            t = time.time()
            runs.append(self.run_once(r, host, tuned, world.covariance, grids))
            self.log(f"[tinyworld] run {r} done in {time.time() - t:.0f}s")
        results.update(self.pool(runs))
        results["runs"] = [{k: v for k, v in run.items() if k != "points"} | {"compositions": {
            label: {k: v for k, v in c.items() if k != "multi"}
            for label, c in run["compositions"].items()}} for run in runs]
        results["timings"] = {"total_s": time.time() - start, "cpu_s": time.process_time(),
                              "world_built_here": world_built}
        report.write(out, results, grids, self.log_lines)
        s = results["summary"]
        self.log(f"[tinyworld] total {time.time() - start:.0f}s wall, {time.process_time():.0f}s CPU "
                 f"(world {'trained here' if world_built else 'cached'}); load average over the last 15 min "
                 f"{os.getloadavg()[2]:.1f} on {os.cpu_count()} cores")
        au = s["automatic_beta"]
        self.log(f"[tinyworld] automatic β {' / '.join(f'{b:.3f}' for b in au['beta_runs'])}: H {au['H']:.3f}, at the "
                 f"fixed β {a.beta} {au['H_fixed_beta']:.3f}, best of the sweep {au['best_H_of_sweep']:.3f}; "
                 f"multi_in_place {s['multi_in_place (automatic β)']:.3f}, "
                 f"cross_gate {s['cross_gate (automatic β)']:.3f}")
        self.log(f"tinyworld control={s['control']:.3f} fidelity={s['fidelity']:.3f} "
                 f"baseline_fidelity={s['baseline_fidelity']:.3f} alignment={s['alignment']:.3f} "
                 f"lock_gain={s['lock_gain']:+.3f} lock_gain_se={s['lock_gain_se']:.3f} "
                 f"multi_in_place={s['multi_in_place']:.3f} cross_gate={s['cross_gate']:.3f}")
        (out / "log.txt").write_text("\n".join(self.log_lines))  # ends with the summary line, as stdout does
        return 0

    def pool(self, runs: list[dict]) -> dict:
        """Pooled points (every image of every run), per-run figures, lock_gain with its SE and verdict."""
        a = self.args
        keys = list(dict.fromkeys((p["model"], p["method"], p["beta"]) for p in runs[0]["points"]))
        pooled, per_run = [], []
        for model, method, beta in keys:
            mine = [p for run in runs for p in run["points"]
                    if (p["model"], p["method"], p["beta"]) == (model, method, beta)]
            fid, al = np.concatenate([p["fid"] for p in mine]), np.concatenate([p["align"] for p in mine])
            pooled.append({"model": model, "method": method, "beta": beta, **summarise(fid, al),
                           "outline": mean_se(np.concatenate([p["outline"] for p in mine])),
                           "checks": {c: float(np.mean([p["checks"][c] for p in mine])) for c in mine[0]["checks"]},
                           "arrays": (fid, al)})
            per_run.append({"model": model, "method": method, "beta": beta,
                            "fidelity": [float(p["fid"].mean()) for p in mine],
                            "alignment": [float(p["align"].mean()) for p in mine]})
        sweep = lambda rows, m: [p for p in rows
                                 if p["method"] == m and p["model"] == "base" and p["beta"] is not None]
        gain, reach = front_gain(sweep(pooled, "key-locked"), sweep(pooled, "trained-K"))
        images_se = bootstrap_gain([p["arrays"] for p in sweep(pooled, "key-locked")],
                                   [p["arrays"] for p in sweep(pooled, "trained-K")])
        run_gains = []
        for r in range(len(runs)):
            rows = [{**p, "fidelity": float(p["fid"].mean()), "alignment": float(p["align"].mean())}
                    for p in runs[r]["points"]]
            run_gains.append(front_gain(sweep(rows, "key-locked"), sweep(rows, "trained-K"))[0])
        # images_se only sees sampling noise; each run also trains its own concepts, so the spread of the runs'
        # gains is the fuller measure (it includes their images' noise): the larger of the two is the SE
        runs_se = float(np.std(run_gains, ddof=1) / np.sqrt(len(run_gains))) if len(run_gains) > 1 else float("nan")
        gain_se = max(images_se, runs_se) if np.isfinite(runs_se) else images_se
        pick = lambda m, b, model="base": next(p for p in pooled
                                               if (p["method"], p["beta"], p["model"]) == (m, b, model))
        head, base = pick("key-locked", a.beta), pick("superclass only", None)
        harmonic = lambda p: 2 * p["fidelity"] * p["alignment"] / (p["fidelity"] + p["alignment"])  # noqa: E731
        automatic = {"H": harmonic(pick(AUTOMATIC, None)), "H_fixed_beta": harmonic(head),
                     "best_H_of_sweep": max(harmonic(p) for p in sweep(pooled, "key-locked")),
                     "best_H_beta": max(sweep(pooled, "key-locked"), key=harmonic)["beta"],
                     "beta_runs": [run["gates"]["sks"]["beta_local"] for run in runs],
                     "tau_runs": [run["gates"]["sks"]["tau_local"] for run in runs],
                     "chosen_runs": [run["gates"]["sks"]["chosen"] for run in runs]}
        labels = list(runs[0]["compositions"])
        multi = {(label, mode): {k: mean_se(np.concatenate([run["compositions"][label]["multi"][mode][k]
                                                            for run in runs]))
                                 for k in runs[0]["compositions"][label]["multi"][mode]}
                 for label in labels for mode in runs[0]["compositions"][label]["multi"]}
        multi_runs = {key: [float(run["compositions"][key[0]]["multi"][key[1]]["two"].mean()) for run in runs]
                      for key in multi}
        for p in pooled:
            del p["arrays"]
        summary = {"control": self.control_value, "fidelity": head["fidelity"], "baseline_fidelity": base["fidelity"],
                   "alignment": head["alignment"], "lock_gain": gain, "lock_gain_se": gain_se,
                   "lock_gain_se_images": images_se, "lock_gain_se_runs": runs_se,
                   "lock_gain_runs": run_gains, "front_fidelity_reach": reach,
                   "lock_verdict": verdict(gain, gain_se, run_gains),
                   **{f"multi_in_place{'' if label == 'paper' else ' (' + label + ')'}":
                      multi[(label, "local lock")]["two"][0]
                      for label in labels},
                   "multi_in_place_se": multi[("paper", "local lock")]["two"][1],
                   **{f"cross_gate{'' if label == 'paper' else ' (' + label + ')'}":
                      max(run["compositions"][label]["cross_gate"] for run in runs) for label in labels},
                   "max_alignment_se": max(p["alignment_se"] for p in pooled), "automatic_beta": automatic}
        return {"points": pooled, "points_per_run": per_run, "summary": summary,
                "multi": [{"trainer": label, "lock": mode, **m, "per_run": multi_runs[(label, mode)]}
                          for (label, mode), m in multi.items()]}


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.tinyworld", description=__doc__.split("\n")[0])
    p.add_argument("--cache", default=str(ROOT / ".cache" / "tinyworld"))
    p.add_argument("--out", default=str(ROOT / ".cache" / "tinyworld" / "out"))
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); part of the world's key")
    p.add_argument("--encoder", choices=("clip", "minilm"), default="clip", help="the world's text encoder")
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--localise", type=float, default=None,
                   help=f"weight of the world's localisation loss (default {WorldSettings.localise}; 0: none)")
    p.add_argument("--typical", type=float, default=None,
                   help="the probability that a colour the caption leaves out is the shape's typical one "
                        "(render.realise; default 0.8; 0: shape words carry no colour, the earlier world)")
    p.add_argument("--quick", action="store_true",
                   help="tiny world and evaluation (pipeline smoke run, numbers meaningless)")
    p.add_argument("--runs", type=int, default=3,
                   help="independent runs (concept renderings, training and sampling seeds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=8,
                   help="sampler steps (ancestral DDIM; against 12 steps, caption control moved within its noise)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--control", type=int, default=96)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--concept-steps", type=int, default=300)
    p.add_argument("--concept-batch", type=int, default=8)
    p.add_argument("--ti-lr", type=float, default=0.02)
    p.add_argument("--fid-seeds", type=int, default=8)
    p.add_argument("--align-seeds", type=int, default=16)
    p.add_argument("--multi-seeds", type=int, default=16)
    p.add_argument("--attention-seeds", type=int, default=4, help="images per composed prompt for the attention maps")
    p.add_argument("--ema-decay", type=float, default=0.99, help="EMA of the target input i (paper: 0.99)")
    p.add_argument("--betas", type=float, nargs="+", default=[0.55, 0.7, 0.85, 1.0])
    p.add_argument("--beta", type=float, default=0.7,
                   help="β of the headline numbers, 1-shot, multi-concept and transfer")
    p.add_argument("--tau", type=float, default=0.15)
    p.add_argument("--no-first-opening", dest="first_opening", action="store_false",
                   help="skip the concepts trained and applied with first-opening gates (perfusion_ops.stack)")
    p.add_argument("--slot-context", action="store_true",
                   help="also train and apply concepts with each trigger confined to its token (variants.py)")
    args = p.parse_args(argv)
    if args.quick:
        args.control, args.concept_steps, args.fid_seeds, args.align_seeds, args.multi_seeds = 8, 2, 1, 1, 2
        args.attention_seeds = 1
        args.betas, args.steps, args.runs = [0.7, 1.0], 3, 2
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
