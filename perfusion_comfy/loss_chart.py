"""A loss curve as a ComfyUI IMAGE, drawn with PIL (no plotting dependency), and the node's live preview."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from .previews import side_by_side

WIDTH, HEIGHT = 512, 256


def loss_chart(losses: list[float], first: int = 1) -> torch.Tensor:
    """``(1, H, W, 3)`` float IMAGE of the per-step loss (raw in grey, a running mean in blue); ``losses[0]`` is the
    loss of step ``first`` (later than 1 in a run resumed from a finished concept)."""
    return torch.from_numpy(np.asarray(loss_chart_image(losses, first), dtype=np.float32) / 255.0)[None]


def loss_chart_image(losses: list[float], first: int = 1, width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    """The loss chart as a PIL image (also part of the node's live preview while training)."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    pad = 28
    values = np.asarray(losses, dtype=np.float64)
    if values.size:
        low, high = float(values.min()), float(values.max())
        span = high - low or 1.0
        smooth = np.convolve(values, np.ones(min(10, values.size)) / min(10, values.size), mode="valid")

        def points(series, offset):
            xs = pad + (np.arange(series.size) + offset) / max(values.size - 1, 1) * (width - 2 * pad)
            ys = height - pad - (series - low) / span * (height - 2 * pad)
            return list(zip(xs.tolist(), ys.tolist()))

        draw.line(points(values, 0), fill=(170, 170, 170), width=1)
        draw.line(points(smooth, values.size - smooth.size), fill=(40, 90, 200), width=2)
        steps = f"steps {values.size}" if first == 1 else f"steps {first}-{first + values.size - 1}"
        draw.text((pad, 4), f"loss  first {values[0]:.4f}  last {values[-1]:.4f}  {steps}", fill="black")
        draw.text((4, pad), f"{high:.3g}", fill="black")
        draw.text((4, height - pad - 10), f"{low:.3g}", fill="black")
    draw.rectangle([pad, pad, width - pad, height - pad], outline=(0, 0, 0))
    return image


def live_preview(losses: list[float], first: int = 1, renders: list[Image.Image] = ()) -> Image.Image:
    """The node's live preview: the loss chart, with the latest preview renders in a row above it when there are
    any."""
    chart = loss_chart_image(losses, first)
    if not renders:
        return chart
    row = side_by_side(renders, min(HEIGHT, WIDTH // len(renders)))  # square renders: at most the chart's width
    image = Image.new("RGB", (WIDTH, row.height + HEIGHT), "white")
    image.paste(row, ((WIDTH - row.width) // 2, 0))
    image.paste(chart, (0, row.height))
    return image
