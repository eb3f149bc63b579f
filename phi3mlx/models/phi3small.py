"""Phi-3-small parts (model_type "phi3small").

LayerNorm, fused per-KV-group query_key_value (with biases), GEGLU MLP, muP scalings and
blocksparse attention on layers where (layer_idx + 1) % dense_attention_every_n_layers != 0.
Parameter names follow the HF checkpoint (and mlx-lm): self_attn.query_key_value, self_attn.dense,
mlp.up_proj, mlp.down_proj; the checkpoint's model.final_layernorm is model.norm here (maps.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from ..config import ModelConfig, Section, opt_number
from ..kernels import blocksparse as bs_kernel
from .attention import AttentionMask, Pass, attend

DUMMY_TOKEN_IDS = [100256, 100258, 100259, 100260, 100264, 100265] + list(range(100267, 100352))


@dataclass
class Phi3SmallSection(Section):
    """Phi-3-small's own config fields, validated when read."""

    act = "gegelu"
    gegelu_limit: float = 20.0
    dense_every: int = 2  # dense_attention_every_n_layers (0: every layer blocksparse)
    block_size: int = 64
    local_blocks: int = 16
    vert_stride: int = 8
    homo_head: bool = False
    dummy_token_ids: tuple = ()  # never-trained ids: never sampled

    @staticmethod
    def normalize(cfg: dict) -> dict:
        for old, new in (("ff_intermediate_size", "intermediate_size"), ("layer_norm_epsilon", "rms_norm_eps"),
                         ("rope_embedding_base", "rope_theta")):
            if old in cfg and new not in cfg:
                cfg[new] = cfg[old]
        return cfg

    @classmethod
    def parse(cls, cfg: dict, fields: dict, problems: list) -> "Phi3SmallSection":
        fields["norm"] = "layer"
        fields["tie_word_embeddings"] = True
        fields["sliding_window"] = None  # the blocksparse pattern is the model's only locality (and reads keys from 0)
        # muP: as the reference, a missing or non-positive embedding multiplier / width divisor is not applied
        emb = opt_number(cfg, "mup_embedding_multiplier", 1.0, problems, positive=None)
        width = opt_number(cfg, "mup_width_multiplier", 1.0, problems, positive=False)
        fields["embedding_multiplier"] = float(emb) if emb > 0 else 1.0
        fields["logit_divisor"] = float(width) if width > 0 else 1.0
        D = fields["head_dim"]
        attn_mult = opt_number(cfg, "mup_attn_multiplier", 1.0, problems)
        fields["attn_scale"] = attn_mult / D if bool(cfg.get("mup_use_scaling", True)) else D**-0.5
        rope = fields["rope"]
        ps = opt_number(cfg, "rope_position_scale", 1.0, problems)
        if rope.kind == "longrope" and ps != 1.0:
            # The reference LongRoPE path never reads it; refuse rather than guess.
            problems.append(f"'rope_position_scale' {ps} with LongRoPE rope_scaling is not supported (expected 1.0)")
        else:
            rope.position_scale = float(ps)
        if rope.kind == "longrope":
            # Reference: cos/sin times short_mscale up to the original length (1.0 when absent or <= 0), times
            # long_mscale beyond it (when absent or <= 0: sqrt(1 + log(max/original) / log(original)),
            # the attention factor config.py already computed from the lengths).
            rs_key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
            rs = cfg.get(rs_key) or {}
            ms = []
            for key, fallback in (("short_mscale", 1.0), ("long_mscale", rope.attention_factor)):
                v = rs.get(key, -1)
                if v is None:
                    v = -1
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                    problems.append(f"'{rs_key}.{key}' must be a number, got {v!r}")
                    v = -1
                ms.append(float(v) if v > 0 else float(fallback))
            rope.attention_factor, rope.long_attention_factor = ms
        return cls(
            gegelu_limit=float(opt_number(cfg, "gegelu_limit", 20.0, problems, positive=False)),
            dense_every=opt_number(cfg, "dense_attention_every_n_layers", 2, problems, integer=True, positive=False),
            block_size=opt_number(cfg, "blocksparse_block_size", 64, problems, integer=True),
            local_blocks=opt_number(cfg, "blocksparse_num_local_blocks", 16, problems, integer=True),
            vert_stride=opt_number(cfg, "blocksparse_vert_stride", 8, problems, integer=True),
            homo_head=bool(cfg.get("blocksparse_homo_head_pattern", False)),
            dummy_token_ids=tuple(i for i in DUMMY_TOKEN_IDS if i < fields["vocab_size"]),
        )


