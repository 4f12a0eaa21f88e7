"""The main job, headless: train a Perfusion concept and render with it through the real ComfyUI executor.

On your checkpoint and photos when given; otherwise on a generated random-weight SD1.5 smoke-test checkpoint and
photos bundled in scikit-image (the pipeline runs for real, but random weights cannot draw anything: the output
says so). Writes the concept file, the rendered images and summary.md to the output folder.

    bash tools/main_job.sh                                         # smoke test, CPU-sized settings
    bash tools/main_job.sh --checkpoint ~/models/v1-5.safetensors --images ~/photos/teddy --trigger hugsy \\
        --superclass teddy --steps 400 --resolution 512             # the real thing (use a GPU)
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

from perfusion_ops.concept_file import load_concept
from tools import comfy_host

REPO = Path(__file__).resolve().parents[1]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="an SD1.x .safetensors checkpoint (default: generated smoke test)")
    p.add_argument("--images", type=Path, help="a folder of photos of the concept (default: scikit-image's cat)")
    p.add_argument("--trigger", default="hugsy", help="the new word for the concept (default: hugsy)")
    p.add_argument("--superclass", default=None, help="what it is, one word (default: cat for the bundled photos)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 400 with --checkpoint, else 4)")
    p.add_argument("--resolution", type=int, default=None, help="training/render size (default: 512, smoke: 64)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 4 with --checkpoint, else 1")
    p.add_argument("--grad-accum", type=int, default=None, help="default: 4 with --checkpoint, else 1")
    p.add_argument("--covariance-captions", type=int, default=None, help="default: 20000, smoke: 64")
    p.add_argument("--render-steps", type=int, default=None, help="sampling steps (default: 30, smoke: 4)")
    p.add_argument("--out", type=Path, default=REPO / "output" / "main_job", help="output folder")
    return p.parse_args(argv)


def bundled_photos(folder: Path) -> list[Path]:
    """scikit-image's 'chelsea' cat: the photo, a mirrored copy and two crops (a real photo from a package)."""
    import skimage.data
    from PIL import Image

    cat = Image.fromarray(skimage.data.chelsea())
    w, h = cat.size
    shots = {"cat.png": cat, "cat-mirror.png": cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
             "cat-crop1.png": cat.crop((0, 0, int(w * 0.8), h)), "cat-crop2.png": cat.crop((int(w * 0.2), 0, w, h))}
    for name, image in shots.items():
        image.save(folder / name)
    return [folder / name for name in shots]


