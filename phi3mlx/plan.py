"""Will it fit? The largest context each device can hold for a model, and the quantization to choose.

Sizes come from the model's config alone: the model is built lazily (no weight is read or computed),
cast to float16 and quantized the way ``convert -q`` does (Linear and Embedding layers whose input
splits into whole groups; the vision tower stays float), and its parameter bytes are summed. Per
device, the budget must hold

* the weights;
* the KV cache: ``2 x layers x KV heads x head_dim`` values per token (float16, or ``--kv-bits`` 4/8
  with a float16 scale and bias per group of 64, or of 32 for head size 96);
* the activations of one prefill chunk of ``c`` tokens: ``c x (4 x hidden + 3 x intermediate)`` float16
  values for a layer's working set plus ``c x vocab`` float32 logits.

Budgets are what an app can use, not the installed memory: on a Mac about two thirds to three
quarters of RAM (MLX's default wired limit), on an iPhone the app limit with the increased-memory-limit
entitlement. They are estimates; ``--budget-gb`` overrides them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ModelConfig
from .errors import Phi3MLXError
from .models import build_model
from .quant import quantize_model

# name: (label, GB an app can use for weights + KV cache + activations)
DEVICES = {
    "iphone-6gb": ("iPhone, 6 GB", 3.0),
    "iphone-8gb": ("iPhone, 8 GB", 4.0),
    "iphone-12gb": ("iPhone, 12 GB", 6.0),
    "mac-8gb": ("Mac, 8 GB", 5.3),
    "mac-16gb": ("Mac, 16 GB", 10.7),
    "mac-24gb": ("Mac, 24 GB", 16.0),
    "mac-32gb": ("Mac, 32 GB", 24.0),
    "mac-64gb": ("Mac, 64 GB", 48.0),
}
# Tried from the most faithful to the smallest; the first that fits with MIN_CONTEXT tokens is chosen.
WEIGHT_FORMATS = (("float16", None), ("8-bit", 8), ("4-bit", 4))
MIN_CONTEXT = 2048
# model types an iPhone app can load: mlx-swift-lm's LLM registry has "phi3" (Phi3.swift) and "phimoe"
# (PhiMoE.swift); it has no Phi-3-small, and no Phi-3-vision in its VLM registry.
SWIFT_MODEL_TYPES = ("phi3", "phimoe")


def check_device(name: str) -> None:
    if name not in DEVICES:
        raise Phi3MLXError(f"unknown device '{name}' (known: {', '.join(DEVICES)})")


def swift_problem(model_type: str) -> Optional[str]:
    """Why an iPhone (MLX Swift) cannot load this model type, or None."""
    if model_type in SWIFT_MODEL_TYPES:
        return None
    what = {"phi3small": "Phi-3-small", "phi3_v": "Phi-3-vision"}.get(model_type, model_type)
    return (f"{what} has no MLX Swift implementation (mlx-swift-lm loads phi3 and phimoe), so an iPhone app cannot "
            "load it; convert for a Mac target instead")


def weight_bytes_for(cfg: ModelConfig, bits: Optional[int], group_size: int = 64) -> int:
    """Bytes of the weights as ``convert`` writes them: float16, or quantized (vision tower float)."""
    model = build_model(cfg)  # lazy: nothing is allocated or computed
    model.set_dtype(mx.float16)
    if bits is not None:
        quantize_model(model, bits, group_size, ("model.vision_embed_tokens",) if model.takes_images else ())
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def kv_bytes_per_token(cfg: ModelConfig, kv_bits: Optional[int] = None) -> float:
    """KV-cache bytes per token: float16, or ``kv_bits`` with a float16 scale and bias per group (64, or
    32 where the head size is not a multiple of 64: the group the cache itself chooses)."""
    values = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
    group = 64 if cfg.head_dim % 64 == 0 else 32
    return values * (2.0 if kv_bits is None else kv_bits / 8 + 4 / group)


def activation_bytes(cfg: ModelConfig, chunk: int) -> int:
    inter = cfg.intermediate_size or 4 * cfg.hidden_size
    return int(chunk * (4 * cfg.hidden_size + 3 * inter) * 2 + chunk * cfg.vocab_size * 4)


@dataclass
class Fit:
    device: str
    budget_gb: float
    choice: Optional[str]  # the weight format chosen ("float16", "8-bit", "4-bit"), None if nothing fits
    weights_gb: float  # of the choice (of 4-bit when nothing fits)
    context: int  # largest context at the choice (0 if nothing fits)
    context_4bit: int  # largest context with 4-bit weights
    context_4bit_kv4: int  # ... and a 4-bit KV cache


def max_context(budget: float, weights: int, act: int, per_token: float, limit: int) -> int:
    room = budget - weights - act
    return max(0, min(limit, int(room // per_token))) if room > 0 else 0


def plan(cfg: ModelConfig, devices=None, chunk: int = 512, kv_bits: Optional[int] = None, min_context: int = MIN_CONTEXT,
         budget_gb: Optional[float] = None) -> list[Fit]:
    """One Fit per device (all of DEVICES by default)."""
    names = list(devices or DEVICES)
    for n in names:
        check_device(n)
    sizes = {label: weight_bytes_for(cfg, bits) for label, bits in WEIGHT_FORMATS}
    act = activation_bytes(cfg, chunk)
    limit = cfg.context_length
    per_token = kv_bytes_per_token(cfg, kv_bits)
    out = []
    for n in names:
        budget = (budget_gb if budget_gb is not None else DEVICES[n][1]) * 1e9
        choice, ctx = None, 0
        for label, _ in WEIGHT_FORMATS:
            c = max_context(budget, sizes[label], act, per_token, limit)
            if c >= min(min_context, limit):
                choice, ctx = label, c
                break
        out.append(Fit(n, budget / 1e9, choice, sizes[choice or "4-bit"] / 1e9, ctx,
                       max_context(budget, sizes["4-bit"], act, kv_bytes_per_token(cfg, kv_bits), limit),
                       max_context(budget, sizes["4-bit"], act, kv_bytes_per_token(cfg, 4), limit)))
    return out


def fit_for(cfg: ModelConfig, device: str, chunk: int = 512, min_context: int = MIN_CONTEXT) -> Fit:
    return plan(cfg, [device], chunk, None, min_context)[0]
