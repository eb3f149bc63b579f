"""Quantization settings and memory estimates (the "will it fit on my Mac / iPhone" question)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .config import ModelConfig
from .errors import Phi3MLXError

VALID_BITS = (4, 8)
VALID_GROUP_SIZES = (32, 64, 128)

# Rough memory a single process can use for weights + cache (GB). Apple GPUs may wire about two
# thirds to three quarters of unified memory by default; iOS apps get far less than the device RAM.
BUDGETS_GB = {
    "Mac 8 GB": 5.3,
    "Mac 16 GB": 10.7,
    "Mac 32 GB": 24.0,
    "iPhone 8 GB (app limit)": 4.0,
    "iPhone 6 GB (app limit)": 3.0,
}


def check_quant_args(bits: int, group_size: int) -> None:
    problems = []
    if bits not in VALID_BITS:
        problems.append(f"--q-bits must be one of {', '.join(map(str, VALID_BITS))}, got {bits}")
    if group_size not in VALID_GROUP_SIZES:
        problems.append(f"--q-group-size must be one of {', '.join(map(str, VALID_GROUP_SIZES))}, got {group_size}")
    if problems:
        raise Phi3MLXError.many(problems)


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 64, keep_float=()) -> dict:
    """Quantize Linear and Embedding layers in place; return the config.json ``quantization`` block.

    ``keep_float`` lists module paths (e.g. "lm_head", "model.embed_tokens") left in float, each with
    everything below it (``"model.vision_embed_tokens"``: the whole vision tower and projector); they
    are recorded as ``"path": false`` overrides, the form mlx-lm and MLX Swift read.
    """
    check_quant_args(bits, group_size)
    keep = set(keep_float)

    def predicate(path, module):
        if path in keep or any(path.startswith(k + ".") for k in keep) or not hasattr(module, "to_quantized"):
            return False
        # The last axis must split into whole groups.
        return module.weight.shape[-1] % group_size == 0

    skipped = []

    def pred_record(path, module):
        ok = predicate(path, module)
        if not ok and hasattr(module, "to_quantized"):
            skipped.append(path)
        return ok

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=pred_record)
    block = {"group_size": group_size, "bits": bits}
    for p in sorted(skipped):
        block[p] = False
    return block


class CpuPrefillQuantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear that, on the CPU backend, multiplies many rows through float32.

    MLX's CPU quantized matmul is fast for one row (decoding) but slow for many (prefill); from
    ``MIN_ROWS`` rows on, dequantizing the weight and using the float matmul is far faster
    (measured about 10x for prompt processing on a phi-3-mini-shaped 4-bit model). Results equal the
    quantized product up to float rounding. On a GPU the stock path is always used.
    """

    MIN_ROWS = 16

    def __call__(self, x):
        if x.size // x.shape[-1] >= self.MIN_ROWS and mx.default_device() == mx.cpu:
            w = mx.dequantize(self["weight"], self["scales"], self.get("biases"), group_size=self.group_size,
                              bits=self.bits, mode=self.mode, dtype=mx.float32)
            y = (x.astype(mx.float32) @ w.T).astype(x.dtype)
            return y + self["bias"] if "bias" in self else y
        return super().__call__(x)


def use_cpu_prefill_path(model: nn.Module) -> None:
    """Switch every affine QuantizedLinear to ``CpuPrefillQuantizedLinear`` (same parameters)."""
    for _, m in model.named_modules():
        if type(m) is nn.QuantizedLinear and getattr(m, "mode", "affine") == "affine":
            m.__class__ = CpuPrefillQuantizedLinear


def dequantize(model: nn.Module) -> nn.Module:
    """Replace quantized layers by float ones holding the dequantized weights."""
    # lazy: importing mlx_lm takes seconds (it pulls in transformers) and loading a model does not need it
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    swaps = []
    for name, m in model.named_modules():
        if isinstance(m, QuantizedSwitchLinear):  # stacked experts (phimoe)
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
            sl = SwitchLinear(w.shape[2], w.shape[1], w.shape[0], bias="bias" in m)
            sl.weight = w
            if "bias" in m:
                sl.bias = m.bias
            swaps.append((name, sl))
            continue
        if isinstance(m, nn.QuantizedLinear):
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
            lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            lin.weight = w
            if "bias" in m:
                lin.bias = m.bias
            swaps.append((name, lin))
        elif isinstance(m, nn.QuantizedEmbedding):
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
            emb = nn.Embedding(w.shape[0], w.shape[1])
            emb.weight = w
            swaps.append((name, emb))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return model


def weight_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def kv_cache_bytes(cfg: ModelConfig, context: int, bytes_per_value: float = 2.0) -> int:
    """Keys and values for every layer at ``context`` tokens (float16 by default)."""
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
    return int(per_token * context * bytes_per_value)


@dataclass
class MemoryEstimate:
    weights: int
    kv_cache: int
    context: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache

    def lines(self) -> list[str]:
        gb = 1e9
        out = [
            f"weights {self.weights / gb:.2f} GB + KV cache at {self.context} tokens {self.kv_cache / gb:.2f} GB "
            f"= {self.total / gb:.2f} GB (estimate)"
        ]
        fits = [name for name, b in BUDGETS_GB.items() if self.total / gb <= b]
        out.append("fits: " + (", ".join(fits) if fits else "none of " + ", ".join(BUDGETS_GB)))
        return out


def estimate_memory(model: nn.Module, cfg: ModelConfig, context: int | None = None, kv_bytes: float = 2.0) -> MemoryEstimate:
    context = context or min(cfg.context_length, 4096)
    return MemoryEstimate(weight_bytes(model), kv_cache_bytes(cfg, context, kv_bytes), context)
