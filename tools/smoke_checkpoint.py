"""Random-weight SD1.5 checkpoints (and a LoRA) in the exact single-file layout real SD1.5 files use.

Why: no weights can be downloaded in tests, yet the node pack must be run inside a real ComfyUI graph,
through ComfyUI's own ``CheckpointLoaderSimple`` / ``LoraLoader``. These files have the key layout and
dtypes of a real SD1.5 ``.safetensors`` (``model.diffusion_model.*`` ldm UNet,
``cond_stage_model.transformer.text_model.*`` full CLIP-L, ``first_stage_model.*`` full KL-f8 VAE), so
ComfyUI detects them as SD15 by itself. Weights are random but seeded and scaled so every stage gives
finite, non-constant, text-dependent outputs (nothing is zero-initialised: ldm's usual zero-init of
``proj_out``/``out_layers`` would make cross-attention a no-op and text-conditioning tests vacuous).

Variants (the UNet alone differs; CLIP-L and VAE are full size and identical in both):

* ``full``: the exact SD1.5 UNet (channel_mult 1,2,4,4, 2 res blocks, 16 ``attn2`` layers at
  input_blocks.1,2 (320) 4,5 (640) 7,8 (1280), middle_block.1 (1280), output_blocks.3,4,5 (1280),
  6,7,8 (640), 9,10,11 (320)); 859,520,964 parameters as in SD1.5. 2.0 GiB, generated in about a minute.
* ``small``: model_channels 320, context_dim 768, conv proj_in, no label_emb (what SD15 detection keys
  on), but channel_mult (1, 2) and 1 res block per level, so 7 ``attn2`` layers (see SMALL_ATTN2).
  Their paths differ from SD1.5's: code must discover layers from the model, not assume the 16 names.
  107M UNet parameters, 600 MiB in all, generated in about 5 s; a 2-step 64x64 graph runs in seconds on 2 CPU cores.

The LoRA uses kohya's naming of SD1.5 LoRAs (diffusers block names: ``lora_unet_down_blocks_0_attentions_0_
transformer_blocks_0_attn2_to_k``) for ``attn2.to_k``/``to_v`` of every cross-attention layer of the
variant, rank 4, alpha 2 (ComfyUI scales by alpha/rank).

CLI: ``python tools/smoke_checkpoint.py --variant small|full [--out PATH] [--lora]``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("PERFUSION_CHECKPOINT_CACHE", REPO / ".cache" / "checkpoints"))
SEED = 20240315
GENERATOR_VERSION = "5"  # bump when layout or init changes: cached files with another version are rebuilt

UNET_CONFIGS = {
    "full": {"channel_mult": (1, 2, 4, 4), "num_res_blocks": 2, "attn_levels": (0, 1, 2)},
    "small": {"channel_mult": (1, 2), "num_res_blocks": 1, "attn_levels": (0, 1)},
}
MODEL_CHANNELS, CONTEXT_DIM, TIME_DIM, HEADS = 320, 768, 1280, 8
LORA_RANK, LORA_ALPHA = 4, 2.0

UNET = "model.diffusion_model."
CLIP = "cond_stage_model.transformer.text_model."
VAE = "first_stage_model."

Shapes = dict  # key -> shape tuple, insertion-ordered


# ----------------------------------------------------------------------------------------------- UNet
def _resblock(s: Shapes, p: str, cin: int, cout: int) -> None:
    s[p + "in_layers.0.weight"] = s[p + "in_layers.0.bias"] = (cin,)
    s[p + "in_layers.2.weight"], s[p + "in_layers.2.bias"] = (cout, cin, 3, 3), (cout,)
    s[p + "emb_layers.1.weight"], s[p + "emb_layers.1.bias"] = (cout, TIME_DIM), (cout,)
    s[p + "out_layers.0.weight"] = s[p + "out_layers.0.bias"] = (cout,)
    s[p + "out_layers.3.weight"], s[p + "out_layers.3.bias"] = (cout, cout, 3, 3), (cout,)
    if cin != cout:
        s[p + "skip_connection.weight"], s[p + "skip_connection.bias"] = (cout, cin, 1, 1), (cout,)


def _transformer(s: Shapes, p: str, ch: int) -> None:
    """ldm SpatialTransformer, depth 1, conv (1x1) proj_in/proj_out as in SD1.x."""
    s[p + "norm.weight"] = s[p + "norm.bias"] = (ch,)
    s[p + "proj_in.weight"], s[p + "proj_in.bias"] = (ch, ch, 1, 1), (ch,)
    b = p + "transformer_blocks.0."
    for attn, kv_in in (("attn1", ch), ("attn2", CONTEXT_DIM)):
        s[f"{b}{attn}.to_q.weight"] = (ch, ch)
        s[f"{b}{attn}.to_k.weight"] = s[f"{b}{attn}.to_v.weight"] = (ch, kv_in)
        s[f"{b}{attn}.to_out.0.weight"], s[f"{b}{attn}.to_out.0.bias"] = (ch, ch), (ch,)
    s[b + "ff.net.0.proj.weight"], s[b + "ff.net.0.proj.bias"] = (8 * ch, ch), (8 * ch,)  # GEGLU
    s[b + "ff.net.2.weight"], s[b + "ff.net.2.bias"] = (ch, 4 * ch), (ch,)
    for n in ("norm1", "norm2", "norm3"):
        s[f"{b}{n}.weight"] = s[f"{b}{n}.bias"] = (ch,)
    s[p + "proj_out.weight"], s[p + "proj_out.bias"] = (ch, ch, 1, 1), (ch,)


def unet_layout(variant: str) -> tuple[Shapes, dict[str, int], dict[str, str]]:
    """(shapes, {attn2 path: inner width}, {attn2 path: diffusers block name}) of the ldm UNet,
    built the way ldm's UNetModel.__init__ numbers its blocks."""
    cfg = UNET_CONFIGS[variant]
    mult, nrb, attn_levels = cfg["channel_mult"], cfg["num_res_blocks"], cfg["attn_levels"]
    s: Shapes = {}
    attn2: dict[str, int] = {}
    diffusers: dict[str, str] = {}

    def block_attn(path: str, ch: int, dname: str) -> None:
        _transformer(s, path, ch)
        attn2[path + "transformer_blocks.0.attn2"] = ch
        diffusers[path + "transformer_blocks.0.attn2"] = dname + ".transformer_blocks.0.attn2"

    s["time_embed.0.weight"], s["time_embed.0.bias"] = (TIME_DIM, MODEL_CHANNELS), (TIME_DIM,)
    s["time_embed.2.weight"], s["time_embed.2.bias"] = (TIME_DIM, TIME_DIM), (TIME_DIM,)
    s["input_blocks.0.0.weight"], s["input_blocks.0.0.bias"] = (MODEL_CHANNELS, 4, 3, 3), (MODEL_CHANNELS,)
    ch, skips, idx = MODEL_CHANNELS, [MODEL_CHANNELS], 1
    for level, m in enumerate(mult):
        for r in range(nrb):
            out = m * MODEL_CHANNELS
            _resblock(s, f"input_blocks.{idx}.0.", ch, out)
            ch = out
            if level in attn_levels:
                block_attn(f"input_blocks.{idx}.1.", ch, f"down_blocks.{level}.attentions.{r}")
            skips.append(ch)
            idx += 1
        if level != len(mult) - 1:
            s[f"input_blocks.{idx}.0.op.weight"], s[f"input_blocks.{idx}.0.op.bias"] = (ch, ch, 3, 3), (ch,)
            skips.append(ch)
            idx += 1
    _resblock(s, "middle_block.0.", ch, ch)
    block_attn("middle_block.1.", ch, "mid_block.attentions.0")
    _resblock(s, "middle_block.2.", ch, ch)
    idx = 0
    for level in reversed(range(len(mult))):
        up = len(mult) - 1 - level
        for r in range(nrb + 1):
            out = mult[level] * MODEL_CHANNELS
            _resblock(s, f"output_blocks.{idx}.0.", ch + skips.pop(), out)
            ch, sub = out, 1
            if level in attn_levels:
                block_attn(f"output_blocks.{idx}.1.", ch, f"up_blocks.{up}.attentions.{r}")
                sub = 2
            if level and r == nrb:
                s[f"output_blocks.{idx}.{sub}.conv.weight"] = (ch, ch, 3, 3)
                s[f"output_blocks.{idx}.{sub}.conv.bias"] = (ch,)
            idx += 1
    s["out.0.weight"] = s["out.0.bias"] = (MODEL_CHANNELS,)
    s["out.2.weight"], s["out.2.bias"] = (4, MODEL_CHANNELS, 3, 3), (4,)
    return s, attn2, diffusers


