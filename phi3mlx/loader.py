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


def load(path_or_hub_id, adapter_path: Optional[str] = None, cpu_layout: bool = True
         ) -> Tuple[Model, BaseTokenizer]:
    """Load a model and its tokenizer from a local folder or a Hugging Face Hub id.

    For the vision models (phi3_v) the second value is a ``Processor``: ``processor(text=...,
    images=[...])`` gives the model's inputs, and it works as the text tokenizer everywhere.
    ``cpu_layout``: on the CPU backend, store float32 projection weights in the layout the CPU's
    matrix routines read fastest (``use_cpu_matmul_layout``); training asks for False."""
    path = resolve(path_or_hub_id)
    model, cfg = load_model(path)
    tokenizer = load_processor(path, model, cfg)
    if adapter_path is not None:  # unfused: the adapters run beside the frozen base layers
        load_adapters(model, adapter_path)
        model.eval()
    if cpu_layout and mx.default_device() == mx.cpu:
        use_cpu_matmul_layout(model)
    return model, tokenizer


def use_cpu_matmul_layout(model: nn.Module) -> int:
    """Keep every float32 ``nn.Linear`` weight (and a tied embedding, which is also the output
    projection) in column-major memory: the same (out, in) array with the same values and names, whose
    transpose ``x @ W.T`` now reads as a plain row-major matrix. MLX's CPU backend hands that product
    to BLAS, and both the bundled BLAS and OpenBLAS multiply a row-major right operand about twice as
    fast for one row (decoding) and 1.3-1.6x for 16 rows as a transposed one (measured on x86-64,
    where the outputs were bit-identical; tests hold them within 1e-5). Half-precision weights are left
    alone (no gain measured, float16 slower). Returns how many weights were changed."""
    layers = [m for _, m in model.named_modules() if type(m) is nn.Linear]
    if getattr(model, "config", None) is not None and model.config.tie_word_embeddings:
        layers.append(model.model.embed_tokens)
    n = 0
    for m in layers:
        if type(m) in (nn.Linear, nn.Embedding) and m.weight.dtype == mx.float32:
            m.weight = mx.contiguous(m.weight.T).T
            n += 1
    mx.eval(model.parameters())
    return n
