"""Phi-3-small parts (model_type "phi3small").

LayerNorm, fused per-KV-group query_key_value (with biases), GEGLU MLP, muP scalings and
blocksparse attention on layers where (layer_idx + 1) % dense_attention_every_n_layers != 0.
Parameter names follow the HF checkpoint (and mlx-lm): self_attn.query_key_value, self_attn.dense,
mlp.up_proj, mlp.down_proj; the checkpoint's model.final_layernorm is model.norm here (maps.py).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import register_variant
from .decoder import ATTENTIONS, MLPS, AttentionMask
from .rope import Rope

DUMMY_TOKEN_IDS = [100256, 100258, 100259, 100260, 100264, 100265] + list(range(100267, 100352))


def _normalize(cfg: dict) -> dict:
    for old, new in (("ff_intermediate_size", "intermediate_size"), ("layer_norm_epsilon", "rms_norm_eps"),
                     ("rope_embedding_base", "rope_theta")):
        if old in cfg and new not in cfg:
            cfg[new] = cfg[old]
    return cfg


def _finish(cfg: dict, fields: dict, problems: list) -> None:
    fields["norm"] = "layer"
    fields["attention"] = "phi3small"
    fields["mlp"] = "gegelu"
    fields["embedding_multiplier"] = float(cfg.get("mup_embedding_multiplier", 1.0))
    fields["logit_divisor"] = float(cfg.get("mup_width_multiplier", 1.0))
    fields["tie_word_embeddings"] = True
    if fields["rope"].kind == "default" and cfg.get("rope_position_scale", 1.0) != 1.0:
        problems.append("rope_position_scale != 1 is not supported")
    fields["extra"] = dict(
        gegelu_limit=float(cfg.get("gegelu_limit", 20.0)),
        mup_use_scaling=bool(cfg.get("mup_use_scaling", True)),
        mup_attn_multiplier=float(cfg.get("mup_attn_multiplier", 1.0)),
        dense_every=int(cfg.get("dense_attention_every_n_layers", 2) or 0),
        block_size=int(cfg.get("blocksparse_block_size", 64)),
        local_blocks=int(cfg.get("blocksparse_num_local_blocks", 16)),
        vert_stride=int(cfg.get("blocksparse_vert_stride", 8)),
        homo_head=bool(cfg.get("blocksparse_homo_head_pattern", False)),
        dummy_token_ids=[i for i in DUMMY_TOKEN_IDS if i < fields["vocab_size"]],
    )


register_variant("phi3small", _normalize, _finish)

_MASK_CACHE: dict = {}


def blocksparse_mask(offset: int, length: int, n_heads: int, block: int, local: int, vert: int, homo: bool):
    """(H, L, T) boolean mask (True = attend) for queries offset..offset+L-1, keys 0..T-1."""
    key = (offset, length, n_heads, block, local, vert, homo)
    m = _MASK_CACHE.get(key)
    if m is not None:
        return m
    T = offset + length
    qpos = mx.arange(offset, T)
    kpos = mx.arange(0, T)
    qb = (qpos // block)[:, None]
    kb = (kpos // block)[None, :]
    step = max(1, vert // n_heads)
    heads = mx.zeros((n_heads,), dtype=mx.int32) if homo else mx.arange(n_heads) * step
    vert_ok = ((kb[None] + heads[:, None, None] + 1) % vert) == 0
    m = (qb >= kb)[None] & (((qb - kb) < local)[None] | vert_ok) & (kpos[None, :] <= qpos[:, None])[None]
    if len(_MASK_CACHE) > 8:
        _MASK_CACHE.clear()
    _MASK_CACHE[key] = m
    return m


class SmallAttention(nn.Module):
    def __init__(self, cfg, layer_idx: int = 0):
        super().__init__()
        e = cfg.extra
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D = self.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * D, bias=True)
        self.dense = nn.Linear(self.n_heads * D, cfg.hidden_size, bias=True)
        self.rope = Rope(cfg.rope, D)
        norm = D / e["mup_attn_multiplier"] if e["mup_use_scaling"] else D**0.5
        self.scale = (1.0 / norm) * self.rope.score_scale()
        n = e["dense_every"]
        self.sparse = not (n and (layer_idx + 1) % n == 0)
        self.e = e

    def __call__(self, x, mask: AttentionMask, cache=None, long_rope: bool = False):
        B, L, _ = x.shape
        H, K, D = self.n_heads, self.n_kv, self.head_dim
        G = H // K
        qkv = self.query_key_value(x).reshape(B, L, K, G + 2, D)
        q = qkv[:, :, :, :G].reshape(B, L, H, D).transpose(0, 2, 1, 3)
        k = qkv[:, :, :, G].transpose(0, 2, 1, 3)
        v = qkv[:, :, :, G + 1].transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset, long_rope)
        k = self.rope(k, offset, long_rope)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if self.sparse:
            e = self.e
            m = blocksparse_mask(offset, L, H, e["block_size"], e["local_blocks"], e["vert_stride"], e["homo_head"])
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=m)
        else:
            m = "causal" if L > 1 else None
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=m)
        return self.dense(o.transpose(0, 2, 1, 3).reshape(B, L, H * D))


class GegeluMLP(nn.Module):
    def __init__(self, cfg, layer_idx: int = 0):
        super().__init__()
        self.limit = cfg.extra["gegelu_limit"]
        self.up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=True)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def __call__(self, x):
        h = self.up_proj(x)
        a_gelu, a_linear = h[..., ::2], h[..., 1::2]
        lim = self.limit
        a_gelu = mx.where(mx.isinf(a_gelu), a_gelu, mx.minimum(a_gelu, lim))
        a_linear = mx.where(mx.isinf(a_linear), a_linear, mx.clip(a_linear, -lim, lim))
        out = a_gelu * mx.sigmoid(1.702 * a_gelu) * (a_linear + 1)
        return self.down_proj(out)


ATTENTIONS["phi3small"] = SmallAttention
MLPS["gegelu"] = GegeluMLP
