"""TinyWorld: a small procedural text-to-image world in which Perfusion can really learn (issues #6, #16).

``render`` draws 32×32 scenes of shapes with captions; ``clip`` is a tiny CLIP trained here on them (causal text
tower, as SD1.5's CLIP ViT-L/14), ``text`` the shared encoder interface and the pretrained all-MiniLM-L6-v2 (the
earlier, bidirectional variant); ``model`` a small v-prediction UNet with SD1.5's block structure and cross-attention;
``train_world`` trains and caches them; ``host`` adapts the world to the core's TrainingHost and applies concepts;
``measure`` holds the procedural checks, ``stats`` the pooled figures and lock_gain, ``report`` the outputs.
``__main__.py`` is the entry point (``python -m bench.tinyworld``).
"""
