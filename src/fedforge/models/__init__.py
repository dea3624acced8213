"""Model registry, the feature-extractor + head split, and model groups (one architecture per client)."""
from .groups import GROUPS, resolve_architectures
from .zoo import MODELS, FedModel, create_model

__all__ = ["FedModel", "GROUPS", "MODELS", "create_model", "resolve_architectures"]
