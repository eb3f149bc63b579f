"""Initialisation, parameter groups and muP (maximal update parametrisation) for training from scratch.

Parameters fall in four groups by name and shape (``group_of``):

* ``embedding``: ``model.embed_tokens.weight``
* ``vector``:    every 1-D array (norm weights, biases)
* ``readout``:   ``lm_head.weight`` (the output layer; absent with tied embeddings)
* ``hidden``:    every other matrix (attention and MLP projections, MoE experts and router)

Standard parametrisation (SP): every matrix ~ N(0, init_std²), norms at 1, biases at 0, one Adam learning
rate. muP for Adam (Tensor Programs V), with width multiplier ``m = hidden_size / base_width``:

| group     | init                                  | Adam learning rate | weight decay |
| --------- | ------------------------------------- | ------------------ | ------------ |
| hidden    | N(0, init_std² / m)  (variance ∝ 1/fan_in) | lr / m        | yes          |
| readout   | N(0, init_std²)  (unscaled)           | lr                 | yes          |
| embedding | N(0, init_std²)                       | lr                 | no           |
| vector    | norms 1, biases 0                     | lr                 | no           |

and in the forward pass the logits are divided by ``m`` and attention scores are scaled by 1/head_dim
instead of 1/sqrt(head_dim) (``mup_config``). The query rows start at zero, as the muP authors advise.
The readout starts as SP's does (its logits are divided by ``m``, so its output shrinks with width at
the start and its Adam updates move the logits by the same amount at every width); a zero readout,
which the muP authors also allow, was measured here to cost about 0.9 nats of validation loss after
300 steps at the base width (hidden layers get no gradient until the readout has grown).
At ``width == base_width`` muP and SP differ only in the zero queries and the 1/head_dim scale, so
hyperparameters tuned on a narrow proxy transfer to a wide model.

Weight decay is AdamW's decoupled decay (``p -= lr * wd * p``) and is never applied to embeddings, norms or
biases, in either parametrisation (``make_optimizer``).

A muP-trained ``phi3`` model is saved as a plain Phi-3 checkpoint by folding the factors into the
weights (``fold_mup``): the query rows times 1/sqrt(head_dim) (so the usual 1/sqrt(head_dim) scale gives
1/head_dim) and ``lm_head`` divided by ``m``. Every tool then loads it with no muP support at all.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from phi3mlx.config import ModelConfig
from phi3mlx.errors import Phi3MLXError

GROUPS = ("embedding", "vector", "readout", "hidden")


@dataclass(frozen=True)
class Mup:
    """muP settings: the proxy width the hyperparameters were tuned at, and the model's width."""

    base_width: int
    width: int

    @property
    def multiplier(self) -> float:
        return self.width / self.base_width


def mup_problems(cfg: ModelConfig, base_width: Optional[int]) -> list[str]:
    """What keeps ``--mup`` from applying to this model, named as flags."""
    problems = []
    if base_width is None or base_width <= 0:
        problems.append(f"--base-width must be a positive width with --mup, got {base_width}")
    if cfg.model_type == "phi3small":
        problems.append("--mup is for the phi3 and phimoe architectures; phi3small trains with the muP multipliers "
                        "of its config (mup_width_multiplier, mup_embedding_multiplier, mup_attn_multiplier)")
    return problems


def mup_config(cfg: ModelConfig, mup: Mup) -> ModelConfig:
    """The config a muP model trains with: attention scale 1/head_dim, logits divided by the width multiplier."""
    return dataclasses.replace(cfg, attn_scale=1.0 / cfg.head_dim, logit_divisor=mup.multiplier)


def group_of(path: str, ndim: int) -> str:
    """The parameter group of one array (see the module docstring)."""
    if ndim <= 1:
        return "vector"
    if path.startswith("model.embed_tokens."):
        return "embedding"
    if path.startswith("lm_head."):
        return "readout"
    return "hidden"


def _query_rows(cfg: ModelConfig) -> int:
    return cfg.num_attention_heads * cfg.head_dim


def init_params(model, init_std: float = 0.02, mup: Optional[Mup] = None, seed: int = 0) -> None:
    """Initialise every parameter of a fresh model in place (SP, or muP with ``mup``; see the module docstring)."""
    cfg = model.config
    flat = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(seed), max(2, len(flat)))
    new = []
    for i, (path, v) in enumerate(flat):
        group = group_of(path, v.ndim)
        if group == "vector":
            w = mx.ones(v.shape) if path.endswith("weight") else mx.zeros(v.shape)
        else:
            std = init_std / math.sqrt(mup.multiplier) if mup is not None and group == "hidden" else init_std
            w = std * mx.random.normal(v.shape, key=keys[i])
            if mup is not None and path.endswith("self_attn.qkv_proj.weight"):
                w = mx.concatenate([mx.zeros((_query_rows(cfg), v.shape[1])), w[_query_rows(cfg):]], axis=0)
            elif mup is not None and path.endswith("self_attn.q_proj.weight"):
                w = mx.zeros(v.shape)
        new.append((path, w.astype(v.dtype)))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())


def make_optimizer(schedule: Callable, weight_decay: float = 0.0, mup: Optional[Mup] = None) -> optim.Optimizer:
    """AdamW in three groups: no decay for embeddings, norms and biases; the hidden matrices' learning rate
    divided by the width multiplier under muP; the readout at the base rate. The first group's rate is
    the schedule itself (what reports show)."""
    m = mup.multiplier if mup is not None else 1.0

    def hidden_schedule(step):
        return schedule(step) / m

    no_decay = optim.AdamW(learning_rate=schedule, weight_decay=0.0)
    hidden = optim.AdamW(learning_rate=hidden_schedule if m != 1.0 else schedule, weight_decay=weight_decay)
    readout = optim.AdamW(learning_rate=schedule, weight_decay=weight_decay)
    return optim.MultiOptimizer(
        [no_decay, hidden, readout],
        [lambda path, g: group_of(path, g.ndim) in ("embedding", "vector"),
         lambda path, g: group_of(path, g.ndim) == "hidden"])


def fold_mup(params: dict, cfg: ModelConfig, mup: Mup) -> dict:
    """Weights (MLX names) of a muP-trained phi3/phimoe model as plain ones: queries × 1/sqrt(head_dim),
    lm_head / m. The result loads with the plain config (attention scale 1/sqrt(head_dim), no divisor)."""
    if cfg.tie_word_embeddings:
        raise Phi3MLXError("a muP model with tied embeddings cannot be folded into plain weights (the logit divisor "
                           "would change the input embeddings too); train it with tie_word_embeddings false")
    out = dict(params)
    s = 1.0 / math.sqrt(cfg.head_dim)
    q = _query_rows(cfg)
    for path, w in params.items():
        if path.endswith("self_attn.qkv_proj.weight"):
            out[path] = mx.concatenate([w[:q] * s, w[q:]], axis=0)
        elif path.endswith("self_attn.qkv_proj.bias"):
            out[path] = mx.concatenate([w[:q] * s, w[q:]], axis=0)
        elif path.endswith("self_attn.q_proj.weight") or path.endswith("self_attn.q_proj.bias"):
            out[path] = w * s
        elif path.startswith("lm_head."):
            out[path] = w / mup.multiplier
    return out
