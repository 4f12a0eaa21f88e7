"""The core's TrainingHost over a loaded ComfyUI MODEL and CLIP: differentiable, and leaves them as it found them.

ComfyUI runs nodes under ``torch.inference_mode()``, so its loaded weights are inference tensors, which autograd
refuses to save. While training, each such weight is swapped for a normal clone; on exit the originals go back,
so the models are bit-identical (the same tensor objects) afterwards. The text encoder runs through the core's
:class:`ClipTextForward` on ComfyUI's own CLIP-L weights, since ComfyUI's encode passes no gradient.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
from torch.utils.checkpoint import checkpoint

import comfy.model_management

from perfusion_ops.clip_text import ClipTextForward
from perfusion_ops.covariance import fingerprint
from perfusion_ops.modules import forwards_installed
from .patching import cross_attention_layers

MAX_TOKENS = 77


@contextlib.contextmanager
def trainable_weights(*modules: torch.nn.Module):
    """While open: inference-tensor parameters/buffers of ``modules`` are swapped for normal frozen clones (autograd
    can save those), and other parameters are frozen, so gradients flow *through* the weights but never *to* them."""
    swapped, frozen = [], []
    with torch.inference_mode(False):
        for module in modules:
            for owner in module.modules():
                for table in (owner._parameters, owner._buffers):
                    for name, tensor in table.items():
                        if tensor is None:
                            continue
                        if tensor.is_inference():
                            clone = tensor.detach().clone()
                            table[name] = (torch.nn.Parameter(clone, requires_grad=False)
                                           if table is owner._parameters else clone)
                            swapped.append((table, name, tensor))
                        elif tensor.requires_grad:  # a model loaded outside inference mode: freeze it all the same
                            tensor.requires_grad_(False)
                            frozen.append(tensor)
    try:
        yield
    finally:
        for table, name, tensor in reversed(swapped):
            table[name] = tensor
        for tensor in frozen:
            tensor.requires_grad_(True)



def non_dynamic(model):
    """``model``, or a plain ModelPatcher clone of it where it is a dynamic-VRAM one (v0.33 on CUDA with
    comfy-aimdo), whose weights stream in per call: training needs every weight resident. ComfyUI's own trainer
    trains on such a clone too (``clone(force_deepcopy=True)``)."""
    is_dynamic = getattr(model, "is_dynamic", None)
    return model.clone(disable_dynamic=True) if is_dynamic is not None and is_dynamic() else model


def load_for_training(model) -> None:
    """Load the whole UNet onto its device as ComfyUI's own trainer does (``comfy_extras/nodes_train.py``): other
    models are unloaded first, and no weight is left offloaded (backward needs them all). The 2024 tree's
    ``load_models_gpu`` has no ``force_full_load``; it loads fully whenever the model fits."""
    load = comfy.model_management.load_models_gpu
    options = {"memory_required": 1e20, "force_full_load": True}
    load([model], **{k: v for k, v in options.items() if k in inspect.signature(load).parameters})


def training_host(model, clip, clip_layer: int, gradient_checkpointing: bool) -> "ComfyTrainingHost":
    """The training host for this CLIP's family: SDXL's (CLIP-L and bigG) or SD1.x's (CLIP-L)."""
    encoders = {name for name in ("clip_l", "clip_g") if hasattr(clip.cond_stage_model, name)}
    if encoders == {"clip_l", "clip_g"}:
        from .training_host_sdxl import SdxlTrainingHost
        return SdxlTrainingHost(model, clip, clip_layer, gradient_checkpointing)
    if encoders == {"clip_l"}:
        return ComfyTrainingHost(model, clip, clip_layer, gradient_checkpointing)
    kind = type(clip.cond_stage_model).__name__
    raise ValueError(f"Perfusion trains on SD1.x and SDXL checkpoints; this CLIP ({kind}) is neither (the SDXL "
                     "refiner and SD3 are not supported)")


