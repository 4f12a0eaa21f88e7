"""Procedural checks on generated images, and the world's own feature extractor.

Segmentation: the background is the median colour of the border pixels; object pixels differ from it by more
than 60/255 in RGB distance. From the mask: centroid (position), area (size), and the majority colour of the
object pixels (each pixel's nearest world colour or its dark shade), and the shape by template matching
(:func:`template_shape`). Size and texture come from :class:`FeatureNet`, a small CNN trained on the renderer's own
labels; its pooled 64-d features give a CLIP-I-like cosine similarity (reported, but dominated by background and
size). Visual fidelity proper is :func:`colour_fidelity`, a direct pixel statistic of the object's colour make-up.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import render as R

_WORLD = np.array(list(R.COLOURS.values()), np.float32)
_SHADES = np.concatenate([_WORLD, 0.45 * _WORLD])  # plain and dark (stripe/dot) shades
_BG = np.array(list(R.BACKGROUNDS.values()), np.float32)
_POS = np.array(list(R.POSITIONS.values()), np.float32)
COLOUR_NAMES, BACKGROUND_NAMES, POSITION_NAMES = list(R.COLOURS), list(R.BACKGROUNDS), list(R.POSITIONS)
SMALL_AREA = 125  # px: small objects cover ~70, large ~180-200


def to_rgb255(images: Tensor) -> np.ndarray:
    """(B, 3, 32, 32) in [-1, 1] → (B, 32, 32, 3) float in 0..255."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).cpu().numpy()


def analyse(images: Tensor) -> list[dict]:
    """Per image: background name, object mask area, centroid, position, colour name (None without object)."""
    out = []
    for img in to_rgb255(images):
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        bg = np.median(border, 0)
        mask = np.linalg.norm(img - bg, axis=-1) > 60
        info = {"background": BACKGROUND_NAMES[int(np.argmin(np.linalg.norm(_BG - bg, axis=1)))],
                "area": int(mask.sum()), "mask": mask, "colour": None, "position": None, "centroid": None}
        if mask.sum() >= 8:
            ys, xs = np.nonzero(mask)
            c = np.array([xs.mean() + 0.5, ys.mean() + 0.5], np.float32)
            info["centroid"] = c
            info["position"] = POSITION_NAMES[int(np.argmin(np.linalg.norm(_POS - c, axis=1)))]
            pixels = img[mask]
            nearest = np.argmin(((pixels[:, None] - _SHADES[None]) ** 2).sum(-1), 1) % len(_WORLD)
            info["colour"] = COLOUR_NAMES[int(np.bincount(nearest, minlength=len(_WORLD)).argmax())]
            info["mean_rgb"] = pixels.mean(0)
        out.append(info)
    return out


