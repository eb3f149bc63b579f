"""Phi-3.5-MoE parts (model_type "phimoe").

The layer is the common Phi-3 decoder with LayerNorm, an attention with separate biased
``q_proj``/``k_proj``/``v_proj``/``o_proj``, a biased ``lm_head`` (``lm_head_bias``) and, in place of
the dense MLP, a sparse mixture of experts: a router ``gate`` (hidden -> num_local_experts) and the
experts' SwiGLU weights stacked per projection (``switch_mlp.{gate,up,down}_proj.weight`` of shape
(experts, out, in)) so that ``mx.gather_mm`` / ``mx.gather_qmm`` serve them; ``nn.quantize`` reaches
them through mlx-lm's ``SwitchLinear.to_quantized``. The MLX folder layout equals mlx-lm's phimoe
(``model.layers.N.block_sparse_moe.{gate,switch_mlp}``), so each loads the other's folders.

Routing (SparseMixer, https://huggingface.co/papers/2409.12136), as transformers' ``sparsemixer``:

* inference: expert 1 = argmax of the router scores s; scores with (max - s) / max(|s|, max) >
  2 * router_jitter_noise are masked to -inf; weight 1 = softmax(masked)[expert 1]. Expert 2: expert 1
  set to -inf, the same rule with the new max (|s| still of the original scores), weight from that
  second softmax. Weights are not renormalised.
* training (module in training mode, ``model.train()``): the expert is drawn by Gumbel-max inside the
  jitter mask, the weight is multiplied by ``mask_for_one`` (1.0 when the draw equals the argmax of
  the masked softmax or with probability 0.25, else 0.3333 - transformers' constants) and the
  gradient to the scores is transformers' ``PhimoeMultiplier`` backward,
  ``multiplier * g * (onehot(selected) - softmax(masked))`` (an ``mx.custom_function``). Random draws
  can be injected (``draws=``) for reproducible tests. ``input_jitter_noise`` multiplies the block's
  input by U(1 - eps, 1 + eps) once in training mode, as the original implementation and transformers
  4.x do (transformers 5.x applies it twice, in the block and again in-place in the router).

LongRoPE: two behaviours, chosen by the config key ``phimoe_longrope`` (kept in ``extra``):

* ``"transformers"`` (default): as transformers 5.x ``PhimoeRotaryEmbedding``: the *short* factors at
  every length; only the cos/sin multiplier switches, ``short_mscale`` while the sequence (largest
  position + 1) is at most ``original_max_position_embeddings``, ``long_mscale`` beyond it.
* ``"by_length"``: the original Phi-3.5-MoE implementation: short factors and ``short_mscale`` up to
  ``original_max_position_embeddings``, long factors and ``long_mscale`` beyond it.

(mlx-lm's phimoe always uses the long factors and ``long_mscale``.) Which regime a pass uses is the
``long_rope`` flag the decoder passes, so cached generation re-runs its prefix when crossing the
threshold, as for Phi-3 LongRoPE. The mscale multiplies cos and sin, i.e. q and k, which is folded
into the attention scale as mscale**2 (the whole head is rotated).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..config import register_variant
from . import decoder
from .decoder import ATTENTIONS, MLPS, AttentionMask, attend
from .rope import Rope

LONGROPE_MODES = ("transformers", "by_length")

# The decoder-layer attribute holding the MoE block: mlx-lm's name where the decoder lets a variant
# choose it (``decoder.MLP_ATTRS``), else the decoder's fixed "mlp".
if hasattr(decoder, "MLP_ATTRS"):
    decoder.MLP_ATTRS["phimoe"] = "block_sparse_moe"
    MOE_ATTR = "block_sparse_moe"
else:  # pragma: no cover - depends on the decoder version
    MOE_ATTR = "mlp"


# ----------------------------------------------------------------------------------------- config


def _finish(cfg: dict, fields: dict, problems: list) -> None:
    fields["norm"] = "layer"
    fields["attention"] = "phimoe"
    fields["mlp"] = "phimoe"
    if fields["hidden_act"] != "silu":
        problems.append(f"hidden_act {fields['hidden_act']!r} is not supported for phimoe (expected 'silu')")
    extra = {}
    for key, default in (("num_local_experts", 16), ("num_experts_per_tok", 2)):
        v = cfg.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            problems.append(f"'{key}' must be a positive integer, got {v!r}")
            v = default
        extra[key] = v
    if extra["num_experts_per_tok"] > extra["num_local_experts"]:
        problems.append(
            f"num_experts_per_tok ({extra['num_experts_per_tok']}) is larger than "
            f"num_local_experts ({extra['num_local_experts']})"
        )
    for key, default in (("router_jitter_noise", 0.01), ("input_jitter_noise", 0.0)):
        v = cfg.get(key, default)
        if v is None:
            v = default
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            problems.append(f"'{key}' must be a non-negative number, got {v!r}")
            v = default
        extra[key] = float(v)
    extra["attention_bias"] = bool(cfg.get("attention_bias", False))
    extra["lm_head_bias"] = bool(cfg.get("lm_head_bias", False))
    mode = cfg.get("phimoe_longrope", "transformers")
    if mode not in LONGROPE_MODES:
        problems.append(f"'phimoe_longrope' must be one of {', '.join(LONGROPE_MODES)}, got {mode!r}")
        mode = "transformers"
    extra["longrope_mode"] = mode
    rope = fields["rope"]
    short_m = long_m = 1.0
    if rope.kind == "longrope":
        rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        ms = []
        for key in ("short_mscale", "long_mscale"):
            v = rs.get(key)
            if v is None:
                v = rope.attention_factor  # what transformers' longrope init computes
            elif not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                problems.append(f"'rope_scaling.{key}' must be a positive number, got {v!r}")
                v = 1.0
            ms.append(float(v))
        short_m, long_m = ms
    extra["short_mscale"], extra["long_mscale"] = short_m, long_m
    # The mscales are the rope's short/long attention factors; "transformers" keeps the short factors.
    rope.attention_factor, rope.long_attention_factor = short_m, long_m
    rope.switch_factors = mode == "by_length"
    fields["extra"] = extra


register_variant("phimoe", None, _finish)


# -------------------------------------------------------------------------------------- attention


class PhimoeAttention(nn.Module):
    """Separate q/k/v/o projections (biased when ``attention_bias``) and PhiMoE's LongRoPE."""

    def __init__(self, cfg, layer_idx: int = 0):
        super().__init__()
        ex = cfg.extra
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, K, D, bias = self.n_heads, self.n_kv, self.head_dim, ex["attention_bias"]
        self.q_proj = nn.Linear(cfg.hidden_size, H * D, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, K * D, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, K * D, bias=bias)
        self.o_proj = nn.Linear(H * D, cfg.hidden_size, bias=bias)
        self.rope = Rope(cfg.rope, D)
        self.scale = (D**-0.5 * self.rope.score_scale(False), D**-0.5 * self.rope.score_scale(True))

    def __call__(self, x, mask: AttentionMask, cache=None, long_rope: bool = False):
        B, L, _ = x.shape
        H, K, D = self.n_heads, self.n_kv, self.head_dim
        q = self.q_proj(x).reshape(B, L, H, D).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, K, D).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, K, D).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset, long_rope)
        k = self.rope(k, offset, long_rope)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        o = attend(q, k, v, self.scale[long_rope], mask, cache)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, H * D))


