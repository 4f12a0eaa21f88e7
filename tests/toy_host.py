"""A tiny text-to-image denoiser with SD-style cross-attention, as a TrainingHost for fast core tests.

Text: a word table and one mixing layer (so encodings of a word depend on its neighbours, like CLIP's).
Denoiser: latent pixels attend to the text through ``attn2.to_k``/``to_v`` (two layers of width 24 and 40)."""
from __future__ import annotations


import torch
import torch.nn.functional as F

from perfusion_ops.modules import forwards_installed

WIDTH, TOKEN = 16, 16
WORDS = "a photo of the good image photograph shown in cat dog teddy toy red blue".split()


class ToyHost(torch.nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.vocab = {w: k for k, w in enumerate(WORDS)}
        self.table = torch.nn.Parameter(torch.randn(len(WORDS), TOKEN))
        self.mix = torch.nn.Linear(TOKEN, WIDTH)
        self.attn = torch.nn.ModuleDict({
            name: torch.nn.ModuleDict({"to_q": torch.nn.Linear(4, width, bias=False),
                                       "to_k": torch.nn.Linear(WIDTH, width, bias=False),
                                       "to_v": torch.nn.Linear(WIDTH, width, bias=False),
                                       "to_out": torch.nn.Linear(width, 4, bias=False)})
            for name, width in (("first", 24), ("second", 40))
        })
        self.requires_grad_(False)
        self.layers = {name: block["to_k"].out_features for name, block in self.attn.items()}
        self.alphas_cumprod = torch.linspace(0.99, 0.05, 100)

    def encode(self, prompts, trigger, vector):
        rows, spots = [], []
        for prompt in prompts:
            words = prompt.lower().replace("a photograph", "photograph").split()
            tokens = [vector[0] if w == trigger else self.table[self.vocab[w]] for w in words][:8]
            tokens += [self.table[0]] * (8 - len(tokens))
            rows.append(torch.stack(tokens))
            spots.append(words.index(trigger))
        x = torch.stack(rows)
        context = torch.tanh(self.mix(x + x.cumsum(1) / torch.arange(1, 9)[:, None]))  # causal mixing
        return context, context[torch.arange(len(prompts)), torch.tensor(spots)]

    def superclass(self, word):
        embedding = self.table[self.vocab[word]][None]
        context, _ = self.encode([f"a photo of {word}"], word, embedding)
        return embedding, context[0, 3]

    def project(self, layer, kv):
        module = self.attn[layer][f"to_{kv}"]
        return lambda x: F.linear(x, module.weight)

    def install(self, forwards):
        return forwards_installed({(layer, kv): self.attn[layer][f"to_{kv}"] for layer, kv in forwards}, forwards)

    def predict_noise(self, noisy, timesteps, context):
        x = noisy.flatten(2).transpose(1, 2)  # (B, pixels, 4)
        for block in self.attn.values():
            q, k, v = block["to_q"](x), block["to_k"](context), block["to_v"](context)
            x = x + block["to_out"](F.scaled_dot_product_attention(q, k, v))
        return x.transpose(1, 2).reshape(noisy.shape)