_MASK_CACHE: dict = {}  # key -> (value, elements); oldest first
_CACHE_ELEMENTS = 1 << 27  # masks and indices kept for the layers of a pass (and the next), ~128 MB


def _cached(key, build):
    """Masks and gather indices are the same for every sparse layer of a pass: build them once."""
    hit = _MASK_CACHE.get(key)
    if hit is not None:
        return hit[0]
    m = build()
    n = sum(a.size for a in (m if isinstance(m, tuple) else (m,)))
    if n <= _CACHE_ELEMENTS // 4:
        while _MASK_CACHE and sum(e for _, e in _MASK_CACHE.values()) + n > _CACHE_ELEMENTS:
            _MASK_CACHE.pop(next(iter(_MASK_CACHE)))
        _MASK_CACHE[key] = (m, n)
    return m


def head_offsets(n_heads: int, vert: int, homo: bool) -> mx.array:
    """h * step per head, step = max(1, vert // n_heads); 0 for every head with the homo-head pattern."""
    if homo:
        return mx.zeros((n_heads,), dtype=mx.int32)
    return mx.arange(n_heads) * max(1, vert // n_heads)


def blocksparse_mask(offset: int, length: int, n_heads: int, block: int, local: int, vert: int, homo: bool,
                     kv_start: int = 0):
    """(H, L, T - kv_start) boolean mask (True = attend) for queries at offset..offset+L-1 and keys at
    kv_start..T-1, T = offset + L.

    Straight from the definition: query at p (block p // block), key at j (block j // block), head h:
    kb <= qb and (qb - kb < local or (kb + h * step + 1) % vert == 0), and j <= p.
    """

    def build():
        T = offset + length
        qpos = mx.arange(offset, T)
        kpos = mx.arange(kv_start, T)
        qb = (qpos // block)[:, None]  # (L, 1)
        kb = (kpos // block)[None, :]  # (1, T')
        heads = head_offsets(n_heads, vert, homo)
        vert_ok = ((kb[None] + heads[:, None, None] + 1) % vert) == 0  # (H, 1, T')
        return (qb >= kb)[None] & (((qb - kb) < local)[None] | vert_ok) & (kpos[None, :] <= qpos[:, None])[None]

    return _cached(("mask", offset, length, n_heads, block, local, vert, homo, kv_start), build)


def far_keys(n_far_blocks: int, n_heads: int, n_kv: int, block: int, vert: int, homo: bool):
    """Token indices (K, G, F) of the key blocks head h may see among blocks 0..n_far_blocks-1 when all
    of them are outside every query's local window: the vertical-stride blocks, kb = r_h (mod vert)
    with r_h = -(h * step + 1) mod vert; and their validity (H, 1, F) (heads whose residue has one block
    fewer are padded with block 0, masked out)."""

    def build():
        r = (-(head_offsets(n_heads, vert, homo) + 1)) % vert  # (H,)
        n = -(-n_far_blocks // vert)  # blocks per head, rounded up
        blocks = r[:, None] + vert * mx.arange(n)[None]  # (H, n)
        ok = blocks < n_far_blocks
        blocks = mx.where(ok, blocks, 0)
        tok = (blocks[:, :, None] * block + mx.arange(block)).reshape(n_heads, n * block)  # (H, F)
        valid = mx.repeat(ok, block, axis=1)[:, None, :]  # (H, 1, F)
        return tok.reshape(n_kv, n_heads // n_kv, -1), valid

    return _cached(("far", n_far_blocks, n_heads, n_kv, block, vert, homo), build)


def _map(fn, t):
    """fn on keys/values, or on each part (packed, scales, biases) of quantized ones."""
    return fn(t) if isinstance(t, mx.array) else tuple(fn(a) for a in t)


class GroupedQKV:
    """Phi-3-small: ``query_key_value`` (biased) grouped per KV head, [q x G, k, v] for each of the K
    heads, and the biased output projection ``dense``."""

    @staticmethod
    def build(attn: nn.Module, cfg: ModelConfig) -> None:
        H, K, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        attn.query_key_value = nn.Linear(cfg.hidden_size, (H + 2 * K) * D, bias=True)
        attn.dense = nn.Linear(H * D, cfg.hidden_size, bias=True)

    @staticmethod
    def qkv(attn: nn.Module, x: mx.array):
        B, L, _ = x.shape
        H, K, D = attn.n_heads, attn.n_kv, attn.head_dim
        G = H // K
        qkv = attn.query_key_value(x).reshape(B, L, K, G + 2, D)
        q = qkv[:, :, :, :G].reshape(B, L, H, D).transpose(0, 2, 1, 3)  # (B, H, L, D)
        k = qkv[:, :, :, G].transpose(0, 2, 1, 3)  # (B, K, L, D)
        v = qkv[:, :, :, G + 1].transpose(0, 2, 1, 3)
        return q, k, v

    @staticmethod
    def out(attn: nn.Module, o: mx.array) -> mx.array:
        return attn.dense(o)


def blocksparse_layer(cfg: ModelConfig, layer_idx: int):
    """The mask maker: blocksparse attention on layers where (layer_idx + 1) % dense_every != 0."""
    n = cfg.section.dense_every
    if n and (layer_idx + 1) % n == 0:
        return None
    return Blocksparse(cfg.section, cfg.num_attention_heads, cfg.num_key_value_heads)


def mask_dummy_ids(cfg: ModelConfig, logits: mx.array) -> mx.array:
    """Never-trained ids can never be sampled."""
    dummy = cfg.section.dummy_token_ids
    if not dummy:
        return logits
    logits = logits.astype(mx.float32)
    logits[..., mx.array(dummy)] = mx.finfo(mx.float32).min
    return logits


class Blocksparse:
    """Exact blocksparse attention for one layer, called as (q, k, v, scale, pass, cache) -> o.

    ``chunk_blocks``: key blocks per query chunk of a prefill (None: a quarter of the local window, at
    least one). Any whole number of blocks gives the same output; larger chunks mean fewer, larger
    operations (a GPU's per-operation cost) and more masked work in the band.
    """

    chunk_blocks: Optional[int] = None

    def __init__(self, sec: Phi3SmallSection, n_heads: int, n_kv: int):
        self.sec, self.n_heads, self.n_kv = sec, n_heads, n_kv

    def __call__(self, q, k, v, scale: float, p: Pass, cache=None):
        return self._blocksparse(q, k, v, p.offset, scale, cache)

    def _kernel_decode(self, gpu: str, q, cache, offset: int, scale: float):
        """The blocksparse decode kernel over the cache's buffers (only visible key rows are read); its
        gradient is the MLX-op path's."""
        e = self.sec
        T = offset + q.shape[2]
        step = 0 if e.homo_head else max(1, e.vert_stride // self.n_heads)  # head_offsets' step, no device sync

        n = len(cache.keys)

        @mx.custom_function
        def f(q, *buffers):
            return bs_kernel.decode(gpu, q, list(buffers[:n]), list(buffers[n:]), T, offset, scale, e.block_size,
                                    e.local_blocks, e.vert_stride, step, cache.bits, cache.group_size)

        @f.vjp
        def f_vjp(primals, cotangent, output):
            def ref(q, *buffers):
                m = blocksparse_mask(offset, q.shape[2], self.n_heads, e.block_size, e.local_blocks, e.vert_stride,
                                     e.homo_head)
                k, v = (_map(lambda a: a[:, :, :T], b[0] if n == 1 else tuple(b))
                        for b in (buffers[:n], buffers[n:]))
                return attend(q, k, v, scale, AttentionMask(m), cache)
            return mx.vjp(ref, list(primals), [cotangent])[1]

        return f(q, *cache.keys, *cache.values)

    def _blocksparse(self, q, k, v, offset: int, scale: float, cache):
        """Exact blocksparse attention, in query chunks aligned to ``chunk`` positions.

        For a chunk of queries at p0..p1-1, keys fall in two parts: the near band, from the first key
        block inside the local window of the chunk's first query block to p1 - 1, masked per head by
        the definition; and the far part before it, where a head sees exactly its vertical-stride
        blocks whatever the query: gathered per head, no mask but padding. A chunk therefore attends
        to at most chunk + (local - 1) * block + ceil(far blocks / vert) * block keys rather than T.
        """
        e = self.sec
        bs, local, vert, homo = e.block_size, e.local_blocks, e.vert_stride, e.homo_head
        H, K = self.n_heads, self.n_kv
        G = H // K
        L = q.shape[2]
        T = offset + L
        if T <= local * bs:  # every key is inside every query's local window: plain causal attention
            return attend(q, k, v, scale, AttentionMask("causal" if L > 1 else None), cache)
        if L <= 8:  # a few queries (decoding)
            gpu = kernels.backend()
            if gpu and cache is not None and cache.start == 0 and \
                    bs_kernel.supports(q, cache.keys, cache.bits, cache.group_size):
                return self._kernel_decode(gpu, q, cache, offset, scale)
            # MLX ops: one masked pass over all keys, the (H, L, T) mask shared by layers
            m = blocksparse_mask(offset, L, H, bs, local, vert, homo)
            return attend(q, k, v, scale, AttentionMask(m), cache)
        chunk = bs * (self.chunk_blocks or max(1, local // 4))
        outs = []
        s = offset
        while s < T:
            end = min(T, (s // chunk + 1) * chunk)
            qs = q[:, :, s - offset : end - offset]
            n0 = max(0, s // bs - local + 1) * bs  # first key of the near band
            near = blocksparse_mask(s, end - s, H, bs, local, vert, homo, kv_start=n0)  # (H, l, end - n0)
            if n0 == 0:
                kk, vv = _map(lambda a: a[:, :, :end], k), _map(lambda a: a[:, :, :end], v)
                outs.append(attend(qs, kk, vv, scale, AttentionMask(near), cache))
            else:
                idx, valid = far_keys(n0 // bs, H, K, bs, vert, homo)  # (K, G, F), (H, 1, F)
                F = idx.shape[-1]

                def heads_keys(a):  # (B, K, T, d) -> (B, H, F + end - n0, d): far blocks, then the band
                    far = mx.take_along_axis(a[:, :, None], idx[None, :, :, :, None], axis=3)
                    band = mx.repeat(a[:, :, n0:end], G, axis=1) if G > 1 else a[:, :, n0:end]
                    return mx.concatenate([far.reshape(a.shape[0], H, F, a.shape[-1]), band], axis=2)

                kk, vv = _map(heads_keys, k), _map(heads_keys, v)
                m = mx.concatenate([mx.broadcast_to(valid, (H, end - s, F)), near], axis=-1)
                outs.append(attend(qs, kk, vv, scale, AttentionMask(m), cache))
            s = end
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


class GegeluMLP(nn.Module):
    def __init__(self, cfg, layer_idx: int = 0):
        super().__init__()
        self.limit = cfg.section.gegelu_limit
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

