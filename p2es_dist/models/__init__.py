"""Models: the P2Es diffusion teacher, its baselines and the diagnostic classifier."""

from p2es_dist.models.base import Batch, GenerationOptions, TranslationModel
from p2es_dist.models.registry import build_model, model_names, register

__all__ = ["Batch", "GenerationOptions", "TranslationModel", "build_model", "model_names", "register"]
