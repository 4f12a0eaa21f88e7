"""Perfusion in AUTOMATIC1111's stable-diffusion-webui and its Forge fork, from the same core as the ComfyUI nodes.

Host-agnostic parts (pure torch; tested in CI on ComfyUI's real cross-attention modules):

- :mod:`.hooks`     — the edit as forward-pre/forward hook pairs on ``attn2.to_k``/``to_v`` (A1111);
- :mod:`.forge_patches` — the edit as ``attn2_patch`` + ``attn2_replace`` patches on a UnetPatcher clone (Forge);
- :mod:`.keylock`   — the global key lock's K context, found per batch row by value;
- :mod:`.library`   — concept files on disk (``models/perfusion``), names, short hashes;
- :mod:`.activation` — tags + library → the edit, trigger embeddings and key-lock prompts of one generation;
- :mod:`.monitor`   — how far each concept's gate opened (logged after each generation).

Only :mod:`.host` imports the webui (``modules.*``); ``scripts/perfusion_webui.py`` is the webui's entry.
"""
