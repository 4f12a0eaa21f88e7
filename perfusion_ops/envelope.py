"""What a Perfusion concept may be: the one definition that concept files (``concept_file.py``) and concepts in memory
(``Concept.validate``) are checked against. Anything outside it is refused with a :class:`ConceptError` saying
which rule it breaks; nothing is cast or cut silently.

A concept file is a safetensors file (never a pickle) of at most ``MAX_FILE_BYTES``, whose JSON header is at most
``MAX_HEADER_BYTES`` and lists at most ``MAX_TENSORS`` tensors (the size is checked before the header is parsed,
the count before any tensor is, so a hostile file costs no parsing time), with metadata ``format = FORMAT`` and
``format_version`` an integer from 1 to ``FORMAT_VERSION`` (a newer file asks for an update of the pack). Its
tensors are ``float16``, ``bfloat16`` or ``float32`` (``TENSOR_DTYPES``; integers and booleans are not concept data)
and are exactly:

- ``embedding`` (N, T): the trigger word's learned vector(s), 1 ≤ N ≤ ``MAX_VECTORS``, 1 ≤ T ≤ ``MAX_WIDTH``;
- ``i``, ``q``, ``e_sup`` (D,): the text width D of a known encoder (768 CLIP-L, 1024 OpenCLIP-H, 1280 CLIP-G), or
  1 ≤ D ≤ ``MAX_WIDTH`` for another;
- ``o_v.<layer>`` (out,), 1 ≤ out ≤ ``MAX_WIDTH``, for 1 to ``MAX_LAYERS`` cross-attention layers, and for a
  trained-K concept ``o_k.<layer>`` of the same layers and widths.

A file of format version 2 or later may also carry the *training state* that resuming needs (``-checkpoint`` files
write it; a finished concept does not): metadata ``state.step``, the optimizer steps taken, 1 ≤ step ≤ ``MAX_STEPS``,
and the tensors

- ``state.losses`` (n,), 1 ≤ n ≤ step: the losses of the last n steps, those since the optimizer started (finite);
- ``state.adam.<name>`` (2, *shape): Adam's first and second moments (the second ≥ 0) of each learned tensor
  ``<name>`` (``embedding``, ``o_v.<layer>``, ``o_k.<layer>``) of the file's shape, one for each and no other.

A concept without a state is written as format version 1, so packs that read only version 1 still load it.
Its metadata ``gate_window``, 0 to ``MAX_WINDOW``, says whether it was trained with first-opening gates (absent: 0).

A concept of SD1.5 holds 20 tensors (36 with trained K) in about 30 KB, and with its training state (float32) 38 in
about 170 KB; the bounds leave room for larger model families (SDXL: 70 layers) while refusing files that could only
be mistakes or attacks.
"""
from __future__ import annotations

import torch

FORMAT = "perfusion-concept"
FORMAT_VERSION = 2  # the newest version this code writes (2: the optional training state); it reads 1..FORMAT_VERSION
STATE_SINCE = 2  # the first format version that may carry a training state
MAX_FILE_BYTES = 32 * 2**20  # a concept is tens of KB (the largest, with state, 25 MB); refuse a checkpoint or LoRA
TENSOR_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}  # safetensors names
MAX_VECTORS = 8  # Perfusion learns one vector per trigger; a few leave room for multi-vector triggers
MAX_LAYERS = 128  # cross-attention layers: 16 in SD1.x/2.x, 70 in SDXL
MAX_WIDTH = 8192  # of a text encoding, a token embedding or a layer's output
MAX_STEPS = 10_000  # optimizer steps of one concept, resumed runs included (Train's steps widget)
MAX_WINDOW = 4096  # tokens of a text encoder's window for first-opening gates (CLIP: 77); 0 is Eq. 3's gate
MAX_TENSORS = 4 + 2 * MAX_LAYERS + 2 + 2 * MAX_LAYERS  # embedding, i, q, e_sup, o_v/o_k per layer; state: losses,
#   moments of the embedding and of each o_v/o_k
MAX_HEADER_BYTES = 128 * 2**10  # the largest concept above needs about 75 KB (SD1.5: 3 KB, 8 KB with state)
