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

LongRoPE: two behaviours, chosen by the config key ``phimoe_longrope`` (``PhimoeSection.longrope_mode``):

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
from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from ..config import ModelConfig, Section
from ..kernels import moe as moe_kernel

LONGROPE_MODES = ("transformers", "by_length")
MOE_ATTR = "block_sparse_moe"  # the decoder-layer attribute holding the MoE block (mlx-lm's and the Hub's name)


# ----------------------------------------------------------------------------------------- config


@dataclass
class PhimoeSection(Section):
    """Phi-3.5-MoE's own config fields, validated when read."""

    num_local_experts: int = 16
    num_experts_per_tok: int = 2
    router_jitter_noise: float = 0.01
    input_jitter_noise: float = 0.0
    attention_bias: bool = False
    lm_head_bias: bool = False
    longrope_mode: str = "transformers"
    short_mscale: float = 1.0
    long_mscale: float = 1.0

    @classmethod
    def parse(cls, cfg: dict, fields: dict, problems: list) -> "PhimoeSection":
        fields["norm"] = "layer"
        out = {}
        for key, default in (("num_local_experts", 16), ("num_experts_per_tok", 2)):
            v = cfg.get(key, default)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                problems.append(f"'{key}' must be a positive integer, got {v!r}")
                v = default
            out[key] = v
        if out["num_experts_per_tok"] > out["num_local_experts"]:
            problems.append(
                f"num_experts_per_tok ({out['num_experts_per_tok']}) is larger than "
                f"num_local_experts ({out['num_local_experts']})"
            )
        for key, default in (("router_jitter_noise", 0.01), ("input_jitter_noise", 0.0)):
            v = cfg.get(key, default)
            if v is None:
                v = default
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                problems.append(f"'{key}' must be a non-negative number, got {v!r}")
                v = default
            out[key] = float(v)
        out["attention_bias"] = bool(cfg.get("attention_bias", False))
        out["lm_head_bias"] = bool(cfg.get("lm_head_bias", False))
        mode = cfg.get("phimoe_longrope", "transformers")
        if mode not in LONGROPE_MODES:
            problems.append(f"'phimoe_longrope' must be one of {', '.join(LONGROPE_MODES)}, got {mode!r}")
            mode = "transformers"
        out["longrope_mode"] = mode
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
        out["short_mscale"], out["long_mscale"] = short_m, long_m
        # The mscales are the rope's short/long attention factors; "transformers" keeps the short factors.
        rope.attention_factor, rope.long_attention_factor = short_m, long_m
        rope.switch_factors = mode == "by_length"
        return cls(**out)


def head_bias(cfg: ModelConfig) -> bool:
    return cfg.section.lm_head_bias


# -------------------------------------------------------------------------------------- attention


class SeparateQKV:
    """Separate ``q_proj``/``k_proj``/``v_proj``/``o_proj``, biased when ``attention_bias``."""

    @staticmethod
    def build(attn: nn.Module, cfg: ModelConfig) -> None:
        H, K, D, bias = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.section.attention_bias
        attn.q_proj = nn.Linear(cfg.hidden_size, H * D, bias=bias)
        attn.k_proj = nn.Linear(cfg.hidden_size, K * D, bias=bias)
        attn.v_proj = nn.Linear(cfg.hidden_size, K * D, bias=bias)
        attn.o_proj = nn.Linear(H * D, cfg.hidden_size, bias=bias)

    @staticmethod
    def qkv(attn: nn.Module, x: mx.array):
        B, L, _ = x.shape
        H, K, D = attn.n_heads, attn.n_kv, attn.head_dim
        q = attn.q_proj(x).reshape(B, L, H, D).transpose(0, 2, 1, 3)  # (B, H, L, D)
        k = attn.k_proj(x).reshape(B, L, K, D).transpose(0, 2, 1, 3)  # (B, K, L, D)
        v = attn.v_proj(x).reshape(B, L, K, D).transpose(0, 2, 1, 3)
        return q, k, v

    @staticmethod
    def out(attn: nn.Module, o: mx.array) -> mx.array:
        return attn.o_proj(o)


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
        top_ind = mx.stop_gradient(mx.argmax(with_grad, axis=-1, keepdims=True))  # indices take no gradient
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

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        # lazy: importing mlx_lm takes seconds (it pulls in transformers); only MoE models need SwitchGLU
        from mlx_lm.models.switch_layers import SwitchGLU

        sec = cfg.section
        self.num_experts, self.top_k = sec.num_local_experts, sec.num_experts_per_tok
        self.jitter_eps, self.input_jitter = sec.router_jitter_noise, sec.input_jitter_noise
        self.gate = nn.Linear(cfg.hidden_size, self.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(cfg.hidden_size, cfg.intermediate_size, self.num_experts)

    def __call__(self, x, draws=None):
        if self.training and self.input_jitter > 0:
            x = x * mx.random.uniform(1.0 - self.input_jitter, 1.0 + self.input_jitter, shape=x.shape, dtype=x.dtype)
        scores = self.gate(x)
        inds, weights = sparsemixer(scores, self.jitter_eps, self.top_k, self.training, draws)
        gpu = kernels.backend()
        if gpu and not self.training and moe_kernel.supports(x, self.switch_mlp):
            return self._kernel_decode(gpu, x, inds, weights)
        return self._experts(x, inds, weights)

    def _experts(self, x, inds, weights):
        """The MLX-op path: gathered matmuls for the routed experts, weighted and summed."""
        y = self.switch_mlp(x, inds)  # (..., top_k, hidden)
        return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)

    def _kernel_decode(self, gpu: str, x, inds, weights):
        """The fused MoE decode kernel for a few tokens. Its gradient (to x, the router weights and the
        expert weights) is the MLX-op path's."""
        names = ("gate_proj", "up_proj", "down_proj")
        parts = [moe_kernel.weights_of(getattr(self.switch_mlp, p)) for p in names]
        counts = [len(ws) for ws, _, _ in parts]
        _, bits, group_size = parts[0]
        intermediate = self.switch_mlp.gate_proj.output_dims
        keys = ("weight", "scales", "biases")

        @mx.custom_function
        def f(x, weights, *arrays):
            flat = x.reshape(-1, x.shape[-1])  # (N, H): every token of the batch
            y = moe_kernel.decode(gpu, flat, inds.reshape(flat.shape[0], -1), weights.reshape(flat.shape[0], -1),
                                  list(arrays), intermediate, bits, group_size)
            return y.astype(x.dtype).reshape(x.shape)

        @f.vjp
        def f_vjp(primals, cotangent, output):
            if bits:  # packed words take no gradient (QLoRA freezes them)
                grads = mx.vjp(lambda x, w: self._experts(x, inds, w), list(primals[:2]), [cotangent])[1]
                return [*grads, *(mx.zeros_like(a) for a in primals[2:])]
            saved = self.switch_mlp.parameters()

            def ref(x, w, *arrays):
                it = iter(arrays)
                self.switch_mlp.update({p: {k: next(it) for k in keys[:c]} for p, c in zip(names, counts)})
                return self._experts(x, inds, w)

            try:
                return mx.vjp(ref, list(primals), [cotangent])[1]
            finally:
                self.switch_mlp.update(saved)

        return f(x, weights, *[a for ws, _, _ in parts for a in ws])
