"""One attention: projection -> rope -> cache update -> attend -> output, written once.

A variant supplies two parts:

* its **projection** (an object with ``build(attn, cfg)``, ``qkv(attn, x)`` and ``out(attn, o)``):
  ``build`` creates the checkpoint-named layers on the attention module (``qkv_proj``/``o_proj``,
  Phi-3-small's grouped ``query_key_value``/``dense``, Phi-3.5-MoE's ``q_proj``...), ``qkv`` returns
  q (B, H, L, D) and k, v (B, K, L, D), ``out`` maps (B, L, H*D) back to the model width;
* its **mask maker** for a layer: None for the causal / sliding-window mask every dense layer shares
  (built once per pass by ``Pass.mask``), or a callable ``(q, k, v, scale, pass, cache) -> o`` that
  attends with its own pattern (Phi-3-small's blocksparse layers), calling ``attend`` in turn.

Shapes: B batch, L new tokens, T keys, H query heads, K kv heads, D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig
from .rope import Rope


@dataclass
class AttentionMask:
    """``mask`` is None, "causal" or a boolean (L, T') array (True = attend), or a per-head (H, L, T')
    one; ``kv_start`` drops the first returned keys, which no query of this pass can see."""

    mask: Union[None, str, mx.array]
    kv_start: int = 0


def make_mask(offset: int, length: int, window: Optional[int], key_start: int = 0) -> AttentionMask:
    """Causal mask for queries at positions offset..offset+length-1 over keys key_start..offset+length-1,
    optionally windowed: a query at i sees keys j with j <= i and i - j < window (as transformers)."""
    total = offset + length
    if window is None or total <= window:
        return AttentionMask("causal" if length > 1 else None)
    first = max(key_start, offset - window + 1)  # earliest key the first query can see
    if length == 1:
        return AttentionMask(None, first - key_start)
    q = mx.arange(offset, total)[:, None]
    k = mx.arange(first, total)[None, :]
    return AttentionMask((k <= q) & (q - k < window), first - key_start)


@dataclass
class Pass:
    """What every layer of one forward pass shares: positions, rope regime and the dense mask."""

    offset: int  # position of the first new token
    length: int  # new tokens
    long_rope: bool = False
    key_start: int = 0  # absolute position of the first key a layer's cache returns
    window: Optional[int] = None
    _mask: Optional[AttentionMask] = field(default=None, repr=False)
    tables: dict = field(default_factory=dict, repr=False)  # LongRoPE set -> rope table, shared by the layers

    def mask(self) -> AttentionMask:
        if self._mask is None:
            self._mask = make_mask(self.offset, self.length, self.window, self.key_start)
        return self._mask


@dataclass
class SlotPass:
    """One pass over a SlotBatch (``phi3mlx.cache``): row b's L tokens at positions[b] .. positions[b] +
    L - 1 (L is 1 for a decoding step); ``mask`` (B, 1, L, T) True where each may attend (its row's
    positions up to its own, within the window)."""

    positions: mx.array
    long_rope: bool
    mask: mx.array
    tables: dict = field(default_factory=dict, repr=False)  # LongRoPE set -> rope table, shared by the layers


def attend(q: mx.array, k, v, scale: float, mask: AttentionMask, cache=None) -> mx.array:
    """softmax(q k^T * scale + mask) v for float or quantized (tuple) keys and values.

    q: (B, H, L, D); k, v: (B, K, T, D) arrays, or (packed, scales, biases) tuples from a quantized
    cache (whose ``group_size`` and ``bits`` are read). Keys before ``mask.kv_start`` are dropped.
    """
    if not isinstance(k, mx.array):
        if mask.kv_start:
            k = tuple(t[:, :, mask.kv_start :] for t in k)
            v = tuple(t[:, :, mask.kv_start :] for t in v)
        return quantized_attention(q, k, v, scale, mask.mask, cache.group_size, cache.bits)
    if mask.kv_start:
        k, v = k[:, :, mask.kv_start :], v[:, :, mask.kv_start :]
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask.mask)


def quantized_attention(q, k: tuple, v: tuple, scale: float, mask, group_size: int, bits: int) -> mx.array:
    """Attention over a quantized KV cache; mask None, "causal", (L, T), per-head (H, L, T) or per-row
    (B, 1 or H, L, T).

    The query heads that share a KV head are stacked as rows of one matrix, (B, K, G * L, D), so each
    quantized matmul multiplies arrays with the same batch shape: no broadcast (stride-0) KV operand, a
    case some of MLX's GPU quantized-matmul kernels have mishandled (ml-explore/mlx#3480).
    """
    B, H, L, D = q.shape
    K = k[0].shape[1]
    G = H // K
    q = (q * scale).reshape(B, K, G * L, D)  # row g * L + l: query head k * G + g, position l
    s = mx.quantized_matmul(q, *k, transpose=True, group_size=group_size, bits=bits)  # (B, K, G * L, T)
    if mask is not None:
        T = s.shape[-1]
        if isinstance(mask, str):
            mask = mx.arange(T - L, T)[:, None] >= mx.arange(T)[None]
        if mask.ndim == 2:  # (L, T): the same for every head
            mask = mx.tile(mask, (G, 1))
        elif mask.ndim == 3:  # (H, L, T)
            mask = mask.reshape(K, G * L, T)
        elif mask.shape[1] == 1:  # (B, 1, L, T)
            mask = mx.tile(mask, (1, 1, G, 1))
        else:  # (B, H, L, T)
            mask = mask.reshape(mask.shape[0], K, G * L, T)
        s = mx.where(mask, s, mx.finfo(s.dtype).min)
    p = mx.softmax(s, axis=-1, precise=True)
    o = mx.quantized_matmul(p, *v, transpose=False, group_size=group_size, bits=bits)  # (B, K, G * L, D)
    return o.reshape(B, H, L, D)


class FusedQKV:
    """Phi-3: one ``qkv_proj`` giving [q | k | v] along the output axis, and ``o_proj``; no biases."""

    @staticmethod
    def build(attn: nn.Module, cfg: ModelConfig) -> None:
        H, K, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        attn.qkv_proj = nn.Linear(cfg.hidden_size, (H + 2 * K) * D, bias=False)
        attn.o_proj = nn.Linear(H * D, cfg.hidden_size, bias=False)

    @staticmethod
    def qkv(attn: nn.Module, x: mx.array):
        B, L, _ = x.shape
        H, K, D = attn.n_heads, attn.n_kv, attn.head_dim
        q, k, v = mx.split(attn.qkv_proj(x), [H * D, (H + K) * D], axis=-1)  # (B, L, (H + 2K) * D)
        q = q.reshape(B, L, H, D).transpose(0, 2, 1, 3)  # (B, H, L, D)
        k = k.reshape(B, L, K, D).transpose(0, 2, 1, 3)  # (B, K, L, D)
        v = v.reshape(B, L, K, D).transpose(0, 2, 1, 3)
        return q, k, v

    @staticmethod
    def out(attn: nn.Module, o: mx.array) -> mx.array:
        return attn.o_proj(o)


class Attention(nn.Module):
    """Built as Attention(cfg, layer_idx, projection, mask_maker); called as (x, pass, cache)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, projection=FusedQKV, mask_maker=None):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.projection = projection
        self.mask_maker = mask_maker
        projection.build(self, cfg)
        self.rope = Rope(cfg.rope, cfg.head_dim)
        s = cfg.attention_scale
        self.scale = (s * self.rope.score_scale(False), s * self.rope.score_scale(True))

    def __call__(self, x: mx.array, p, cache=None) -> mx.array:
        """``p`` a Pass (every row of x one sequence at the same positions, ``cache`` one LayerCache or
        None); a list of B Passes: a ragged batch whose row i is its own sequence, with its own
        positions and ``cache[i]`` (projections run batched, attention per row); or a SlotPass with
        ``cache`` a layer of a SlotBatch (dense layers only)."""
        B, L, _ = x.shape
        q, k, v = self.projection.qkv(self, x)
        if isinstance(p, SlotPass):  # rows of a SlotBatch: one rotation, one scatter, one attention
            q, k = self._rotate(q, k, p.positions, p.long_rope, p)
            k, v = cache.update_and_fetch(k, v)  # (B, K, C, D): the whole buffers, masked per row
            o = attend(q, k, v, self.scale[p.long_rope], AttentionMask(p.mask))
        elif isinstance(p, list):
            longs = {r.long_rope for r in p}
            if len(longs) == 1:  # one rotation for every row, each at its own position
                long = longs.pop()
                q, k = self._rotate(q, k, mx.array([r.offset for r in p]), long)
                rows = [self._attend(q[i : i + 1], k[i : i + 1], v[i : i + 1], p[i], cache[i], rotated=True)
                        for i in range(B)]
            else:
                rows = [self._attend(q[i : i + 1], k[i : i + 1], v[i : i + 1], p[i], cache[i]) for i in range(B)]
            o = mx.concatenate(rows, axis=0)
        else:
            o = self._attend(q, k, v, p, cache)
        return self.projection.out(self, o.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _rotate(self, q: mx.array, k: mx.array, offsets, long: bool, shared=None) -> tuple:
        """q and k rotated, row b's L positions starting at ``offsets`` (an int, or (B,) per row). On MLX's
        CPU backend a float32 pass rotates with a table of its positions, made once per pass where the
        layers share one (``shared.tables``: a forward pass, a SlotBatch step; the ragged batch makes it
        per layer); elsewhere ``mx.fast.rope`` runs as one kernel."""
        if mx.default_device() != mx.cpu or q.dtype != mx.float32:
            return self.rope(q, offsets, long), self.rope(k, offsets, long)
        table = shared.tables.get(long) if shared is not None else None
        if table is None:
            steps = mx.arange(q.shape[2], dtype=mx.int32)
            pos = offsets[:, None] + steps[None] if isinstance(offsets, mx.array) else (steps + offsets)[None]
            table = self.rope.table(pos, long)  # (B or 1, 1, L, D)
            if shared is not None:
                shared.tables[long] = table
        return self.rope.rotate(q, table), self.rope.rotate(k, table)

    def _attend(self, q, k, v, p: Pass, cache, rotated: bool = False) -> mx.array:
        if not rotated:
            q, k = self._rotate(q, k, p.offset, p.long_rope, p)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, K, T, D) or quantized tuples
        scale = self.scale[p.long_rope]
        if self.mask_maker is None:
            return attend(q, k, v, scale, p.mask(), cache)
        return self.mask_maker(q, k, v, scale, p, cache)
