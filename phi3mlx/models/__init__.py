"""Models: one configurable Phi-3 decoder (variants are data, see phi3mlx.config).

Variant modules register their config parser (``phi3mlx.config.register_variant``), their parts
(``decoder.ATTENTIONS`` / ``decoder.MLPS``) and their weight maps (``phi3mlx.convert.maps``) on import.
"""

from ..config import ModelConfig
from .decoder import Model
from . import phi3small, phimoe  # noqa: F401,E402  (registration)


def build_model(cfg: ModelConfig) -> Model:
    """Build an uninitialised model for a config."""
    return Model(cfg)


__all__ = ["Model", "ModelConfig", "build_model"]
