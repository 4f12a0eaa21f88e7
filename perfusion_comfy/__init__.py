"""ComfyUI adapter: the only package that imports comfy.* (the maths lives in perfusion_ops)."""
from . import folders
from . import routes  # noqa: F401  (GET /perfusion/concept_info, for js/perfusion.js)
from .inference import PerfusionApply, PerfusionExportEmbedding, PerfusionGlobalKeyLock, PerfusionLoadConcept
from .train import PerfusionTrainConcept

folders.register()

NODE_CLASS_MAPPINGS = {
    "PerfusionLoadConcept": PerfusionLoadConcept,
    "PerfusionApply": PerfusionApply,
    "PerfusionGlobalKeyLock": PerfusionGlobalKeyLock,
    "PerfusionExportEmbedding": PerfusionExportEmbedding,
    "PerfusionTrainConcept": PerfusionTrainConcept,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PerfusionLoadConcept": "Perfusion Load Concept",
    "PerfusionApply": "Perfusion Apply (Gated Rank-1)",
    "PerfusionGlobalKeyLock": "Perfusion Global Key Lock",
    "PerfusionExportEmbedding": "Perfusion Export Embedding",
    "PerfusionTrainConcept": "Perfusion Train Concept",
}
