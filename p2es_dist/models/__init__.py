"""Models: the P2Es diffusion teacher, its baselines and the diagnostic classifier."""

from p2es_dist.models.base import Batch, GenerationOptions, TranslationModel
from p2es_dist.models.registry import ModelSpec, build_model, model_names, parse_model, register

__all__ = ["Batch", "GenerationOptions", "ModelSpec", "TranslationModel", "build_model", "model_names",
           "parse_model", "register"]