class FeatureNet(nn.Module):
    """Small CNN: 64-d pooled features, heads for shape, texture, size, background and object RGB."""

    HEADS = {"shape": len(R.SHAPES), "texture": len(R.TEXTURES), "size": len(R.SIZES),
             "background": len(R.BACKGROUNDS), "rgb": 3}

    def __init__(self):
        super().__init__()
        block = lambda cin, cout, stride: [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.body = nn.Sequential(*block(3, 32, 1), *block(32, 48, 2), *block(48, 64, 2), *block(64, 96, 1))
        self.project = nn.Linear(96, 64)
        self.heads = nn.ModuleDict({name: nn.Linear(64, n) for name, n in self.HEADS.items()})

    def features(self, images: Tensor) -> Tensor:
        return F.silu(self.project(self.body(images).mean((2, 3))))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        f = self.features(images)
        return {name: head(f) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, list[str]]:
        out = self(images)
        names = {"shape": R.SHAPES, "texture": R.TEXTURES, "size": list(R.SIZES), "background": list(R.BACKGROUNDS)}
        return {k: [v[i] for i in out[k].argmax(1).tolist()] for k, v in names.items()}


def feature_batch(rng, nprng: np.random.Generator, n: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Training data for FeatureNet: single objects of world or arbitrary colours, noise, some outlined."""
    scenes, labels = [], {k: [] for k in FeatureNet.HEADS}
    for _ in range(n):
        if rng.random() < 0.5:
            colour = rng.choice(list(R.COLOURS))
        else:
            colour = "rgb:" + ",".join(str(rng.randrange(256)) for _ in range(3))
        thing = R.Thing(rng.choice(R.SHAPES), colour, rng.choice(R.TEXTURES), rng.choice(list(R.SIZES)),
                        rng.choice(list(R.POSITIONS)))
        scene = R.Scene((thing,), rng.choice(list(R.BACKGROUNDS)))
        scenes.append(scene)
        labels["shape"].append(R.SHAPES.index(thing.shape))
        labels["texture"].append(R.TEXTURES.index(thing.texture))
        labels["size"].append(list(R.SIZES).index(thing.size))
        labels["background"].append(list(R.BACKGROUNDS).index(scene.background))
        labels["rgb"].append([v / 127.5 - 1 for v in thing.rgb()])
    images = np.stack([R.render(s, nprng, 2.5, outline=rng.random() < 0.3)[0] for s in scenes])
    images = torch.from_numpy(images)
    images = images + torch.randn(images.shape, generator=torch.Generator().manual_seed(rng.randrange(2**31))) \
        * torch.rand(n, 1, 1, 1, generator=torch.Generator().manual_seed(rng.randrange(2**31))) * 0.12
    return images.clamp(-1, 1), {k: torch.tensor(v) for k, v in labels.items()}


def train_features(steps: int, seed: int, log=print) -> FeatureNet:
    import random
    torch.manual_seed(seed)
    rng, nprng = random.Random(seed), np.random.default_rng(seed)
    net = FeatureNet()
    opt = torch.optim.AdamW(net.parameters(), 2e-3)
    for step in range(1, steps + 1):
        images, labels = feature_batch(rng, nprng, 64)
        out = net(images)
        loss = sum(F.cross_entropy(out[k], labels[k]) for k in ("shape", "texture", "size", "background"))
        loss = loss + 4 * F.mse_loss(out["rgb"], labels["rgb"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log(f"  features step {step}/{steps} loss {float(loss.detach()):.3f}")
    return net.eval().requires_grad_(False)


def cosine_fidelity(features: Tensor, references: Tensor) -> Tensor:
    """Per generated image: mean cosine similarity of its features to every reference's (like CLIP-I)."""
    a, b = F.normalize(features, dim=-1), F.normalize(references, dim=-1)
    return (a @ b.T).mean(1)


_AREA_PER_R2 = {"circle": np.pi, "square": (2 * 0.82) ** 2, "diamond": 2 * 1.15 ** 2, "triangle": 1.75}


def template_shape(mask: np.ndarray) -> str | None:
    """Procedural shape check: the shape whose ideal mask (same area, at the centroid) overlaps ``mask`` best (IoU)."""
    area = mask.sum()
    if area < 8:
        return None
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    best, best_iou = None, -1.0
    for shape in R.SHAPES:
        r = float(np.sqrt(area / _AREA_PER_R2[shape]))
        # a triangle's centroid lies below its bounding-box centre (apex up): shift the template accordingly
        dy = 0.25 * r if shape == "triangle" else 0.0
        ideal = R.shape_mask(shape, cx, cy - dy, r).reshape(R.SIZE, 2, R.SIZE, 2).mean((1, 3)) > 0.5
        iou = (ideal & mask).sum() / max(1, (ideal | mask).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


# -- object colour fidelity: a direct pixel statistic ------------------------------------------------------------
_OBJECT_BINS = {**R.COLOURS, **R.NOVEL_COLOURS}
_BIN_RGB = np.array([c for rgb in _OBJECT_BINS.values() for c in (rgb, tuple(0.45 * v for v in rgb))], np.float32)
_NEUTRAL = np.array([*R.BACKGROUNDS.values(), R.OUTLINE], np.float32)


def colour_histograms(images: Tensor) -> np.ndarray:
    """Per image, the normalised histogram of its object pixels over object colours and their dark shades.

    Every pixel goes to its nearest colour among the object colours (world and novel, plain and dark shade), the
    three backgrounds and the outline; background and outline pixels are dropped. An image without object
    pixels gets an all-zero histogram."""
    rgb = to_rgb255(images).reshape(len(images), -1, 3)
    table = np.concatenate([_BIN_RGB, _NEUTRAL])
    nearest = np.argmin(((rgb[..., None, :] - table) ** 2).sum(-1), -1)
    hists = np.stack([np.bincount(n[n < len(_BIN_RGB)], minlength=len(_BIN_RGB)) for n in nearest]).astype(np.float32)
    return hists / np.maximum(1.0, hists.sum(1, keepdims=True))


def colour_fidelity(images: Tensor, references: Tensor) -> np.ndarray:
    """Per generated image: histogram intersection of its object colours with the references' mean (0..1)."""
    ref = colour_histograms(references).mean(0)
    return np.minimum(colour_histograms(images), ref).sum(1)


# -- style of the fine-tuned world model: the outline ------------------------------------------------------------
def outline_score(images: Tensor) -> np.ndarray:
    """Per image, the fraction of the object's boundary band (its mask's edge, two pixels either side) nearer the
    outline colour (``render.OUTLINE``) than to the background and to the object's median colour and its dark and
    light shades (stripes, dots): ~0 for the base world's objects, high for the fine-tuned copy's outlined ones."""
    from scipy.ndimage import binary_dilation, binary_erosion
    scores = []
    for img, info in zip(to_rgb255(images), analyse(images)):
        mask = info["mask"]
        if info["area"] < 8:
            scores.append(0.0)
            continue
        band = binary_dilation(mask, iterations=2) & ~binary_erosion(mask, iterations=2)
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        median = np.median(img[mask], 0)
        options = np.stack([np.array(R.OUTLINE, np.float32), np.median(border, 0), median, 0.45 * median,
                            np.minimum(255, median / 0.45)])
        nearest = np.argmin(np.linalg.norm(img[band][:, None] - options, axis=-1), 1)
        scores.append(float((nearest == 0).mean()))
    return np.array(scores, np.float32)
