"""TinyWorld: a small procedural text-to-image world in which Perfusion can really learn (issue #6).

``render`` draws 32×32 scenes of shapes with captions, ``text`` is the pretrained all-MiniLM-L6-v2 text encoder
(pure torch, offline), ``model`` a small v-prediction UNet with SD1.5's block structure and cross-attention,
``train_world`` trains and caches it, ``host`` adapts it to the core's TrainingHost and applies concepts, and
``measure`` holds the procedural checks. ``bench/tinyworld.py`` is the entry point.
"""
