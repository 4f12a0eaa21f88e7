"""The core's TrainingHost over an SDXL MODEL and CLIP: the SD1.x host (``training_host.py``) with SDXL's text side.

SDXL's context is CLIP-L's and OpenCLIP bigG's hidden states side by side (2048 wide, layer -2 unless CLIP Set Last
Layer says otherwise, no final norm); the UNet also takes ``y``, bigG's pooled output with the image size
(``encode_adm``). The trigger's learned vector is a CLIP-L row and a bigG row (``Concept.embedding_parts``): each
goes into its own encoder, and the bigG row reaches the UNet through ``y`` too, so both rows learn. Previews pass
the pooled outputs of their prompts to ``predict_noise`` themselves (``pooled_output``).
"""
from __future__ import annotations

import torch

from perfusion_ops.clip_text import ClipTextForward
from perfusion_ops.concept import ENCODER_PARTS
from perfusion_ops.covariance import fingerprint

from .training_host import ComfyTrainingHost

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
            at = (torch.arange(len(slots), device=self.device), torch.tensor(slots, device=self.device))
            is_end[at] = False
        hidden, start, eos = [], 0, is_end.int().argmax(1)
        for key, forward in self.forwards.items():
            key_ids = ids if key == "l" else torch.where(torch.arange(ids.shape[1], device=ids.device) > eos[:, None],
                                                         G_PAD, ids)
            embeds = forward.embed(key_ids)
            if vector is not None:
                part = vector[0, start : start + widths[key]].to(embeds)
                embeds = embeds.index_put(at, part.expand(len(slots), -1))
            start += widths[key]
            if key == "g":
                states, pooled = forward.hidden_and_pooled(embeds, self.clip_layer, False, eos, self.projection)
            else:
                states = forward(embeds, self.clip_layer, final_norm=False)
            hidden.append(states)
        context = torch.cat(hidden, -1)
        self._y = (context, pooled)
        return context

    def token_embedding(self, ids):
        """A CLIP-L row and a bigG row side by side for each of ``ids`` ``(n, 2048)``: both encoders learn."""
        return torch.cat([f.token_table[ids] for f in self.forwards.values()], -1)

    def encode(self, prompts, trigger, vector):
        context, encodings = super().encode(prompts, trigger, vector)
        self._y = (context, self._y[1])  # the UNet-dtype context the trainer will pass back
        return context, encodings

    def pooled_output(self):
        """bigG's pooled output of the last encode, ``(B, 1280)``: what the UNet's ``y`` is made from."""
        return self._y[1]

    def unet_inputs(self, noisy, context, pooled) -> dict:
        """``y``: bigG's pooled outputs (by default those of the encode that returned ``context``) and the size."""
        if pooled is None:
            if self._y is None or self._y[0] is not context:
                raise RuntimeError("SDXL training host: predict_noise needs the pooled output of this context")
            pooled = self._y[1]
        height, width = (8 * s for s in noisy.shape[-2:])
        # encode_adm builds the size embeddings on the CPU; ComfyUI's apply_model moves y, this direct call must
        y = self.model.model.encode_adm(pooled_output=pooled.to(self.device), width=width, height=height)
        return {"y": y.to(self.device, self.dtype)}
