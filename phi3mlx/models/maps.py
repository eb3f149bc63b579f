"""Every weight-name table, one place: Hugging Face names <-> our parameter names <-> MLX folder names.

Used by loading, conversion and export alike. For phi3 the names are equal; the only difference is
that HF checkpoints may carry precomputed rotary tables, which MLX recomputes and never stores.

* phi3small: the checkpoint's (and mlx-lm's) ``model.final_layernorm`` is our ``model.norm``.
* phi3_v: the CLIP patch embedding (a convolution) is stored channels-last in MLX folders (as
  mlx-vlm stores it), channels-first in Hugging Face checkpoints.
* phimoe: the Hub checkpoint's per-expert ``experts.E.w1/w2/w3`` (or transformers 5's fused
  ``mlp.experts``) are stacked per projection into ``block_sparse_moe.switch_mlp.{gate,up,down}_proj``
  (mlx-lm's layout) so that ``mx.gather_mm`` serves them.
"""

from __future__ import annotations

import re
from typing import Callable, Dict

import mlx.core as mx

Weights = Dict[str, mx.array]

# Suffixes of tensors that are derived, never learned: dropped on the way in.
_DROP_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.short_inv_freq", "rotary_emb.long_inv_freq",
                  "embeddings.position_ids")


def _small_in(w: Weights) -> Weights:
    return {k.replace("model.final_layernorm.", "model.norm."): v for k, v in w.items()}


def _small_out(w: Weights) -> Weights:
    return {k.replace("model.norm.", "model.final_layernorm."): v for k, v in w.items()}


_MOE_EXPERT = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.(weight|scales|biases)$")
_MOE_FUSED = re.compile(r"^(model\.layers\.\d+)\.mlp\.(router\.weight|experts\.gate_up_proj|experts\.down_proj)$")
_MOE_STACKED = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.(switch_mlp\.(\w+)\.weight|gate\.weight)$")


def _moe_in(w: Weights) -> Weights:
    """HF names (per-expert w1/w2/w3, or transformers 5's fused ``mlp.experts``) -> stacked MLX names."""
    out, experts = {}, {}
    names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    for k, v in w.items():
        m = _MOE_EXPERT.match(k)
        if m:
            pre, e, n, kind = m.groups()
            experts.setdefault((pre, names[n], kind), {})[int(e)] = v
            continue
        m = _MOE_FUSED.match(k)
        if m:
            pre, what = m.groups()
            if what == "router.weight":
                out[f"{pre}.block_sparse_moe.gate.weight"] = v
            elif what == "experts.down_proj":
                out[f"{pre}.block_sparse_moe.switch_mlp.down_proj.weight"] = v
            else:
                gate, up = mx.split(v, 2, axis=1)
                out[f"{pre}.block_sparse_moe.switch_mlp.gate_proj.weight"] = gate
                out[f"{pre}.block_sparse_moe.switch_mlp.up_proj.weight"] = up
            continue
        out[k] = v
    for (pre, proj, kind), per in experts.items():
        out[f"{pre}.block_sparse_moe.switch_mlp.{proj}.{kind}"] = mx.stack([per[e] for e in sorted(per)])
    return out


def _moe_out(w: Weights) -> Weights:
    """Stacked MLX names -> the Hub checkpoint's per-expert w1/w2/w3 (float weights only)."""
    out = {}
    names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    for k, v in w.items():
        m = _MOE_STACKED.match(k)
        if not m:
            out[k] = v
        elif m.group(2) == "gate.weight":
            out[k] = v
        else:
            n = names[m.group(3)]
            for e in range(v.shape[0]):
                out[f"{m.group(1)}.block_sparse_moe.experts.{e}.{n}.weight"] = v[e]
    return out


_PATCH = "embeddings.patch_embedding.weight"


def _vision_in(w: Weights) -> Weights:
    """phi3_v: the CLIP patch embedding from torch's (out, 3, kh, kw) to MLX's (out, kh, kw, 3).

    An MLX folder (ours, mlx-vlm's) already holds (out, kh, kw, 3) and is left as it is."""
    return {k: v.transpose(0, 2, 3, 1) if k.endswith(_PATCH) and v.shape[1] == 3 and v.shape[3] != 3 else v
            for k, v in w.items()}


def _vision_out(w: Weights) -> Weights:
    return {k: v.transpose(0, 3, 1, 2) if k.endswith(_PATCH) else v for k, v in w.items()}


# model_type -> function; absent: names are equal.
HF_TO_MLX: Dict[str, Callable[[Weights], Weights]] = {"phi3small": _small_in, "phimoe": _moe_in, "phi3_v": _vision_in}
MLX_TO_HF: Dict[str, Callable[[Weights], Weights]] = {"phi3small": _small_out, "phimoe": _moe_out, "phi3_v": _vision_out}
# Our parameter names -> the names an MLX folder stores (mlx-lm's, so that mlx-lm reads our folders),
# where the two differ. Loading maps them back through HF_TO_MLX.
MLX_TO_FOLDER: Dict[str, Callable[[Weights], Weights]] = {"phi3small": _small_out}


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
