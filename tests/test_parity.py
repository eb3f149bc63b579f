"""Numerical parity with transformers' Phi3ForCausalLM, going through the real converter.

Tiny random float32 checkpoints are built from the published configs (2 layers, 4 heads of 96),
converted with ``phi3mlx convert``, loaded with ``phi3mlx.load`` and compared with the torch model:
max |delta logit| <= 1e-4, and 32-token greedy generations identical to ``model.generate``.
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from phi3mlx import load  # noqa: E402
from phi3mlx.convert.hf_to_mlx import convert  # noqa: E402
from phi3mlx.generate import generate_step  # noqa: E402

from .helpers import TOL, assert_logits_and_greedy_match  # noqa: E402
from .helpers import random_ids as _ids  # noqa: E402
from .helpers import ref_generate as _ref_generate  # noqa: E402
from .helpers import ref_logits as _ref_logits  # noqa: E402

MODELS = [
    "Phi-3-mini-4k-instruct",  # sliding window 2047, plain RoPE
    "Phi-3-mini-128k-instruct",  # LongRoPE (type "longrope")
    "Phi-3-medium-4k-instruct",  # GQA 40:10 -> 4:1 here, sliding window
    "Phi-3.5-mini-instruct",  # LongRoPE
]

def _converted(hf_checkpoint, tmp_path_factory, name, **overrides):
    src, hf_model = hf_checkpoint(name, **overrides)
    out = tmp_path_factory.mktemp("mlx") / "model"
    convert(str(src), str(out), show_progress=False)
    model, tok = load(out)
    return model, tok, hf_model


@pytest.mark.parametrize("name", MODELS)
def test_logits_and_greedy_match_transformers(name, hf_checkpoint, tmp_path_factory, torch_mod):
    model, _, hf_model = _converted(hf_checkpoint, tmp_path_factory, name)
    assert_logits_and_greedy_match(model, hf_model, torch_mod, name)


@pytest.mark.slow
def test_longrope_long_regime_logits(hf_checkpoint, tmp_path_factory, torch_mod):
    """A 4100-token pass (> original 4096) uses the long factors, as transformers does."""
    model, _, hf_model = _converted(hf_checkpoint, tmp_path_factory, "Phi-3-mini-128k-instruct")
    ids = _ids(4100, 5)
    ours = np.array(model(mx.array(ids)))
    ref = _ref_logits(torch_mod, hf_model, ids)
    assert np.abs(ours - ref).max() <= TOL
    # and the short factors would be measurably wrong here: the regimes really differ
    short = np.array(model(mx.array(ids), long_rope=False))
    assert np.abs(short - ref).max() > 100 * TOL


@pytest.mark.slow
def test_greedy_crossing_longrope_threshold(hf_checkpoint, tmp_path_factory, torch_mod):
    """Prompt of 4080 tokens, 32 new tokens: the sequence crosses 4096 and the cache is rebuilt."""
    model, _, hf_model = _converted(hf_checkpoint, tmp_path_factory, "Phi-3-mini-128k-instruct")
    ids = _ids(4080, 6)
    ours = [t for t, _ in generate_step(ids[0].tolist(), model, max_tokens=32, prefill_step_size=1024)]
    assert ours == _ref_generate(torch_mod, hf_model, ids)


def test_crossing_threshold_equals_full_forward(hf_checkpoint, tmp_path_factory):
    """With a small original length: logits after the switch equal a full forward pass."""
    model, _, _ = _converted(hf_checkpoint, tmp_path_factory, "Phi-3.5-mini-instruct",
                             original_max_position_embeddings=64, max_position_embeddings=2048)
    prompt = _ids(60, 7)[0].tolist()
    toks, lps = [], []
    for t, lp in generate_step(prompt, model, max_tokens=12):
        toks.append(t)
        lps.append(np.array(lp))
    seq = prompt + toks
    full = np.array(model(mx.array([seq])))  # one pass over 72 tokens: long factors throughout
    full_lp = full - np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1, keepdims=True)) - full.max(-1, keepdims=True)
    # the token generated at step k was predicted at position len(prompt) - 1 + k
    for k in range(5, 12):  # steps after the sequence passed 64 tokens
        assert np.abs(lps[k] - full_lp[0, len(prompt) - 1 + k]).max() <= TOL


@pytest.mark.slow
def test_greedy_past_sliding_window(hf_checkpoint, tmp_path_factory, torch_mod):
    """Real window (2047): a 2030-token prompt and 32 new tokens run past it, in cached decoding."""
    model, _, hf_model = _converted(hf_checkpoint, tmp_path_factory, "Phi-3-mini-4k-instruct")
    ids = _ids(2030, 8)
    ours = [t for t, _ in generate_step(ids[0].tolist(), model, max_tokens=32, prefill_step_size=512)]
    assert ours == _ref_generate(torch_mod, hf_model, ids)
    long_ids = _ids(2100, 9)  # one-shot prefill past the window
    err = np.abs(np.array(model(mx.array(long_ids))) - _ref_logits(torch_mod, hf_model, long_ids)).max()
    assert err <= TOL


@pytest.mark.parametrize("window", [1, 2, 16])
def test_small_sliding_window_off_by_one(window, hf_checkpoint, tmp_path_factory, torch_mod):
    """Tiny windows make the boundary (i - j < window) visible; chunked prefill and decoding too."""
    model, _, hf_model = _converted(hf_checkpoint, tmp_path_factory, "Phi-3-medium-4k-instruct", sliding_window=window)
    ids = _ids(40, 10)
    ref = _ref_logits(torch_mod, hf_model, ids)
    assert np.abs(np.array(model(mx.array(ids))) - ref).max() <= TOL
    # chunked: 7 + 13 + 20 tokens through a cache
    cache = model.make_cache()
    parts = [np.array(model(mx.array(ids[:, a:b]), cache=cache)) for a, b in ((0, 7), (7, 20), (20, 40))]
    assert np.abs(np.concatenate(parts, axis=1) - ref).max() <= TOL
    ours = [t for t, _ in generate_step(ids[0, :10].tolist(), model, max_tokens=32, prefill_step_size=4)]
    # the definition: greedy over full forward passes of the transformers model, no cache
    seq = ids[:, :10]
    for _ in range(32):
        nxt = int(_ref_logits(torch_mod, hf_model, seq)[0, -1].argmax())
        seq = np.concatenate([seq, [[nxt]]], axis=1)
    assert ours == seq[0, 10:].tolist()
    if window > 1:  # transformers' cached generate keeps the whole cache for window 1 (its slice -0:)
        assert ours == _ref_generate(torch_mod, hf_model, ids[:, :10])