def image_batch(paths: list[str]) -> tuple[dict, list]:
    """LoadImage per photo, joined by ImageBatch (which resizes each to the first's size)."""
    graph, link = {}, None
    for k, name in enumerate(paths):
        graph[f"img{k}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
        if link is None:
            link = [f"img{k}", 0]
        else:
            graph[f"batch{k}"] = {"class_type": "ImageBatch", "inputs": {"image1": link, "image2": [f"img{k}", 0]}}
            link = [f"batch{k}", 0]
    return graph, link


def render_graph(ckpt: str, concept: str, prompt: str, beta: float | None, size: int, steps: int, prefix: str) -> dict:
    """Load → Apply → sample → save; ``beta`` None: the gate the concept file recommends (local lock)."""
    gate = {"gate": "recommended (local lock)", "beta": 0.7} if beta is None else {"gate": "beta and tau widgets",
                                                                                   "beta": beta}
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "load": {"class_type": "PerfusionLoadConcept", "inputs": {"concept_name": concept}},
        "apply": {"class_type": "PerfusionApply", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                             "concept": ["load", 0], "tau": 0.15, "lock": "local",
                                                             **gate}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["apply", 1], "text": prompt}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["apply", 1], "text": "blurry, low quality"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "k": {"class_type": "KSampler", "inputs": {"model": ["apply", 0], "seed": 1, "steps": steps, "cfg": 6.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["pos", 0], "negative": ["neg", 0],
                                                   "latent_image": ["latent", 0], "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["k", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }


def main(argv=None) -> int:
    a = parse(argv)
    smoke = a.checkpoint is None
    steps = a.steps or (4 if smoke else 400)
    size = a.resolution or (64 if smoke else 512)
    superclass = a.superclass or ("cat" if a.images is None else None)
    if superclass is None:
        print("error: --superclass is needed with --images (what the concept is: 'teddy', 'cat', 'mug')")
        return 2
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    host = comfy_host.start_in_process(out / "comfyui")
    if smoke:
        from tools.smoke_checkpoint import checkpoint_path
        checkpoint = checkpoint_path("small")
    else:
        checkpoint = a.checkpoint.expanduser().resolve()
        if not checkpoint.is_file():
            print(f"error: no checkpoint at {checkpoint}")
            return 2
    ckpt = host.layout.add_model("checkpoints", checkpoint)
    host.refresh_models()
    if a.images is None:
        photos = bundled_photos(host.layout.input)
    else:
        photos = sorted(p for p in a.images.expanduser().iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not photos:
            print(f"error: no photos ({', '.join(sorted(IMAGE_SUFFIXES))}) in {a.images}")
            return 2
        for p in photos:
            shutil.copy(p, host.layout.input / p.name)
    images, link = image_batch([p.name for p in photos])
    settings = {"steps": steps, "batch_size": a.batch_size or (1 if smoke else 4),
                "grad_accum": a.grad_accum or (1 if smoke else 4), "lr_values": 0.03, "lr_embedding": 0.006,
                "train_beta": 0.75, "train_tau": 0.1, "flip": True, "resolution": size, "seed": 0,
                "save_name": a.trigger, "checkpoint_every": 0,
                "covariance_captions": a.covariance_captions or (64 if smoke else 20000)}
    train = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}, **images,
             "train": {"class_type": "PerfusionTrainConcept", "inputs": {
                 "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "images": link,
                 "trigger_word": a.trigger, "superclass": superclass, **settings}},
             "chart": {"class_type": "SaveImage", "inputs": {"images": ["train", 1], "filename_prefix": "loss"}}}
    t0 = time.perf_counter()
    host.run(train)
    train_s = time.perf_counter() - t0
    concept_file = host.layout.folder("perfusion") / f"{a.trigger}.safetensors"
    shutil.copy(concept_file, out / concept_file.name)
    render_steps = a.render_steps or (4 if smoke else 30)
    concept = load_concept(concept_file)
    renders = [(f"a photo of a {a.trigger}", None), (f"a {a.trigger} wearing a wizard hat, oil painting", None),
               (f"a {a.trigger} on the beach", 0.6), (f"a photo of a {superclass}", None)]
    t0 = time.perf_counter()
    for k, (prompt, beta) in enumerate(renders):
        host.run(render_graph(ckpt, concept_file.name, prompt, beta, size, render_steps, f"render{k}"))
    render_s = time.perf_counter() - t0
    written = sorted(p for p in host.layout.output.glob("*.png"))
    for p in written:
        shutil.copy(p, out / p.name)
    summary = out / "summary.md"
    summary.write_text("\n".join([
        "# comfyui-perfusion main job",
        "",
        ("**Ran on random weights** (generated smoke-test checkpoint): this proves the pipeline runs end to end "
         "in a real ComfyUI; the images are noise-like and say nothing about quality." if smoke else
         f"Checkpoint: `{checkpoint}`"),
        "",
        f"- host: {host.label}; machine: {platform.processor() or platform.machine()}, device: "
        f"{host.model_management.get_torch_device()}",
        f"- photos: {len(photos)} ({', '.join(p.name for p in photos)})",
        f"- concept: trigger `{a.trigger}`, superclass `{superclass}`",
        f"- training settings: {json.dumps(settings)}",
        f"- training: {train_s:.1f} s; rendering {len(renders)} images ({render_steps} steps, {size}px): "
        f"{render_s:.1f} s",
        f"- concept file: `{concept_file.name}`, {concept_file.stat().st_size / 1024:.1f} KB",
        f"- gate: {concept.info.get('gate', '?')} → recommended β {concept.beta_local:.3f}, τ {concept.tau_local:.3f} "
        f"(local lock), β {concept.beta_global:.3f} (global lock)",
        "- renders: " + "; ".join(f"`{prompt}` ({'recommended gate' if beta is None else f'β {beta}'})"
                                   for prompt, beta in renders),
        "- files: " + ", ".join(p.name for p in written),
        f"- total: {time.perf_counter() - started:.1f} s",
    ]) + "\n")
    print(summary.read_text())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
