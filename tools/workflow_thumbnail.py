"""A thumbnail of a UI-format workflow: its groups, nodes and links drawn as the canvas shows them, in miniature.

Current ComfyUI's template browser shows ``<name>.jpg`` beside each ``example_workflows/<name>.json``. Drawing it
from the file (rather than screenshotting a browser) makes it reproducible, so the tests can check it is current.
"""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

WIDTH = 768  # px; the height follows the graph's aspect ratio, within HEIGHTS
HEIGHTS = (300, 576)
TITLE_H = 30  # litegraph's title bar, above a node's pos (its size excludes it)
BACKGROUND, NODE, TITLE, TEXT, FRAME = "#202020", "#353535", "#222222", "#dddddd", "#555555"
LINK_COLORS = {"MODEL": "#b39ddb", "CLIP": "#ffd500", "VAE": "#ff6e6e", "CONDITIONING": "#ffa931",
               "LATENT": "#ff9cf9", "IMAGE": "#64b5f6", "MASK": "#81c784", "PERFUSION_CONCEPT": "#5ad1c8"}
PACK_COLOR = "#2b5b57"  # the pack's nodes stand out by their title bar


def thumbnail(workflow: dict) -> Image.Image:
    """The workflow drawn to scale, with node titles where they fit."""
    nodes = workflow["nodes"]
    boxes = {n["id"]: (n["pos"][0], n["pos"][1] - TITLE_H, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in nodes}
    frames = [g["bounding"] for g in workflow.get("groups", [])]
    x0 = min([b[0] for b in boxes.values()] + [f[0] for f in frames]) - 20
    y0 = min([b[1] for b in boxes.values()] + [f[1] for f in frames]) - 20
    x1 = max([b[2] for b in boxes.values()] + [f[0] + f[2] for f in frames]) + 20
    y1 = max([b[3] for b in boxes.values()] + [f[1] + f[3] for f in frames]) + 20
    scale = WIDTH / (x1 - x0)
    height = int(min(max((y1 - y0) * scale, HEIGHTS[0]), HEIGHTS[1]))
    scale = min(scale, height / (y1 - y0))
    dx, dy = (WIDTH - (x1 - x0) * scale) / 2, (height - (y1 - y0) * scale) / 2

    def at(x, y):
        return (dx + (x - x0) * scale, dy + (y - y0) * scale)

    image = Image.new("RGB", (WIDTH, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(9, round(22 * scale)))
    for group in workflow.get("groups", []):
        x, y, w, h = group["bounding"]
        draw.rectangle([*at(x, y), *at(x + w, y + h)], outline=group.get("color", FRAME), width=2)
    by_id = {n["id"]: n for n in nodes}
    for _, origin, slot, target, target_slot, kind in workflow["links"]:
        start = at(boxes[origin][2], by_id[origin]["pos"][1] + 10 + 20 * slot)
        end = at(boxes[target][0], by_id[target]["pos"][1] + 10 + 20 * target_slot)
        middle = ((start[0] + end[0]) / 2, start[1]), ((start[0] + end[0]) / 2, end[1])
        draw.line([start, *middle, end], fill=LINK_COLORS.get(kind, "#9a9a9a"), width=2)
    for node in nodes:
        left, top, right, bottom = (*at(*boxes[node["id"]][:2]), *at(*boxes[node["id"]][2:]))
        body = node.get("bgcolor", NODE)
        bar = PACK_COLOR if node["type"].startswith("Perfusion") else node.get("color", TITLE)
        draw.rounded_rectangle([left, top, right, bottom], radius=4, fill=body, outline=FRAME)
        draw.rectangle([left, top, right, top + TITLE_H * scale], fill=bar)
        title = (node.get("title") or node["type"]).replace("β", "beta")  # the built-in font has no Greek
        while title and draw.textlength(title, font=font) > right - left - 6:
            title = title[:-1]
        draw.text((left + 3, top + 1), title, fill=TEXT, font=font)
    return image
