"""Rotary position embeddings: plain RoPE and Phi-3 LongRoPE.

LongRoPE picks one of two frequency sets for a whole forward pass: the short factors while the
sequence (largest position + 1) fits in ``original_max_position_embeddings``, the long factors
beyond it. Which set is in use is decided by the caller (``Model.__call__``), because a cached
generation must re-run its prefix when it crosses the threshold (see ``phi3mlx.generate``).

Positions are multiplied by ``position_scale`` (1 except for some Phi-3-small configs).

The attention factor multiplies cos and sin, i.e. both q and k; since RoPE is linear this equals
multiplying the attention logits by ``attention_factor ** 2`` when the whole head is rotated, which
is what ``score_scale`` returns for the attention layer to fold into its softmax scale.
"""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import RopeConfig


@partial(mx.compile, shapeless=True)
def _turn(x: mx.array, turned: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x cos + rot(x) sin as one fused kernel."""
    return x * cos + turned * sin


class Rope(nn.Module):
    def __init__(self, cfg: RopeConfig, head_dim: int):
        super().__init__()
        self.dims = cfg.dims
        self.base = cfg.theta
        self.kind = cfg.kind
        self.full = cfg.dims == head_dim
        self.factors = (cfg.factor_for(False), cfg.factor_for(True))
        self.switch = cfg.switch_factors
        self.position_scale = cfg.position_scale
        if cfg.kind == "longrope":
            # mx.fast.rope takes periods (1 / inverse frequency): base^(2i/d) * factor_i.
            periods = cfg.theta ** (mx.arange(0, cfg.dims, 2, dtype=mx.float32) / cfg.dims)
            self._short = mx.array(cfg.short_factor, dtype=mx.float32) * periods
            self._long = mx.array(cfg.long_factor, dtype=mx.float32) * periods
        # for rotating with tables (``table``/``rotate``): the angle per position of each rotated pair, and
        # rot(x) = x @ _swap, which puts -x2 before x1 in the rotated dims and zeros elsewhere (exact)
        half = cfg.dims // 2
        if cfg.kind == "longrope":
            self._inv = (1.0 / self._short, 1.0 / self._long)
        else:  # base^(-2i / dims), as mx.fast.rope computes it
            self._inv = (mx.exp(mx.arange(0, half, dtype=mx.float32) * (-math.log(cfg.theta) / half)),) * 2
        swap = np.zeros((head_dim, head_dim), np.float32)
        swap[np.arange(half) + half, np.arange(half)] = -1.0
        swap[np.arange(half), np.arange(half) + half] = 1.0
        self._swap = mx.array(swap)
        self._head_dim = head_dim
        # computed now: MLX streams belong to a thread, and a server's engine thread reads these
        mx.eval([a for a in (getattr(self, "_short", None), getattr(self, "_long", None)) if a is not None],
                self._inv, self._swap)

    def score_scale(self, long: bool = False) -> float:
        """Extra factor for the attention logits (attention factor^2, folded, when the whole head rotates)."""
        return self.factors[long] ** 2 if self.full else 1.0

    def table(self, positions: mx.array, long: bool = False) -> tuple:
        """(cos, sin), each (B, 1, L, head_dim) float32, for the positions (B, L): what ``rotate`` applies.
        One table serves q and k of every layer of a pass: on MLX's CPU backend, where ``mx.fast.rope``
        runs as a graph of about 30 operations per call, rotating with a shared table is 2 (the same
        values within float rounding)."""
        pos = positions.astype(mx.float32)
        if self.position_scale != 1.0:
            pos = pos * self.position_scale
        ang = pos[..., None] * self._inv[long and self.switch]  # (B, L, dims / 2)
        cos, sin = mx.cos(ang), mx.sin(ang)
        parts_c, parts_s = [cos, cos], [sin, sin]
        af = self.factors[long] if self.kind == "longrope" and not self.full else 1.0
        if af != 1.0:  # a partial rotation scales its rotated dims (a full one folds it into the scores)
            parts_c, parts_s = [c * af for c in parts_c], [t * af for t in parts_s]
        rest = self._head_dim - self.dims
        if rest:  # dims beyond the rotated ones pass through: cos 1, sin 0
            shape = ang.shape[:-1] + (rest,)
            parts_c.append(mx.ones(shape, mx.float32))
            parts_s.append(mx.zeros(shape, mx.float32))
        return mx.concatenate(parts_c, axis=-1)[:, None], mx.concatenate(parts_s, axis=-1)[:, None]

    def rotate(self, x: mx.array, table: tuple) -> mx.array:
        """``x`` (B, heads, L, head_dim) rotated with a ``table`` of its positions (as ``__call__``)."""
        return _turn(x, x @ self._swap, *table).astype(x.dtype)

    def __call__(self, x: mx.array, offset: int = 0, long: bool = False) -> mx.array:
        # x: (B, heads, L, head_dim)
        if self.kind == "longrope":
            freqs = self._long if (long and self.switch) else self._short
            af = self.factors[long]
            if not self.full and af != 1.0:
                x = mx.concatenate([x[..., : self.dims] * af, x[..., self.dims :]], axis=-1)
            return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=self.position_scale,
                                offset=offset, freqs=freqs)
        return mx.fast.rope(x, self.dims, traditional=False, base=self.base, scale=self.position_scale, offset=offset)
