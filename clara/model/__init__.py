"""The CLaRa model: base + three adapters, compression, generation, differentiable top-k, checkpoints."""

from clara.model.clara_model import ADAPTERS, ClaraModel
from clara.model.memory import Encoded
from clara.model.topk import differentiable_topk, flat_cosine, flat_unit, unit_scores

__all__ = ["ADAPTERS", "ClaraModel", "Encoded", "differentiable_topk", "flat_cosine", "flat_unit", "unit_scores"]
