"""Quantized KV cache (--kv-bits 4|8): close to the float cache, with GQA, sliding window, LongRoPE."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from phi3mlx import load  # noqa: E402
from phi3mlx.cli import main  # noqa: E402
from phi3mlx.errors import Phi3MLXError  # noqa: E402
from phi3mlx.generate import generate_step  # noqa: E402
from phi3mlx.tiny import make_tiny  # noqa: E402

PROMPT = [int(t) for t in np.random.RandomState(0).randint(0, 32000, size=60)]
LONGROPE = {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [4.0] * 48}


@pytest.fixture(scope="module", params=["gqa-window", "longrope"])
def model(request, tmp_path_factory):
    cfg = {"num_key_value_heads": 1, "sliding_window": 16}
    if request.param == "longrope":  # 60-token prompt + 20 tokens crosses 64: the cache is rebuilt
        cfg = {"rope_scaling": LONGROPE, "original_max_position_embeddings": 64,
               "max_position_embeddings": 1024, "sliding_window": None}
    folder = make_tiny(tmp_path_factory.mktemp("kv") / "m", config=cfg)
    return load(folder)[0]


def _cos(a, b):
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def _teacher_forced(model, cache, tokens):
    """Last-position logits after a chunked prefill, then after each forced token."""
    out = []
    for a in range(0, len(PROMPT), 16):
        logits = model(mx.array([PROMPT[a : a + 16]]), cache=cache)
    out.append(np.array(logits[0, -1]))
    for t in tokens:
        out.append(np.array(model(mx.array([[t]]), cache=cache)[0, -1]))
    return out


@pytest.mark.parametrize("bits,bound", [(8, 0.9999), (4, 0.99)])  # measured 0.99998 and 0.994
def test_quantized_cache_follows_float_cache(model, bits, bound):
    tokens = [t for t, _ in generate_step(PROMPT, model, max_tokens=20, prefill_step_size=16)]
    q_cache = model.make_cache(kv_bits=bits)
    assert q_cache[0].bits == bits and q_cache[0].group_size == 32  # head size 96
    ref = _teacher_forced(model, model.make_cache(), tokens)
    got = _teacher_forced(model, q_cache, tokens)
    worst = min(_cos(a, b) for a, b in zip(ref, got))
    assert worst >= bound, worst


def test_quantized_cache_generation_runs_and_mostly_agrees(model):
    ref = [t for t, _ in generate_step(PROMPT, model, max_tokens=20, prefill_step_size=16)]
    q8 = [t for t, _ in generate_step(PROMPT, model, max_tokens=20, prefill_step_size=16, cache=model.make_cache(kv_bits=8))]
    q4 = [t for t, _ in generate_step(PROMPT, model, max_tokens=20, prefill_step_size=16, cache=model.make_cache(kv_bits=4, kv_group_size=32))]
    assert len(q8) == len(q4) == 20
    assert q8[:5] == ref[:5]


def test_bad_kv_bits(model):
    with pytest.raises(Phi3MLXError, match="kv_bits"):
        model.make_cache(kv_bits=3)
    with pytest.raises(Phi3MLXError, match="divide the head size 96"):
        model.make_cache(kv_bits=4, kv_group_size=64)


def test_cli_kv_bits(tiny_folder, capsys):
    assert main(["generate", "--model", str(tiny_folder), "--prompt", "Hi", "--max-tokens", "4", "--kv-bits", "4"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_folder), "--prompt", "Hi", "--kv-bits", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("phi3mlx: error: generate: argument --kv-bits: invalid choice: 3") and err.count("\n") == 1


@pytest.mark.parametrize("mask_kind", [None, "causal", "lt", "hlt", "b1lt", "bhlt"])
def test_quantized_attention_equals_float_attention_over_the_same_values(mask_kind):
    """GQA (8 query heads on 2 KV heads), 2 rows, 3 queries: attention over a quantized cache equals float
    attention over its dequantized keys and values, for every mask shape the callers pass."""
    from phi3mlx.models.attention import quantized_attention

    B, H, K, L, T, D, gs, bits = 2, 8, 2, 3, 37, 64, 32, 4
    mx.random.seed(7)
    q = mx.random.normal((B, H, L, D))
    k = mx.quantize(mx.random.normal((B, K, T, D)), group_size=gs, bits=bits)
    v = mx.quantize(mx.random.normal((B, K, T, D)), group_size=gs, bits=bits)
    kf, vf = (mx.dequantize(*t, group_size=gs, bits=bits) for t in (k, v))
    shapes = {"lt": (L, T), "hlt": (H, L, T), "b1lt": (B, 1, L, T), "bhlt": (B, H, L, T)}
    if mask_kind in shapes:
        mask = mx.random.uniform(shape=shapes[mask_kind]) > 0.3
        mask = mask | (mx.arange(T) == 0)  # every query sees a key
    else:
        mask = mask_kind
    ref = mx.fast.scaled_dot_product_attention(q, mx.repeat(kf, H // K, axis=1), mx.repeat(vf, H // K, axis=1),
                                               scale=D ** -0.5, mask=mask)
    got = quantized_attention(q, k, v, D ** -0.5, mask, gs, bits)
    assert got.shape == (B, H, L, D)
    assert float(mx.abs(got - ref).max()) <= 1e-4