# ----------------------------------------------------------------------------------------- CLIP-L
def clip_layout() -> Shapes:
    """HF CLIPTextModel (ViT-L/14 text tower: 12 layers, width 768, MLP 3072, 77 positions, 49408 tokens)."""
    s: Shapes = {"embeddings.token_embedding.weight": (49408, 768), "embeddings.position_embedding.weight": (77, 768)}
    for i in range(12):
        p = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[f"{p}self_attn.{proj}.weight"], s[f"{p}self_attn.{proj}.bias"] = (768, 768), (768,)
        for n in ("layer_norm1", "layer_norm2"):
            s[f"{p}{n}.weight"] = s[f"{p}{n}.bias"] = (768,)
        s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"] = (3072, 768), (3072,)
        s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"] = (768, 3072), (768,)
    s["final_layer_norm.weight"] = s["final_layer_norm.bias"] = (768,)
    return s


# -------------------------------------------------------------------------------------------- VAE
def vae_layout() -> Shapes:
    """ldm AutoencoderKL as in SD1.x: ch 128, ch_mult 1,2,4,4, 2 res blocks, z 4 (double_z)."""
    s: Shapes = {}

    def res(p: str, cin: int, cout: int) -> None:
        s[p + "norm1.weight"] = s[p + "norm1.bias"] = (cin,)
        s[p + "conv1.weight"], s[p + "conv1.bias"] = (cout, cin, 3, 3), (cout,)
        s[p + "norm2.weight"] = s[p + "norm2.bias"] = (cout,)
        s[p + "conv2.weight"], s[p + "conv2.bias"] = (cout, cout, 3, 3), (cout,)
        if cin != cout:
            s[p + "nin_shortcut.weight"], s[p + "nin_shortcut.bias"] = (cout, cin, 1, 1), (cout,)

    def mid(p: str) -> None:
        res(p + "mid.block_1.", 512, 512)
        s[p + "mid.attn_1.norm.weight"] = s[p + "mid.attn_1.norm.bias"] = (512,)
        for n in ("q", "k", "v", "proj_out"):
            s[f"{p}mid.attn_1.{n}.weight"], s[f"{p}mid.attn_1.{n}.bias"] = (512, 512, 1, 1), (512,)
        res(p + "mid.block_2.", 512, 512)

    widths = [128, 256, 512, 512]
    s["encoder.conv_in.weight"], s["encoder.conv_in.bias"] = (128, 3, 3, 3), (128,)
    cin = 128
    for i, w in enumerate(widths):
        for b in range(2):
            res(f"encoder.down.{i}.block.{b}.", cin, w)
            cin = w
        if i != 3:
            (s[f"encoder.down.{i}.downsample.conv.weight"],
             s[f"encoder.down.{i}.downsample.conv.bias"]) = (w, w, 3, 3), (w,)
    mid("encoder.")
    s["encoder.norm_out.weight"] = s["encoder.norm_out.bias"] = (512,)
    s["encoder.conv_out.weight"], s["encoder.conv_out.bias"] = (8, 512, 3, 3), (8,)
    s["quant_conv.weight"], s["quant_conv.bias"] = (8, 8, 1, 1), (8,)
    s["post_quant_conv.weight"], s["post_quant_conv.bias"] = (4, 4, 1, 1), (4,)
    s["decoder.conv_in.weight"], s["decoder.conv_in.bias"] = (512, 4, 3, 3), (512,)
    mid("decoder.")
    cin = 512
    for i in reversed(range(4)):
        for b in range(3):
            res(f"decoder.up.{i}.block.{b}.", cin, widths[i])
            cin = widths[i]
        if i != 0:
            (s[f"decoder.up.{i}.upsample.conv.weight"],
             s[f"decoder.up.{i}.upsample.conv.bias"]) = (cin, cin, 3, 3), (cin,)
    s["decoder.norm_out.weight"] = s["decoder.norm_out.bias"] = (128,)
    s["decoder.conv_out.weight"], s["decoder.conv_out.bias"] = (3, 128, 3, 3), (3,)
    return s


