"""API-format graphs for the integration tests (what the UI sends to POST /prompt)."""
from __future__ import annotations


def sampling_graph(ckpt: str, positive: str, concepts=(), negative: str = "blurry", seed: int = 0, steps: int = 2,
                   size: int = 64, lora: str | None = None, keylock: bool = False) -> dict:
    """Checkpoint (→ LoRA) → [Load Concept → Apply]* → encode → KSampler → SaveLatent; KSampler is node "k".

    ``concepts`` is a list of ``(file name, beta, tau)``; ``keylock`` encodes the positive prompt with
    Perfusion Global Key Lock instead of CLIP Text Encode."""
    g = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    model, clip = ["ckpt", 0], ["ckpt", 1]
    if lora:
        g["lora"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": lora,
                                                            "strength_model": 1.0, "strength_clip": 1.0}}
        model, clip = ["lora", 0], ["lora", 1]
    for k, (name, beta, tau) in enumerate(concepts):
        g[f"load{k}"] = {"class_type": "PerfusionLoadConcept", "inputs": {"concept_name": name}}
        g[f"apply{k}"] = {"class_type": "PerfusionApply", "inputs": {
            "model": model, "clip": clip, "concept": [f"load{k}", 0], "beta": beta, "tau": tau, "lock": "local"}}
        model, clip = [f"apply{k}", 0], [f"apply{k}", 1]
    if keylock:
        g["pos"] = {"class_type": "PerfusionGlobalKeyLock", "inputs": {"clip": clip, "text": positive}}
    else:
        g["pos"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": positive}}
    g["neg"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": negative}}
    g["latent"] = {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}}
    g["k"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
    g["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["k", 0], "filename_prefix": "perfusion-test"}}
    return g


def train_graph(ckpt: str, image: str, trigger: str, superclass: str, save_name: str, steps: int = 2,
                mask: bool = False, **settings) -> dict:
    """Checkpoint + LoadImage → Perfusion Train Concept (tiny settings for CPU, previews off unless ``settings`` turn
    them on); the trainer is node "train"."""
    inputs = {"model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "images": ["image", 0],
              "trigger_word": trigger, "superclass": superclass, "steps": steps, "batch_size": 1, "grad_accum": 1,
              "lr_values": 0.03, "lr_embedding": 0.006, "train_beta": 0.75, "train_tau": 0.1, "flip": True,
              "resolution": 64, "seed": 0, "save_name": save_name, "checkpoint_every": 0,
              "covariance_captions": 16, "preview_every": 0}
    inputs.update(settings)
    g = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
         "image": {"class_type": "LoadImage", "inputs": {"image": image}},
         "train": {"class_type": "PerfusionTrainConcept", "inputs": inputs}}
    if mask:
        inputs["masks"] = ["image", 1]
    return g
