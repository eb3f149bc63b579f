"""The one table per model_type between Hugging Face names and MLX folder names.

Used by loading, conversion and export alike. For phi3 the names are equal; the only difference is
that HF checkpoints may carry precomputed rotary tables, which MLX recomputes and never stores.
Variants with real differences (e.g. experts stacked for ``gather_mm``) register their own pair of
functions in ``HF_TO_MLX`` / ``MLX_TO_HF`` from their model module.
"""

from __future__ import annotations

from typing import Callable, Dict

import mlx.core as mx

Weights = Dict[str, mx.array]

# Suffixes of tensors that are derived, never learned: dropped on the way in.
_DROP_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.short_inv_freq", "rotary_emb.long_inv_freq")

HF_TO_MLX: Dict[str, Callable[[Weights], Weights]] = {}
MLX_TO_HF: Dict[str, Callable[[Weights], Weights]] = {}
# Our parameter names -> the names an MLX folder stores (mlx-lm's, so that mlx-lm reads our folders),
# where the two differ. Loading maps them back through HF_TO_MLX.
MLX_TO_FOLDER: Dict[str, Callable[[Weights], Weights]] = {}


def hf_to_mlx(model_type: str, weights: Weights, tie_word_embeddings: bool = False) -> Weights:
    out = {k: v for k, v in weights.items() if not k.endswith(_DROP_SUFFIXES)}
    if tie_word_embeddings:
        out.pop("lm_head.weight", None)
    fn = HF_TO_MLX.get(model_type)
    return fn(out) if fn else out


def mlx_to_hf(model_type: str, weights: Weights) -> Weights:
    fn = MLX_TO_HF.get(model_type)
    return fn(dict(weights)) if fn else dict(weights)


def mlx_to_folder(model_type: str, weights: Weights) -> Weights:
    """Names for an MLX folder (mlx-lm's layout) from our parameter names."""
    fn = MLX_TO_FOLDER.get(model_type)
    return fn(dict(weights)) if fn else dict(weights)


def _small_in(w: Weights) -> Weights:
    return {k.replace("model.final_layernorm.", "model.norm."): v for k, v in w.items()}


def _small_out(w: Weights) -> Weights:
    return {k.replace("model.norm.", "model.final_layernorm."): v for k, v in w.items()}


HF_TO_MLX["phi3small"] = _small_in
MLX_TO_HF["phi3small"] = _small_out
MLX_TO_FOLDER["phi3small"] = _small_out  # mlx-lm's phi3small keeps model.final_layernorm
