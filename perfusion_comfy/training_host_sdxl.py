"""The core's TrainingHost over an SDXL MODEL and CLIP: the SD1.x host (``training_host.py``) with SDXL's text side.

SDXL's context is CLIP-L's and OpenCLIP bigG's hidden states side by side (2048 wide, layer -2 unless CLIP Set Last
Layer says otherwise, no final norm); the UNet also takes ``y``, bigG's pooled output with the image size
(``encode_adm``). The trigger's learned vector is a CLIP-L row and a bigG row (``Concept.embedding_parts``): each
goes into its own encoder, and the bigG row reaches the UNet through ``y`` too, so both rows learn. Previews pass
the pooled outputs of their prompts to :meth:`SdxlTrainingHost.predict_noise` themselves (``pooled_output``).
"""
from __future__ import annotations

import torch

from perfusion_ops.clip_text import ClipTextForward
from perfusion_ops.concept import ENCODER_PARTS
from perfusion_ops.covariance import fingerprint

from .training_host import ComfyTrainingHost, _autocast

WIDTH = 2048
G_PAD = 0  # ComfyUI's bigG token lists pad with 0, CLIP-L's with the end token


class SdxlTrainingHost(ComfyTrainingHost):
    """TrainingHost for an SDXL ModelPatcher and CLIP (both ComfyUI's own classes), on the model's device."""

    TEXT_ENCODER, MODEL_FAMILY = "clip-l+clip-g", "sdxl"

    def _text_forward(self, clip):
        encoders = clip.cond_stage_model
        self.forwards = {}
        with torch.inference_mode(False):
            for key, activation in (("l", "quick_gelu"), ("g", "gelu")):
                model = getattr(encoders, f"clip_{key}").transformer
                weights = {k: v.detach().to(self.device, torch.float32).clone()
                           for k, v in model.text_model.state_dict().items()}
                self.forwards[key] = ClipTextForward(weights, activation)
            self.projection = model.text_projection.weight.detach().to(self.device, torch.float32).clone()
        self.text = self.forwards["l"]  # the SD1.x host's token table and tokenizer are CLIP-L's; the ids are shared
        self._y = None  # (context, pooled) of the last encode: predict_noise takes the UNet's y from it

    def encoder_fingerprint(self) -> str:
        """As the SD1.x host's, over both encoders (a CLIP LoRA changes the attention weights, hence the q_proj)."""
        names = ("embeddings.token_embedding.weight", "final_layer_norm.weight",
                 "encoder.layers.0.self_attn.q_proj.weight")
        parts = [f.w[n][:4096] for f in self.forwards.values() for n in names]
        return fingerprint(parts + [self.projection])

    def encode_ids(self, ids: torch.Tensor, vector: torch.Tensor | None = None, slots=None) -> torch.Tensor:
        ids = ids.to(self.device)
        widths = dict(ENCODER_PARTS[WIDTH])
        is_end = ids == self.end
        if slots is not None:  # the trigger's placeholder row is an end-token id too
            is_end[torch.arange(len(slots), device=self.device), torch.tensor(slots, device=self.device)] = False
        hidden, start, eos = [], 0, is_end.int().argmax(1)
        for key, forward in self.forwards.items():
            key_ids = ids if key == "l" else torch.where(torch.arange(ids.shape[1], device=ids.device) > eos[:, None],
                                                         G_PAD, ids)
            embeds = forward.embed(key_ids)
            if vector is not None:
                rows = torch.arange(len(slots), device=self.device)
                part = vector[0, start : start + widths[key]].to(embeds)
                embeds = embeds.index_put((rows, torch.tensor(slots, device=self.device)),
                                          part.expand(len(slots), -1))
            start += widths[key]
            if key == "g":
                states, pooled = forward.hidden_and_pooled(embeds, self.clip_layer, False, eos, self.projection)
            else:
                states = forward(embeds, self.clip_layer, final_norm=False)
            hidden.append(states)
        context = torch.cat(hidden, -1)
        self._y = (context, pooled)
        return context

    def superclass(self, word):
        """As the SD1.x host: the trigger starts from the mean of the word's token embeddings, in each encoder."""
        pieces = torch.tensor([p for w in word.split() for p in self.word_ids(w)], device=self.device)
        embedding = torch.cat([f.token_table[pieces].mean(0, keepdim=True) for f in self.forwards.values()], -1)
        ids, _ = self.token_ids(f"a photo of a {word}")
        last = ids.index(self.end) - 1
        with torch.no_grad():
            context = self.encode_ids(torch.tensor([ids]))
        return embedding, context[0, last]

    def encode(self, prompts, trigger, vector):
        context, encodings = super().encode(prompts, trigger, vector)
        self._y = (context, self._y[1])  # the UNet-dtype context the trainer will pass back
        return context, encodings

    def pooled_output(self):
        """bigG's pooled output of the last encode, ``(B, 1280)``: what the UNet's ``y`` is made from."""
        return self._y[1]

    def predict_noise(self, noisy, timesteps, context, pooled=None):
        """As the SD1.x host's, with ``y`` from ``pooled`` (rows matching ``context``'s), by default the pooled
        output of the encode that returned ``context``."""
        if pooled is None:
            if self._y is None or self._y[0] is not context:
                raise RuntimeError("SDXL training host: predict_noise needs the pooled output of this context")
            pooled = self._y[1]
        height, width = (8 * s for s in noisy.shape[-2:])
        # encode_adm builds the size embeddings on the CPU; ComfyUI's apply_model moves y, this direct call must
        y = self.model.model.encode_adm(pooled_output=pooled.to(self.device), width=width, height=height)
        y = y.to(self.device)
        with _autocast(self.device):
            out = self.unet(noisy.to(self.device, self.dtype), timesteps.to(self.device).float(),
                            context=context.to(self.dtype), y=y.to(self.dtype), transformer_options={})
        return out.float()
