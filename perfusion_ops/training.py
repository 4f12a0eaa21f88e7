"""Perfusion training (paper Sec. 4.4, App. D and G), host-agnostic: read it top to bottom like a training script.

Learned: the trigger word's embedding (init: the superclass word's, lr 0.006) and one V target output ``o_V`` per
cross-attention layer (init ``W_V e_sup``, lr 0.03). Frozen: UNet, text encoder, and the K targets, locked to
``o_K = W_K e_sup``. The target input ``i`` follows an EMA of the trigger's encodings, from ``e_sup``. The forward
pass uses the very gated edit inference uses (Eq. 3), so training and inference match (the paper's fix of ROME's
train/test mismatch). A host (ComfyUI nodes, the tiny test world) supplies a :class:`TrainingHost`.

Step ``n`` draws its batches, noise and timesteps from random streams seeded by ``(seed, n)`` alone, so a run resumed
from its :class:`TrainingState` (:meth:`Trainer.resume`) draws exactly what one uninterrupted run draws.
"""
from __future__ import annotations

import contextlib
import hashlib
import random
from dataclasses import dataclass
from typing import Callable, ContextManager, Protocol

import torch
from torch import Tensor

from .concept import Concept, ConceptError, TrainingState, check_gate, check_window, learned_tensors
from .edit import AppliedConcept, JointEdit
from .envelope import MAX_STEPS
from .projection import Projection
from .settings import LOCAL, PAPER_GATES, TRAINED_K

# Neutral training prompts (paper App. G); "{}" is the trigger word.
TEMPLATES = (
    "a photo of a {}", "a good photo of a {}", "the photo of a {}", "a good photo of the {}", "image of a {}",
    "image of the {}", "A photograph of {}", "A {} shown in a photo", "A photo of {}",
)
Forwards = dict[tuple[str, str], Callable[[Tensor], Tensor]]
EMA_START_SHARE = 0.01  # at most this much of i may still be its start, e_sup, at the end of a run


