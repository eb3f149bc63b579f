"""The one table per model_type between Hugging Face names and MLX folder names.

Used by loading, conversion and export alike. For phi3 the names are equal; the only difference is
that HF checkpoints may carry precomputed rotary tables, which MLX recomputes and never stores.
"""

from __future__ import annotations

import mlx.core as mx

# Suffixes of tensors that are derived, never learned: dropped on the way in.
_DROP_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.short_inv_freq", "rotary_emb.long_inv_freq")


def hf_to_mlx(model_type: str, weights: dict[str, mx.array], tie_word_embeddings: bool = False) -> dict[str, mx.array]:
    out = {k: v for k, v in weights.items() if not k.endswith(_DROP_SUFFIXES)}
    if tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def mlx_to_hf(model_type: str, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    return dict(weights)