# -------------------------------------------------------------------------------------- sparsemixer


@mx.custom_function
def _multiplier(scores, multiplier, onehot, masked_gates, mask_for_one):
    """Forward: multiplier * mask_for_one. Backward: transformers' PhimoeMultiplier."""
    return multiplier * mask_for_one


@_multiplier.vjp
def _multiplier_vjp(primals, cotangent, output):
    scores, multiplier, onehot, masked_gates, mask_for_one = primals
    g = cotangent * multiplier  # (..., 1)
    d_scores = g * (onehot - masked_gates)
    return (d_scores, mx.zeros_like(multiplier), mx.zeros_like(onehot), mx.zeros_like(masked_gates),
            mx.zeros_like(mask_for_one))


def sparsemixer(
    scores: mx.array,
    jitter_eps: float,
    top_k: int = 2,
    training: bool = False,
    draws: Optional[Sequence] = None,
):
    """Route: ``scores`` (..., E) router logits -> (expert indices (..., top_k), weights (..., top_k)).

    transformers' ``sparsemixer`` (which always picks 2; here ``top_k`` rounds of the same rule).
    ``draws`` (training only): one ``(exponential, uniform)`` pair per round, shapes (..., E) and
    (..., 1): the Exp(1) noise of the Gumbel-max draw (sample = argmax(masked - log(exponential)))
    and the uniform number compared with 0.75 for ``mask_for_one``. Drawn with ``mx.random`` if None.
    """
    neg_inf = mx.array(-mx.inf, scores.dtype)
    abs_scores = mx.abs(mx.stop_gradient(scores))
    masked_scores = scores
    inds, weights = [], []
    for r in range(top_k):
        with_grad = masked_scores
        top = mx.stop_gradient(with_grad.max(axis=-1, keepdims=True))
        top_ind = mx.argmax(with_grad, axis=-1, keepdims=True)
        factor = mx.maximum(abs_scores, top)
        outside = (top - mx.stop_gradient(scores)) / factor > 2 * jitter_eps
        masked_gates = mx.where(outside, neg_inf, with_grad)
        if training:
            if draws is not None:
                expo, unif = draws[r]
            else:
                expo = -mx.log1p(-mx.random.uniform(shape=masked_gates.shape))  # Exp(1)
                unif = mx.random.uniform(shape=masked_gates.shape[:-1] + (1,))
            sel = mx.argmax(mx.stop_gradient(masked_gates) - mx.log(expo), axis=-1, keepdims=True)
            probs = mx.stop_gradient(mx.softmax(masked_gates, axis=-1, precise=True))
            mult_o = mx.take_along_axis(probs, sel, axis=-1)
            best = mx.argmax(probs, axis=-1, keepdims=True)
            m1 = mx.logical_or(sel == best, unif > 0.75).astype(probs.dtype)
            mask_for_one = 0.3333 + 0.6667 * m1
            onehot = (mx.arange(scores.shape[-1]) == sel).astype(probs.dtype)
            w = _multiplier(scores, mult_o, onehot, probs, mask_for_one)
        else:
            sel = top_ind
            probs = mx.softmax(masked_gates, axis=-1, precise=True)
            w = mx.take_along_axis(probs, sel, axis=-1)
        sel = mx.stop_gradient(sel)
        inds.append(sel)
        weights.append(w)
        if r + 1 < top_k:
            masked_scores = mx.put_along_axis(masked_scores, sel, neg_inf, axis=-1)
    return mx.concatenate(inds, axis=-1), mx.concatenate(weights, axis=-1)