class ComfyTrainingHost:
    """TrainingHost (see ``perfusion_ops.training``) for an SD1.x ModelPatcher and CLIP, on the model's device."""

    TEXT_ENCODER, MODEL_FAMILY = "clip-l", "sd15"  # what the concept file records

    def __init__(self, model, clip, clip_layer: int = -1, gradient_checkpointing: bool = False):
        model = non_dynamic(model)
        self.model, self.clip = model, clip
        self.device = model.load_device
        clip.load_model()  # its weights are copied below; loading the UNet may then offload it
        self.dtype = model.model.get_dtype()
        sigmas = model.model.model_sampling.sigmas.detach().float().cpu()
        self.alphas_cumprod = 1 / (1 + sigmas.square())
        self.clip_layer = clip_layer
        self.checkpointing = gradient_checkpointing
        self.word_tokenizer = clip.tokenizer.clip_l.tokenizer  # the HF CLIP BPE tokenizer ComfyUI ships
        self.start, self.end = self.word_tokenizer("")["input_ids"]
        self._text_forward(clip)
        load_for_training(model)
        self.unet = model.model.diffusion_model
        self.layers = cross_attention_layers(model)
        self._modules = {(layer, path): getattr(self.unet.get_submodule(layer), f"to_{path}")
                         for layer in self.layers for path in "kv"}

    def _text_forward(self, clip) -> None:
        """The differentiable text encoder over ComfyUI's own CLIP-L weights."""
        text_model = clip.cond_stage_model.clip_l.transformer.text_model
        with torch.inference_mode(False):
            weights = {k: v.detach().to(self.device, torch.float32).clone()
                       for k, v in text_model.state_dict().items()}
        self.text = ClipTextForward(weights)

    def encoder_fingerprint(self) -> str:
        """Fingerprint of this CLIP's weights (keys the covariance cache; recorded in the concept)."""
        w = self.text.w
        return fingerprint([w["embeddings.token_embedding.weight"][:4096], w["final_layer_norm.weight"],
                            w["encoder.layers.0.self_attn.q_proj.weight"]])

    # -- text ----------------------------------------------------------------------------------------------
    def word_ids(self, word: str) -> list[int]:
        return self.word_tokenizer(word)["input_ids"][1:-1]

    def token_ids(self, prompt: str, trigger: str | None = None) -> tuple[list[int], int | None]:
        """77 ids of ``prompt`` split into words like ComfyUI's SD1 tokenizer; the trigger's slot (or None)."""
        ids, slot = [self.start], None
        for word in prompt.split():
            if trigger is not None and word.lower() == trigger.lower():
                slot = len(ids)
                ids.append(self.end)  # placeholder row, replaced by the learned vector
            else:
                ids += self.word_ids(word)
        ids = ids[: MAX_TOKENS - 1] + [self.end]
        return ids + [self.end] * (MAX_TOKENS - len(ids)), slot

    def encode_ids(self, ids: torch.Tensor, vector: torch.Tensor | None = None, slots=None) -> torch.Tensor:
        embeds = self.text.embed(ids.to(self.device))
        if vector is not None:
            rows = torch.arange(len(slots), device=self.device)
            embeds = embeds.index_put((rows, torch.tensor(slots, device=self.device)),
                                      vector[0].to(embeds).expand(len(slots), -1))
        return self.text(embeds, self.clip_layer)

    def encode(self, prompts, trigger, vector):
        pairs = [self.token_ids(p, trigger) for p in prompts]
        if any(slot is None for _, slot in pairs):
            raise ValueError(f"every training prompt must contain the trigger word '{trigger}'")
        slots = [slot for _, slot in pairs]
        context = self.encode_ids(torch.tensor([ids for ids, _ in pairs]), vector, slots)
        # in the UNet's dtype already, so the edit's per-context cache hits inside the UNet
        return context.to(self.dtype), context[torch.arange(len(prompts)), torch.tensor(slots)]

    def pooled_output(self):
        """The pooled text output of the last encode, for UNets that take one (SDXL's ``y``); SD1.x's takes none."""
        return None

    def encode_plain(self, prompts: list[str]) -> torch.Tensor:
        """Encodings of plain prompts, no gradient (covariance estimation)."""
        with torch.no_grad():
            return self.encode_ids(torch.tensor([self.token_ids(p)[0] for p in prompts]))

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """The learnable token vectors of ``ids`` ``(n, T)``: rows of the CLIP-L token table."""
        return self.text.token_table[ids]

    def superclass(self, word):
        """Rule for superclass words of several tokens ('teddy bear'): the trigger starts from the mean of their
        token embeddings, and ``e_sup`` is the encoding of the last one (the causal encoder has seen them all)."""
        pieces = torch.tensor([piece for w in word.split() for piece in self.word_ids(w)], device=self.device)
        embedding = self.token_embedding(pieces).mean(0, keepdim=True)
        ids, _ = self.token_ids(f"a photo of a {word}")
        last = ids.index(self.end) - 1  # the superclass's last piece ends the prompt
        with torch.no_grad():
            context = self.encode_ids(torch.tensor([ids]))
        return embedding, context[0, last]

    # -- UNet ----------------------------------------------------------------------------------------------
    def project(self, layer, kv):
        module = self._modules[layer, kv]
        return lambda x: type(module).forward(module, x.to(self.dtype))

    @contextlib.contextmanager
    def install(self, forwards):
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            # the 2024 tree adds residuals in place (x += n): let autograd keep copies of what it saved
            stack.enter_context(torch.autograd.graph.allow_mutation_on_saved_tensors())
            stack.enter_context(trainable_weights(self.unet))
            stack.enter_context(forwards_installed(self._modules, forwards))
            if self.checkpointing:
                layers = dict(enumerate(self._checkpointed_modules()))
                stack.enter_context(forwards_installed(layers, {k: _checkpointed(m) for k, m in layers.items()}))
            yield

    def _checkpointed_modules(self):
        """What gradient checkpointing recomputes in backward: the res blocks, and in each transformer block its
        attention and feed-forward modules, which hold most of its activations. Not whole transformer blocks: the 2024
        tree adds their residuals in place (``x += n``) onto tensors a recomputation has saved by reference, which gave
        gradients a few percent off; these modules leave their inputs alone, so the gradients are exact."""
        kinds = ("ResBlock", "CrossAttention", "FeedForward")
        return [m for m in self.unet.modules() if type(m).__name__ in kinds]

    def predict_noise(self, noisy, timesteps, context, pooled=None):
        """The UNet's ε. ``pooled``: the pooled text outputs of ``context``'s rows, for a UNet that takes them (SDXL's
        ``y``; by default those of the encode that returned ``context``); SD1.x's takes none."""
        inputs = self.unet_inputs(noisy, context, pooled)
        with _autocast(self.device):
            out = self.unet(noisy.to(self.device, self.dtype), timesteps.to(self.device).float(),
                            context=context.to(self.dtype), transformer_options={}, **inputs)
        return out.float()

    def unet_inputs(self, noisy, context, pooled) -> dict:
        """The UNet's inputs besides the latents, the timesteps and the context: none for SD1.x."""
        return {}


def _checkpointed(block):
    return lambda *args, **kwargs: checkpoint(type(block).forward, block, *args, use_reentrant=False, **kwargs)


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (the frozen UNet's matmuls), nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
