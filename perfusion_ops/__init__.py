"""Host-agnostic Perfusion core (pure torch + safetensors): the gated rank-1 edit, concept files, covariance.

Importing this package never imports ComfyUI; the ComfyUI adapter lives in ``perfusion_comfy/``."""
from .concept import Concept, ConceptError, check_gate
from .concept_file import export_embedding, load_concept, save_concept
from .covariance import CovarianceEstimator, cached_covariance, estimate_covariance, fingerprint, ridge_inverse
from .projection import EditedProjection, SharedContext
from .stack import ConceptStack, first_opening, gate, similarity

__all__ = [
    "Concept", "ConceptError", "ConceptStack", "CovarianceEstimator", "EditedProjection", "SharedContext",
    "cached_covariance", "check_gate", "estimate_covariance", "export_embedding", "fingerprint", "first_opening",
    "gate", "load_concept", "ridge_inverse", "save_concept", "similarity",
]
