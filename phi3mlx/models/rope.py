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

import mlx.core as mx
import mlx.nn as nn

from ..config import RopeConfig


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

    def score_scale(self, long: bool = False) -> float:
        """Extra factor for the attention logits (attention factor^2, folded, when the whole head rotates)."""
        return self.factors[long] ** 2 if self.full else 1.0

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
