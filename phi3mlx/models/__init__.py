"""Models: one configurable Phi-3 decoder (variants are data, see phi3mlx.config)."""

from ..config import ModelConfig
from .decoder import Model


def build_model(cfg: ModelConfig) -> Model:
    """Build an uninitialised model for a config."""
    return Model(cfg)


__all__ = ["Model", "ModelConfig", "build_model"]
