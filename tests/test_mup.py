"""muP coordinate check: after a few Adam steps, each layer's mean |activation| stays flat as the width grows
64 -> 512 under muP, and grows under the standard parametrisation (SP)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from phi3mlx.finetune import mup as M
from phi3mlx.finetune.pretrain import init_model
from phi3mlx.finetune.trainer import make_step
from phi3mlx.finetune.losses import sft_loss
from phi3mlx.models.attention import Pass

WIDTHS = (64, 128, 256, 512)
HEAD_DIM = 32
VOCAB, SEQ, BATCH, STEPS, LR = 256, 32, 8, 6, 1e-2


def model_config(width: int) -> dict:
    return {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "vocab_size": VOCAB,
            "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 2,
            "num_attention_heads": width // HEAD_DIM, "num_key_value_heads": width // HEAD_DIM,
            "max_position_embeddings": 64, "original_max_position_embeddings": 64, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "sliding_window": None}


def batches(seed: int):
    """Learnable token streams: each row counts up from a random start (mod the vocabulary)."""
    rng = np.random.default_rng(seed)
    while True:
        start = rng.integers(0, VOCAB, (BATCH, 1))
        ids = ((start + np.arange(SEQ + 1)) % VOCAB).astype(np.int32)
        yield mx.array(ids[:, :-1]), mx.array(ids[:, 1:]), mx.ones((BATCH, SEQ))


def activations(width: int, mup: bool, seed: int) -> list[float]:
    """Mean |x| of the embeddings, each layer's output and the logits after STEPS Adam steps."""
    model, m = init_model(model_config(width), base_width=WIDTHS[0] if mup else None, seed=seed)
    sched = lambda step: mx.array(LR)  # noqa: E731
    opt = M.make_optimizer(sched, 0.0, m)
    opt.init(model.trainable_parameters())
    step = make_step(model, sft_loss, opt)
    data = batches(seed)
    for _ in range(STEPS):
        mx.eval(step(next(data), None, True), model.parameters(), opt.state)
    x = next(data)[0]
    p = Pass(0, SEQ, False, 0, None)
    h = model.model.embed_tokens(x)
    out = [h]
    for layer in model.model.layers:
        h = layer(h, p)
        out.append(h)
    out.append(model(x))
    return [float(mx.abs(a).mean()) for a in out]


@pytest.fixture(scope="module")
def coords():
    """{(mup, width): per-layer activations averaged over 2 seeds}."""
    return {(mup, w): np.mean([activations(w, mup, s) for s in (0, 1)], axis=0)
            for mup in (True, False) for w in WIDTHS}


def test_activations_are_flat_in_width_under_mup(coords):
    small, big = coords[(True, WIDTHS[0])], coords[(True, WIDTHS[-1])]
    ratio = big / small
    assert np.all((ratio > 0.5) & (ratio < 2.0)), ratio  # 8x the width, within a factor of 2 everywhere


def test_activations_grow_with_width_under_sp(coords):
    small, big = coords[(False, WIDTHS[0])], coords[(False, WIDTHS[-1])]
    ratio = big / small
    # the layers' outputs and the logits blow up with width (the embeddings, a lookup, do not)
    assert np.all(ratio[1:] > 3.0), ratio
    widths = [coords[(False, w)][-1] for w in WIDTHS]
    assert all(b > a for a, b in zip(widths, widths[1:])), widths  # the logits grow at every doubling


def test_mup_and_sp_start_alike_at_the_base_width():
    """At the base width muP differs from SP only in its zero query rows and 1/d attention."""
    sp, _ = init_model(model_config(64), None, seed=0)
    mp, m = init_model(model_config(64), 64, seed=0)
    assert m.multiplier == 1.0 and mp.config.logit_divisor == 1.0
    assert mp.config.attention_scale == pytest.approx(1 / HEAD_DIM)
    w_sp = sp.model.layers[0].mlp.down_proj.weight
    w_mp = mp.model.layers[0].mlp.down_proj.weight
    assert float(mx.abs(w_sp - w_mp).max()) == 0.0  # same draw, same scale
    assert float(mx.abs(sp.lm_head.weight - mp.lm_head.weight).max()) == 0.0  # the readout starts as SP's
    assert float(mx.abs(mp.lm_head.weight).max()) > 0
    q = np.array(mp.model.layers[0].self_attn.qkv_proj.weight)[:64]
    assert not q.any()
    assert isinstance(mp.lm_head, nn.Linear)
