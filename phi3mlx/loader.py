"""load(): a model folder (ours, mlx-lm's or a Hugging Face one) or hub id -> (model, tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .adapters import load_adapters
from .config import ModelConfig, read_config
from .hub import resolve
from .models import Model, build_model, parse_config
from .models.maps import hf_to_mlx
from .processor import Processor, ProcessorSettings
from .quant import use_cpu_prefill_path
from .tokenizer import BaseTokenizer, load_tokenizer
from .weights import check_weights, read_weights


def apply_quantization(model: nn.Module, quant: dict, weights: dict) -> None:
    """Swap Linear/Embedding layers for quantized ones as a folder's ``quantization`` block says.

    Exactly the layers whose ``.scales`` are present in ``weights`` are quantized, which also covers
    per-layer overrides such as a float ``lm_head``.
    """
    group_size, bits = int(quant.get("group_size", 64)), int(quant.get("bits", 4))

    def predicate(path, module):
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    use_cpu_prefill_path(model)


def load_model(path: Path, strict: bool = True) -> Tuple[Model, ModelConfig]:
    raw = read_config(path)
    cfg = parse_config(raw, source=str(Path(path) / "config.json"))
    model = build_model(cfg)
    weights = hf_to_mlx(cfg.model_type, read_weights(Path(path)), cfg.tie_word_embeddings)
    if cfg.quantization or any(k.endswith(".scales") for k in weights):
        apply_quantization(model, cfg.quantization or {}, weights)
    if strict:
        check_weights(model, weights, str(path))
    model.load_weights(list(weights.items()), strict=strict)
    mx.eval(model.parameters())
    model.eval()
    return model, cfg


def load_processor(path: Path, model: Model, cfg: ModelConfig) -> BaseTokenizer:
    """The folder's tokenizer; for a vision model, its processor (which is also its tokenizer)."""
    tokenizer = load_tokenizer(path, cfg.raw)
    if model.takes_images:
        return Processor(tokenizer, ProcessorSettings.read(path), cfg.section.grid)
    return tokenizer


def load(path_or_hub_id, adapter_path: Optional[str] = None) -> Tuple[Model, BaseTokenizer]:
    """Load a model and its tokenizer from a local folder or a Hugging Face Hub id.

    For the vision models (phi3_v) the second value is a ``Processor``: ``processor(text=...,
    images=[...])`` gives the model's inputs, and it works as the text tokenizer everywhere."""
    path = resolve(path_or_hub_id)
    model, cfg = load_model(path)
    tokenizer = load_processor(path, model, cfg)
    if adapter_path is not None:  # unfused: the adapters run beside the frozen base layers
        load_adapters(model, adapter_path)
        model.eval()
    return model, tokenizer