# ------------------------------------------------------------------------------------------- MoE


class PhimoeSparseMoe(nn.Module):
    """Router ``gate`` and stacked SwiGLU experts ``switch_mlp`` (mlx-lm's names)."""

    def __init__(self, cfg, layer_idx: int = 0):
        super().__init__()
        from mlx_lm.models.switch_layers import SwitchGLU

        ex = cfg.extra
        self.num_experts, self.top_k = ex["num_local_experts"], ex["num_experts_per_tok"]
        self.jitter_eps, self.input_jitter = ex["router_jitter_noise"], ex["input_jitter_noise"]
        self.gate = nn.Linear(cfg.hidden_size, self.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(cfg.hidden_size, cfg.intermediate_size, self.num_experts)

    def __call__(self, x, draws=None):
        if self.training and self.input_jitter > 0:
            x = x * mx.random.uniform(1.0 - self.input_jitter, 1.0 + self.input_jitter, shape=x.shape, dtype=x.dtype)
        scores = self.gate(x)
        inds, weights = sparsemixer(scores, self.jitter_eps, self.top_k, self.training, draws)
        y = self.switch_mlp(x, inds)  # (..., top_k, hidden)
        return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)


ATTENTIONS["phimoe"] = PhimoeAttention
MLPS["phimoe"] = PhimoeSparseMoe


# ----------------------------------------------------------------------------------- weight maps


def _hf_to_mlx(w: dict) -> dict:
    """HF names (per-expert w1/w2/w3, or transformers 5's fused ``mlp.experts``) -> stacked MLX names."""
    import re

    out, experts = {}, {}
    pat = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.(weight|scales|biases)$")
    names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    for k, v in w.items():
        m = pat.match(k)
        if m:
            pre, e, n, kind = m.groups()
            experts.setdefault((pre, names[n], kind), {})[int(e)] = v
            continue
        m = re.match(r"^(model\.layers\.\d+)\.mlp\.(router\.weight|experts\.gate_up_proj|experts\.down_proj)$", k)
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
    if MOE_ATTR != "block_sparse_moe":
        out = {k.replace(".block_sparse_moe.", f".{MOE_ATTR}."): v for k, v in out.items()}
    return out


def _mlx_to_hf(w: dict) -> dict:
    """Stacked MLX names -> the Hub checkpoint's per-expert w1/w2/w3 (float weights only)."""
    import re

    out = {}
    pat = re.compile(rf"^(model\.layers\.\d+)\.(?:block_sparse_moe|{MOE_ATTR})\.(switch_mlp\.(\w+)\.weight|gate\.weight)$")
    names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    for k, v in w.items():
        m = pat.match(k)
        if not m:
            out[k] = v
        elif m.group(2) == "gate.weight":
            out[f"{m.group(1)}.block_sparse_moe.gate.weight"] = v
        else:
            n = names[m.group(3)]
            for e in range(v.shape[0]):
                out[f"{m.group(1)}.block_sparse_moe.experts.{e}.{n}.weight"] = v[e]
    return out


def _register_maps():
    from phi3mlx.convert import maps

    maps.HF_TO_MLX["phimoe"] = _hf_to_mlx
    maps.MLX_TO_HF["phimoe"] = _mlx_to_hf


_register_maps()
