"""The Phi-3 decoder, built from a ModelConfig.

Parameter names equal the Hugging Face checkpoint's (and mlx-lm's for the same model_type):
``model.embed_tokens``, ``model.layers.N.self_attn.qkv_proj``, ``...o_proj``,
``model.layers.N.mlp.gate_up_proj``, ``...down_proj``, ``input_layernorm``,
``post_attention_layernorm``, ``model.norm``, ``lm_head``.

Shapes: B batch, L new tokens, T = offset + L total tokens, H query heads, K kv heads, D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig
from .rope import Rope


@dataclass
class AttentionMask:
    """What every layer needs to mask one forward pass.

    ``mask`` is None, "causal" or a boolean (L, T - kv_start) array (True = attend), or a per-head
    (H, L, T - kv_start) one;
    ``kv_start`` drops cached keys that no query of this pass can see (sliding window).
    """

    mask: Union[None, str, mx.array]
    kv_start: int = 0


def make_mask(offset: int, length: int, window: Optional[int]) -> AttentionMask:
    """Causal mask for queries at positions offset..offset+length-1, optionally windowed.

    A query at position i sees keys j with j <= i and i - j < window (as transformers does).
    """
    total = offset + length
    if window is None or total <= window:
        return AttentionMask("causal" if length > 1 else None)
    kv_start = max(0, offset - window + 1)  # earliest key the first query can see
    if length == 1:
        return AttentionMask(None, kv_start)
    q = mx.arange(offset, total)[:, None]
    k = mx.arange(kv_start, total)[None, :]
    return AttentionMask((k <= q) & (q - k < window), kv_start)


def attend(q: mx.array, k, v, scale: float, mask: AttentionMask, cache=None) -> mx.array:
    """softmax(q k^T * scale + mask) v for float or quantized (tuple) keys and values.

    q: (B, H, L, D); k, v: (B, K, T, D) arrays, or (packed, scales, biases) tuples from a
    quantized KV cache. ``mask.mask`` may also be per head, (H, L, T'). Keys before
    ``mask.kv_start`` are outside every query's window: dropped.
    """
    if not isinstance(k, mx.array):  # (packed, scales, biases): a tuple, or a list from a restored cache
        if mask.kv_start:
            k = tuple(t[:, :, mask.kv_start :] for t in k)
            v = tuple(t[:, :, mask.kv_start :] for t in v)
        return quantized_attention(q, k, v, scale, mask.mask, cache.group_size, cache.bits)
    if mask.kv_start:
        k, v = k[:, :, mask.kv_start :], v[:, :, mask.kv_start :]
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask.mask)


def quantized_attention(q, k: tuple, v: tuple, scale: float, mask, group_size: int, bits: int) -> mx.array:
    """Attention over a quantized KV cache; mask None, "causal", (L, T) or per-head (H, L, T)."""
    B, H, L, D = q.shape
    K = k[0].shape[1]
    G = H // K
    q = (q * scale).reshape(B, K, G, L, D)  # query heads grouped by the KV head they read
    k = tuple(mx.expand_dims(t, 2) for t in k)  # (B, K, 1, T, ...)
    v = tuple(mx.expand_dims(t, 2) for t in v)
    s = mx.quantized_matmul(q, *k, transpose=True, group_size=group_size, bits=bits)  # (B, K, G, L, T)
    if mask is not None:
        T = s.shape[-1]
        if isinstance(mask, str):
            mask = mx.arange(T - L, T)[:, None] >= mx.arange(T)[None]
        elif mask.ndim == 3:
            mask = mask.reshape(K, G, L, T)
        s = mx.where(mask, s, mx.finfo(s.dtype).min)
    p = mx.softmax(s, axis=-1, precise=True)
    o = mx.quantized_matmul(p, *v, transpose=False, group_size=group_size, bits=bits)
    return o.reshape(B, H, L, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        op = (self.n_heads + 2 * self.n_kv) * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, op, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.rope = Rope(cfg.rope, cfg.head_dim)
        self.scale = (self.head_dim**-0.5 * self.rope.score_scale(False), self.head_dim**-0.5 * self.rope.score_scale(True))

    def __call__(self, x, mask: AttentionMask, cache=None, long_rope: bool = False):
        B, L, _ = x.shape
        H, K, D = self.n_heads, self.n_kv, self.head_dim
        qkv = self.qkv_proj(x)  # (B, L, (H + 2K) * D)
        q, k, v = mx.split(qkv, [H * D, (H + K) * D], axis=-1)
        q = q.reshape(B, L, H, D).transpose(0, 2, 1, 3)  # (B, H, L, D)
        k = k.reshape(B, L, K, D).transpose(0, 2, 1, 3)  # (B, K, L, D)
        v = v.reshape(B, L, K, D).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset, long_rope)
        k = self.rope(k, offset, long_rope)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, K, T, D)
        o = attend(q, k, v, self.scale[long_rope], mask, cache)
        o = o.transpose(0, 2, 1, 3).reshape(B, L, H * D)
        return self.o_proj(o)


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up as one fused kernel (about 5% of a prefill saved on the CPU)."""
    return nn.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU with a fused gate_up projection: [gate | up] along the output axis."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, x):
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(swiglu(gate, up))


# The swappable parts. Variant modules (phi3mlx/models/<variant>.py) add their own entries; every
# attention class is built as cls(cfg, layer_idx) and called as (x, mask, cache, long_rope), every
# MLP as cls(cfg, layer_idx) and called as (x).
ATTENTIONS: dict = {"phi3": Attention}
MLPS: dict = {"swiglu": MLP}
# MLP kind -> the DecoderLayer attribute (so the weight-name part) holding it; "mlp" when absent
# (phimoe: "block_sparse_moe", mlx-lm's and the Hub checkpoint's name).
MLP_ATTRS: dict = {}


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "layer":
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
    return nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        attn, mlp = ATTENTIONS[cfg.attention], MLPS[cfg.mlp]
        self.self_attn = attn(cfg, layer_idx)
        self.mlp_attr = MLP_ATTRS.get(cfg.mlp, "mlp")
        setattr(self, self.mlp_attr, mlp(cfg, layer_idx))
        self.input_layernorm = make_norm(cfg)
        self.post_attention_layernorm = make_norm(cfg)

    def __call__(self, x, mask, cache=None, long_rope=False):
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, long_rope)
        return h + getattr(self, self.mlp_attr)(self.post_attention_layernorm(h))