# ------------------------------------------------------------------------------------------- init
def _randn(key: str, shape: tuple, std: float) -> torch.Tensor:
    """Seeded per key, so a tensor does not depend on the variant or on the order of generation."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{SEED}:{key}".encode()))
    return torch.randn(shape, generator=g) * std


def _init(key: str, shape: tuple) -> torch.Tensor:
    """Unit-gain init: 1/sqrt(fan_in) weights keep activations O(1) through every block; norms start at 1."""
    if key.endswith("embedding.weight"):
        # Like a trained CLIP's, the encoding at a position must be mostly about *its* token: a position table
        # as strong as the token table makes the 5th encoding of every prompt alike, and no gate could tell
        # a trigger word from any other word there.
        return _randn(key, shape, 0.2 if "position" in key else 1.0)
    if key == VAE + "quant_conv.bias":
        # posterior logvar -8: narrow, as in SD's VAE
        return torch.cat([_randn(key, (4,), 0.02), torch.full((4,), -8.0)])
    if len(shape) == 1:  # every 1-D weight here is a GroupNorm/LayerNorm scale
        return torch.ones(shape) if key.endswith("weight") else _randn(key, shape, 0.02)
    w = _randn(key, shape, math.prod(shape[1:]) ** -0.5)
    if key.startswith(CLIP) and key.endswith(("out_proj.weight", "fc2.weight")):
        w *= 0.3  # residual branches: token mixing adds context without drowning the token itself
    if key == VAE + "decoder.conv_out.weight":
        w *= 0.6  # images around mid grey with std ~0.2: few pixels clip in VAEDecode's [0, 1] clamp
    if key == VAE + "quant_conv.weight":
        w[:4] *= 12.0  # posterior mean std ~5, so latents * 0.18215 have about unit scale, as real SD latents
        w[4:] *= 0.1
    return w


def checkpoint_state_dict(variant: str) -> dict[str, torch.Tensor]:
    unet, _, _ = unet_layout(variant)
    return {prefix + k: _init(prefix + k, shape).to(torch.float16)
            for prefix, shapes in ((UNET, unet), (CLIP, clip_layout()), (VAE, vae_layout()))
            for k, shape in shapes.items()}


def attn2_layers(variant: str) -> dict[str, int]:
    """{"input_blocks.1.1.transformer_blocks.0.attn2": 320, ...}: the cross-attention layers of the variant."""
    return dict(unet_layout(variant)[1])


SMALL_ATTN2 = attn2_layers("small")  # input_blocks.1.1 (320), input_blocks.3.1 (640), middle_block.1 (640),
#                                      output_blocks.0.1, 1.1 (640), output_blocks.2.1, 3.1 (320)


def lora_state_dict(variant: str) -> dict[str, torch.Tensor]:
    _, widths, dnames = unet_layout(variant)
    sd = {}
    for path, width in widths.items():
        for proj in ("to_k", "to_v"):
            name = "lora_unet_" + (dnames[path] + "." + proj).replace(".", "_")
            sd[name + ".lora_down.weight"] = _randn(name + ".down", (LORA_RANK, CONTEXT_DIM), CONTEXT_DIM ** -0.5)
            # delta W = alpha/rank * up @ down has entries ~0.3x those of W (std 1/sqrt(768))
            sd[name + ".lora_up.weight"] = _randn(name + ".up", (width, LORA_RANK),
                                                  0.3 * LORA_RANK / LORA_ALPHA / LORA_RANK ** 0.5)
            sd[name + ".alpha"] = torch.tensor(LORA_ALPHA)
    return {k: v.to(torch.float16) for k, v in sd.items()}


# -------------------------------------------------------------------------------------------- I/O
def _meta(kind: str, variant: str) -> dict[str, str]:
    return {"generator": "comfyui-perfusion tools/smoke_checkpoint.py", "generator_version": GENERATOR_VERSION,
            "kind": kind, "variant": variant, "seed": str(SEED)}


def _is_current(path: Path, meta: dict[str, str]) -> bool:
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            have = f.metadata() or {}
    except Exception:
        return False
    return all(have.get(k) == v for k, v in meta.items())


def _write(path: Path, build, meta: dict[str, str]) -> Path:
    """Atomic (temp file + rename in the same folder) and skipped when a current file is there."""
    from safetensors.torch import save_file
    if _is_current(path, meta):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(build(), str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check_variant(variant: str) -> None:
    if variant not in UNET_CONFIGS:
        raise ValueError(f"variant must be one of {sorted(UNET_CONFIGS)}, not {variant!r}")


def checkpoint_path(variant: str = "small", out: Path | None = None) -> Path:
    """Path of the variant's checkpoint, generated first if missing (about 5 s small, a minute full)."""
    _check_variant(variant)
    path = Path(out) if out else CACHE_DIR / f"sd15-{variant}-random.safetensors"
    return _write(path, lambda: checkpoint_state_dict(variant), _meta("checkpoint", variant))


def lora_path(variant: str = "small", out: Path | None = None) -> Path:
    """Path of a random LoRA for the variant's attn2 to_k/to_v, generated first if missing."""
    _check_variant(variant)
    path = Path(out) if out else CACHE_DIR / f"sd15-{variant}-random-lora.safetensors"
    return _write(path, lambda: lora_state_dict(variant), _meta("lora", variant))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=sorted(UNET_CONFIGS), default="small")
    ap.add_argument("--out", type=Path,
                    help="checkpoint path (default: .cache/checkpoints/sd15-<variant>-random.safetensors)")
    ap.add_argument("--lora", action="store_true", help="also write the variant's random LoRA next to the cache")
    a = ap.parse_args(argv)
    t = time.perf_counter()
    p = checkpoint_path(a.variant, a.out)
    print(f"{p} ({p.stat().st_size / 2**20:.0f} MiB, {time.perf_counter() - t:.1f} s)")
    if a.lora:
        print(lora_path(a.variant))
    return 0


if __name__ == "__main__":
    sys.exit(main())
