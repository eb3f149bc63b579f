"""Models: one configurable Phi-3 decoder; variants are data.

``VARIANTS`` is the one table of supported model types: each names its typed config section (its
own fields, validated when config.json is read) and the parts it plugs into the decoder
(attention projection, mask maker, MLP, head). Weight-name tables live in ``models/maps.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ModelConfig, Phi3Section, Section, read_config
from . import maps
from .decoder import MLP, Model, Parts
from .phi3small import GegeluMLP, GroupedQKV, Phi3SmallSection, blocksparse_layer, mask_dummy_ids
from .phimoe import MOE_ATTR, PhimoeSection, PhimoeSparseMoe, SeparateQKV, head_bias
from .vision import VisionSection, place_rows, vision_part


@dataclass(frozen=True)
class Variant:
    section: type  # a Section dataclass: the variant's own config fields
    parts: Parts


VARIANTS: dict[str, Variant] = {
    "phi3": Variant(Phi3Section, Parts()),
    "phi3small": Variant(Phi3SmallSection, Parts(projection=GroupedQKV, mask_maker=blocksparse_layer, mlp=GegeluMLP,
                                                 logits=mask_dummy_ids)),
    "phimoe": Variant(PhimoeSection, Parts(projection=SeparateQKV, mlp=PhimoeSparseMoe, mlp_attr=MOE_ATTR,
                                           head_bias=head_bias)),
    "phi3_v": Variant(VisionSection, Parts(vision=vision_part)),
}
SECTIONS: dict[str, type] = {name: v.section for name, v in VARIANTS.items()}


def parse_config(raw: dict, source: str = "config.json") -> ModelConfig:
    """A config.json dict -> ModelConfig (every problem named at once in one Phi3MLXError)."""
    return ModelConfig.from_dict(raw, SECTIONS, source=source)


def read_model_config(path: str | Path) -> ModelConfig:
    """``path/config.json`` -> ModelConfig."""
    return parse_config(read_config(path), source=str(Path(path) / "config.json"))


def build_model(cfg: ModelConfig) -> Model:
    """Build an uninitialised model for a config."""
    return Model(cfg, VARIANTS[cfg.model_type].parts)


__all__ = ["MLP", "Model", "ModelConfig", "Parts", "Section", "VARIANTS", "build_model",
           "maps", "parse_config", "place_rows", "read_model_config"]