class Phi3Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = make_norm(cfg)


def _checkpointed(layer: nn.Module, h: mx.array, *args) -> mx.array:
    """``layer(h, *args)`` under mx.checkpoint; only arrays cross it (masks, caches, flags are closed over)."""

    def inner(params, h):
        layer.update(params)
        return layer(h, *args)

    return mx.checkpoint(inner)(layer.trainable_parameters(), h)


class Model(nn.Module):
    """Phi-3 causal LM. ``model(ids)`` with ids (B, L) returns logits (B, L, vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model_type = cfg.model_type
        self.model = Phi3Model(cfg)
        self.checkpoint_layers = False  # True: recompute each layer's activations in the backward pass
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=bool(cfg.extra.get("lm_head_bias")))

    @property
    def layers(self):
        return self.model.layers

    def __call__(
        self,
        inputs: mx.array,
        cache: Optional[list] = None,
        *,
        long_rope: Optional[bool] = None,
        last_only: bool = False,
    ) -> mx.array:
        """Run the decoder.

        long_rope: which LongRoPE factor set to use; None decides from this pass alone
        (offset + L > original_max_position_embeddings), which is exact for a full forward pass.
        last_only: return logits for the last position only, shape (B, 1, vocab).
        """
        B, L = inputs.shape
        offset = cache[0].offset if cache else 0
        if long_rope is None:
            long_rope = self.config.rope.uses_long(offset + L)
        mask = make_mask(offset, L, self.config.sliding_window)
        h = self.model.embed_tokens(inputs)  # (B, L, hidden)
        if self.config.embedding_multiplier != 1.0:
            h = h * self.config.embedding_multiplier
        for i, layer in enumerate(self.model.layers):
            args = (mask, cache[i] if cache else None, long_rope)
            h = _checkpointed(layer, h, *args) if self.checkpoint_layers else layer(h, *args)
        if last_only:
            h = h[:, -1:]
        h = self.model.norm(h)
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(h)
        else:
            logits = self.lm_head(h)
        if self.config.logit_divisor != 1.0:
            logits = logits.astype(mx.float32) / self.config.logit_divisor
        dummy = self.config.extra.get("dummy_token_ids")
        if dummy:  # phi3small: never-trained ids can never be sampled
            logits = logits.astype(mx.float32)
            logits[..., mx.array(dummy)] = mx.finfo(mx.float32).min
        return logits

    def make_cache(self, kv_bits: Optional[int] = None, kv_group_size: Optional[int] = None) -> list:
        """One KV cache per layer; with ``kv_bits`` (4 or 8) keys and values are stored quantized."""
        from mlx_lm.models.cache import KVCache, QuantizedKVCache

        if kv_bits is None:
            return [KVCache() for _ in self.model.layers]
        from ..generate import check_kv_quant

        kv_group_size = check_kv_quant(self.config.head_dim, kv_bits, kv_group_size)
        return [QuantizedKVCache(group_size=kv_group_size, bits=kv_bits) for _ in self.model.layers]