class TrainingHost(Protocol):
    """What the training loop needs from a host model; every tensor it returns may carry gradients."""

    layers: dict[str, int]  # cross-attention layer -> K/V output width
    alphas_cumprod: Tensor  # (T,) noise schedule ᾱ_t of the ε-prediction model

    def project(self, layer: str, kv: str) -> Projection:
        """The frozen host projection ``W·`` of ``layer``'s ``to_k`` (kv 'k') or ``to_v`` ('v')."""

    def encode(self, prompts: list[str], trigger: str, vector: Tensor) -> tuple[Tensor, Tensor]:
        """``(context (B, L, D), trigger encodings (B, D))`` of prompts whose ``trigger`` word is ``vector``."""

    def superclass(self, word: str) -> tuple[Tensor, Tensor]:
        """``(embedding (1, T), e_sup (D,))``: the word's token embedding(s) and its encoding in 'a photo of a …'."""

    def install(self, forwards: Forwards) -> ContextManager:
        """Route each ``(layer, path)`` projection of the UNet through ``forwards`` while the context is open."""

    def predict_noise(self, noisy: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
        """The UNet's ε prediction (with whatever ``install`` put in place)."""


@dataclass
class TrainSettings:
    """Hyper-parameters, defaults from the paper (Sec. 4.4): effective batch 16, 400 steps at most."""

    steps: int = 400
    batch_size: int = 4
    grad_accum: int = 4
    lr_values: float = 0.03
    lr_embedding: float = 0.006
    train_beta: float = PAPER_GATES["train"][0]
    train_tau: float = PAPER_GATES["train"][1]
    ema_decay: float = 0.99
    trained_k: bool = False  # the paper's ablation (Fig. 9b): learn o_K instead of locking it
    gate_window: int = 0  # first-opening gates over the text encoder's window (stack.first_opening); 0: Eq. 3's
    seed: int = 0
    templates: tuple[str, ...] = TEMPLATES

    @property
    def run_ema_decay(self) -> float:
        """The decay the ``i`` EMA uses in this run: ``ema_decay``, lowered where needed so that ``e_sup``'s share of
        ``i`` after the run's ``n = steps·grad_accum`` updates, ``decay^n``, is at most ``EMA_START_SHARE``. With 0.99
        30 updates would leave ``i`` three quarters ``e_sup``: the gate would open at the superclass word as
        widely as at the trigger, for every β. The paper's 400 × 4 updates keep 0.99 (0.99¹⁶⁰⁰ ≈ 10⁻⁷)."""
        return min(self.ema_decay, EMA_START_SHARE ** (1 / (self.steps * self.grad_accum)))

    def check(self) -> "TrainSettings":
        for name in ("steps", "batch_size", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps > MAX_STEPS:
            raise ValueError(f"steps must be at most {MAX_STEPS}, got {self.steps}")
        for name in ("lr_values", "lr_embedding"):
            if not 0 < getattr(self, name) < 10:
                raise ValueError(f"{name} must be in (0, 10), got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        check_gate(self.train_beta, self.train_tau, what="training gate")
        check_window(self.gate_window)
        return self


class ConceptParameters(torch.nn.Module):
    """What training learns (embedding, o_V, optionally o_K) and the EMA'd target input ``i``."""

    def __init__(self, embedding: Tensor, superclass_encoding: Tensor, value_init: dict[str, Tensor],
                 key_init: dict[str, Tensor] | None, inverse_covariance: Tensor):
        super().__init__()
        self.layers = list(value_init)
        self.embedding = torch.nn.Parameter(embedding.detach().float().clone())
        self.values = torch.nn.ParameterList([torch.nn.Parameter(value_init[l].detach().float().clone())
                                              for l in self.layers])
        self.keys = None if key_init is None else torch.nn.ParameterList(
            [torch.nn.Parameter(key_init[l].detach().float().clone()) for l in self.layers])
        self.register_buffer("target_input", superclass_encoding.detach().float().clone())
        self.register_buffer("superclass_encoding", superclass_encoding.detach().float().clone())
        self.register_buffer("inverse_covariance", inverse_covariance.detach().float())

    def learned(self) -> dict[str, torch.nn.Parameter]:
        """The trainable tensors under their concept-file names (``embedding``, ``o_v.<layer>``, ``o_k.<layer>``)."""
        keys = None if self.keys is None else dict(zip(self.layers, self.keys))
        return learned_tensors(self.embedding, dict(zip(self.layers, self.values)), keys)

    @torch.no_grad()
    def track(self, encodings: Tensor, decay: float) -> None:
        """Online estimate of the target input (Sec. 4.4): ``i ← decay·i + (1 − decay)·mean(e_concept)``."""
        self.target_input.mul_(decay).add_(encodings.detach().float().mean(0), alpha=1 - decay)

    def concept(self, trigger: str, superclass: str, settings: TrainSettings, **fields) -> Concept:
        """The current state as a :class:`Concept` (tensors still attached to the graph; ``q = C⁻¹ i``)."""
        i = self.target_input.clone()
        return Concept(
            trigger=trigger, superclass=superclass, embedding=self.embedding,
            target_input=i, target_key=self.inverse_covariance @ i, superclass_encoding=self.superclass_encoding,
            value_outputs=dict(zip(self.layers, self.values)),
            key_outputs=None if self.keys is None else dict(zip(self.layers, self.keys)),
            train_beta=settings.train_beta, train_tau=settings.train_tau, gate_window=settings.gate_window, **fields,
        )


@dataclass
class Sample:
    """One batch of the training data: VAE latents (already scaled), loss weights, prompts."""

    latents: Tensor
    weights: Tensor | None
    prompts: list[str]


@dataclass
class TrainResult:
    concept: Concept
    losses: list[float]


def masked_noise_loss(prediction: Tensor, noise: Tensor, weights: Tensor | None) -> Tensor:
    """ε-MSE, optionally weighted per pixel by a soft mask normalised by its maximum (paper's zero-shot mask)."""
    error = (prediction.float() - noise.float()).square()
    if weights is not None:
        error = error * weights
    return error.mean()


def normalise_masks(masks: Tensor) -> Tensor:
    """Per-image loss weights ``m / max(m)`` (an all-zero mask is refused: it would learn nothing)."""
    peak = masks.flatten(1).amax(1)
    if bool((peak <= 0).any()):
        raise ValueError("a training mask is empty (all zero): every image needs some masked area")
    return masks / peak.view(-1, *([1] * (masks.ndim - 1)))


def add_noise(latents: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """DDPM forward process ``x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε``."""
    a = alphas_cumprod.to(latents.device)[timesteps].view(-1, *([1] * (latents.ndim - 1)))
    return a.sqrt() * latents + (1 - a).sqrt() * noise


class Trainer:
    """The Perfusion optimisation of one concept on a host; ``step`` is one optimizer step."""

    def __init__(self, host: TrainingHost, trigger: str, superclass: str, inverse_covariance: Tensor,
                 settings: TrainSettings, concept_fields: dict | None = None):
        self.host, self.trigger, self.superclass = host, trigger, superclass
        self.settings = settings.check()
        self.fields = concept_fields or {}
        embedding, e_sup = host.superclass(superclass)
        with torch.no_grad():  # o_V (and trained o_K) start from the superclass: W e_sup (App. D)
            init = {path: {l: host.project(l, path)(e_sup[None])[0].float() for l in host.layers} for path in "kv"}
        self.params = ConceptParameters(embedding, e_sup, init["v"], init["k"] if settings.trained_k else None,
                                        inverse_covariance)
        groups = [{"params": [self.params.embedding], "lr": settings.lr_embedding},
                  {"params": [*self.params.values, *(self.params.keys or [])], "lr": settings.lr_values}]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        self.live: dict[tuple[str, str], Callable[[Tensor], Tensor]] = {}
        self.done = 0  # optimizer steps taken, resumed ones included
        self.losses: list[float] = []  # the loss of each since the optimizer started (see TrainingState)

    def streams(self, step: int) -> tuple[random.Random, torch.Generator]:
        """The random streams of optimizer step ``step`` (data draws; noise and timesteps), seeded by the settings'
        seed and ``step`` alone: a resumed run continues them exactly."""
        key = hashlib.sha256(f"perfusion/{self.settings.seed}/{step}".encode()).digest()
        return random.Random(key[:16]), torch.Generator().manual_seed(int.from_bytes(key[16:24], "little") >> 1)

    def resume(self, concept: Concept, state: TrainingState | None = None, done: int | None = None) -> None:
        """Continue from ``concept``: its learned tensors and ``i``. With its ``state`` (a checkpoint's), also the step
        count, the loss history and Adam's moments, so the run goes on exactly as one run would have; without (a
        finished concept), ``done`` steps count as taken and Adam starts afresh. A concept this run could not have
        made (another trigger word, superclass, text width, CLIP layer, K mode or layer set) is refused."""
        self._check_resumable(concept)
        if state is not None:
            done = state.validate(concept).step
        if done is None or not 1 <= done < self.settings.steps:
            raise ConceptError(f"it has {done} steps already: set steps above {done} to train on"
                               if done else "it records no step count")
        learned = self.params.learned()
        with torch.no_grad():
            for name, tensor in concept.learned.items():
                learned[name].copy_(tensor)
            self.params.target_input.copy_(concept.target_input)
        self.done, self.losses = done, [] if state is None else state.losses.tolist()
        # by parameter index, in the order of the optimizer's groups; Adam took len(losses) steps
        if state is not None:
            saved, order = self.optimizer.state_dict(), [p for g in self.optimizer.param_groups for p in g["params"]]
            name_of = {id(p): name for name, p in learned.items()}
            moments = {name: m.clone() for name, m in state.moments.items()}  # Adam updates its own (normal) tensors
            saved["state"] = {k: {"step": torch.tensor(float(len(self.losses))), "exp_avg": moments[name_of[id(p)]][0],
                                  "exp_avg_sq": moments[name_of[id(p)]][1]} for k, p in enumerate(order)}
            self.optimizer.load_state_dict(saved)

    def _check_resumable(self, concept: Concept) -> None:
        words = lambda text: " ".join(text.split()).casefold()  # noqa: E731
        k_mode = lambda trained: "trained K" if trained else "keys locked"  # noqa: E731
        for what, theirs, mine in (
                ("trigger word", concept.trigger.casefold(), self.trigger.casefold()),
                ("superclass", words(concept.superclass), words(self.superclass)),
                ("text width", concept.width, self.params.target_input.shape[0]),
                ("CLIP layer", concept.clip_layer, self.fields.get("clip_layer", concept.clip_layer)),
                ("K mode", k_mode(concept.trained_keys), k_mode(self.settings.trained_k)),
                ("gate window", concept.gate_window, self.settings.gate_window)):
            if theirs != mine:
                raise ConceptError(f"its {what} is '{theirs}' where this run's is '{mine}'")
        widths = {layer: t.shape[0] for layer, t in concept.value_outputs.items()}
        if widths != dict(self.host.layers):
            raise ConceptError(f"its {len(widths)} cross-attention layers are not this model's "
                               f"{len(self.host.layers)} (of other names or widths): "
                               "it was trained on another model family")

    def state(self) -> TrainingState:
        """What :meth:`resume` needs to continue this run exactly (after at least one step)."""
        moments = {name: torch.stack([self.optimizer.state[p]["exp_avg"], self.optimizer.state[p]["exp_avg_sq"]])
                   for name, p in self.params.learned().items()}
        return TrainingState(self.done, torch.tensor(self.losses, dtype=torch.float32), moments)

    @property
    def first_logged(self) -> int:
        """The step of ``losses[0]``: 1, unless the run was resumed from a finished concept (its losses unknown)."""
        return self.done - len(self.losses) + 1

    def forwards(self) -> Forwards:
        """Stable callables for ``host.install``; each step swaps in that step's edit behind them."""
        return {(l, p): (lambda x, key=(l, p): self.live[key](x)) for l in self.host.layers for p in "kv"}

    def concept(self) -> Concept:
        """The concept as trained so far, detached, ready to save or apply."""
        c = self.params.concept(self.trigger, self.superclass, self.settings, **self.fields)
        detach = lambda d: None if d is None else {k: v.detach().clone() for k, v in d.items()}
        c.embedding, c.value_outputs, c.key_outputs = (c.embedding.detach().clone(), detach(c.value_outputs),
                                                       detach(c.key_outputs))
        return c

    def loss(self, sample: Sample, noise: Tensor, timesteps: Tensor, track: bool = True) -> Tensor:
        """The masked ε-loss of one batch through the gated edit of the current concept (Eq. 3)."""
        context, encodings = self.host.encode(sample.prompts, self.trigger, self.params.embedding)
        if track:
            self.params.track(encodings, self.settings.run_ema_decay)
        concept = self.params.concept(self.trigger, self.superclass, self.settings)
        edit = self._route(concept, self.settings.train_beta, self.settings.train_tau)
        edit.shared.prepare(context)  # e⊥ and gates once, outside any checkpointed UNet region
        noisy = add_noise(sample.latents, noise, timesteps, self.host.alphas_cumprod)
        prediction = self.host.predict_noise(noisy, timesteps, context)
        return masked_noise_loss(prediction, noise, sample.weights)

    def _route(self, concept: Concept, beta: float, tau: float) -> JointEdit:
        """Send the host's projections (through :meth:`forwards`) through ``concept``'s gated edit at ``(β, τ)``."""
        lock = TRAINED_K if self.settings.trained_k else LOCAL
        edit = JointEdit([AppliedConcept(concept, beta, tau, lock)])
        self.live = {(l, p): edit.projection(l, p, self.host.project(l, p)) for l in self.host.layers for p in "kv"}
        return edit

    @contextlib.contextmanager
    def applied(self):
        """Within ``host.install(self.forwards())``: while open, the projections carry the concept as trained so far
        the way inference applies it (its recommended local β/τ; the training gate is sharper), with no gradients,
        for rendering previews. It yields that concept; training's edit comes back on exit."""
        concept, training = self.concept(), self.live
        self._route(concept, *concept.recommended(LOCAL))
        try:
            with torch.no_grad():
                yield concept
        finally:
            self.live = training

    def step(self, draw: Callable[[random.Random, int], Sample]) -> float:
        """One optimizer step over ``grad_accum`` micro-batches drawn by ``draw(rng, batch_size)``."""
        total = 0.0
        rng, generator = self.streams(self.done + 1)
        for _ in range(self.settings.grad_accum):
            sample = draw(rng, self.settings.batch_size)
            noise = torch.randn(sample.latents.shape, generator=generator).to(sample.latents)
            steps = len(self.host.alphas_cumprod)
            timesteps = torch.randint(0, steps, (sample.latents.shape[0],), generator=generator)
            loss = self.loss(sample, noise, timesteps.to(sample.latents.device)) / self.settings.grad_accum
            loss.backward()
            total += float(loss.detach())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.done += 1
        self.losses.append(total)
        return total

    def evaluate(self, sample: Sample, noise: Tensor, timesteps: Tensor) -> float:
        """The loss on fixed ``(noise, timesteps)`` without moving ``i`` (for tests and learning curves)."""
        with self.host.install(self.forwards()), torch.no_grad():  # no_grad inside: install may re-enable grad
            return float(self.loss(sample, noise, timesteps, track=False))


def prompts_for(trigger: str, rng: random.Random, count: int, templates: tuple[str, ...] = TEMPLATES) -> list[str]:
    """``count`` neutral training prompts (App. G) around the trigger word."""
    return [rng.choice(templates).format(trigger) for _ in range(count)]


def run(trainer: Trainer, draw: Callable[[random.Random, int], Sample],
        on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train until ``settings.steps`` steps are taken (a resumed trainer starts where it left off); ``on_step(step,
    loss)`` after each (may raise to stop early). The result's losses are the trainer's: resumed ones included."""
    with trainer.host.install(trainer.forwards()):
        while trainer.done < trainer.settings.steps:
            loss = trainer.step(draw)
            if on_step:
                on_step(trainer.done, loss)
    return TrainResult(trainer.concept(), list(trainer.losses))
