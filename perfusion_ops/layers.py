"""Cross-attention layers of the SD1.5 UNet, by the module paths ComfyUI and the webui's ldm both use."""
from __future__ import annotations

# (block path, inner width): the 16 transformer blocks whose attn2.to_k / attn2.to_v map 768 -> width.
_SD15_BLOCKS = [
    ("input_blocks.1.1", 320), ("input_blocks.2.1", 320),
    ("input_blocks.4.1", 640), ("input_blocks.5.1", 640),
    ("input_blocks.7.1", 1280), ("input_blocks.8.1", 1280),
    ("middle_block.1", 1280),
    ("output_blocks.3.1", 1280), ("output_blocks.4.1", 1280), ("output_blocks.5.1", 1280),
    ("output_blocks.6.1", 640), ("output_blocks.7.1", 640), ("output_blocks.8.1", 640),
    ("output_blocks.9.1", 320), ("output_blocks.10.1", 320), ("output_blocks.11.1", 320),
]
SD15_TEXT_WIDTH = 768
SD15_LAYERS: dict[str, int] = {f"{block}.transformer_blocks.0.attn2": width for block, width in _SD15_BLOCKS}
