"""phi3mlx.cache: window caches stay bounded and exact, trimming, re-encoding across the LongRoPE
threshold, prompt-cache files, and chat turns that reuse the cache."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from phi3mlx import load
from phi3mlx.cache import ModelCache
from phi3mlx.chat import Chat
from phi3mlx.errors import Phi3MLXError
from phi3mlx.generate import generate_step, make_sampler, stream_generate
from phi3mlx.tiny import make_tiny

TOL = 1e-4
PROMPT = [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889]


def _rand_ids(n, seed=0):
    return [int(i) for i in np.random.default_rng(seed).integers(100, 32000, n)]


@pytest.fixture(scope="module")
def window_model(tmp_path_factory):
    """A tiny Phi-3 whose sliding window (32) is much shorter than its context."""
    folder = make_tiny(tmp_path_factory.mktemp("w") / "m", config={"sliding_window": 32})
    return load(folder)


@pytest.fixture(scope="module")
def longrope_model(tmp_path_factory):
    rope = {"type": "longrope", "short_factor": [1.0 + 0.01 * i for i in range(48)],
            "long_factor": [2.0 + 0.1 * i for i in range(48)]}
    folder = make_tiny(tmp_path_factory.mktemp("lr") / "m",
                       config={"rope_scaling": rope, "original_max_position_embeddings": 64,
                               "max_position_embeddings": 1024, "sliding_window": None})
    return load(folder)


def _full_last(model, seq):
    """The last position's logits of one full forward pass over ``seq`` (no cache)."""
    return np.array(model(mx.array([seq]), last_only=True)[0, -1])


def test_window_cache_stays_bounded_and_exact_over_4x_the_window(window_model):
    model, _ = window_model
    W, chunk = 32, 8
    cache = model.make_cache()
    assert cache[0].window == W
    prompt = _rand_ids(20, seed=1)
    seq = list(prompt)
    lengths = []
    steps = generate_step(prompt, model, max_tokens=4 * W, cache=cache, prefill_step_size=chunk)
    for n, (tok, logprobs) in enumerate(steps):
        lengths.append(cache.max_length)
        # at every step the logits equal a full (windowed) forward pass over everything so far
        ref = _full_last(model, seq)
        ref = ref - np.log(np.exp(ref - ref.max()).sum()) - ref.max()
        assert np.abs(np.array(logprobs) - ref).max() <= TOL, n
        seq.append(tok)
    assert len(seq) == 20 + 4 * W
    assert max(lengths) <= W + chunk, max(lengths)
    assert cache.offset == len(seq) - 1 and cache[0].start > 2 * W  # old keys really were dropped
    assert cache.token_ids == seq[:-1]


def test_window_cache_prefill_in_chunks_equals_one_pass(window_model):
    model, _ = window_model
    ids = _rand_ids(150, seed=2)
    ref = np.array(model(mx.array([ids])))[0]
    cache = model.make_cache()
    outs = [np.array(model(mx.array([ids[s: s + 37]]), cache=cache))[0] for s in range(0, 150, 37)]
    assert np.abs(np.concatenate(outs) - ref).max() <= TOL
    assert cache.max_length <= 32 + 37


def test_quantized_window_cache_runs_and_stays_bounded(window_model):
    model, _ = window_model
    cache = model.make_cache(kv_bits=8)
    toks = [t for t, _ in generate_step(_rand_ids(10), model, max_tokens=100, cache=cache, prefill_step_size=8)]
    assert len(toks) == 100 and cache.max_length <= 32 + 8 and cache[0].bits == 8


def test_trim_drops_the_last_positions_exactly(window_model, longrope_model):
    for model, _ in (window_model, longrope_model):
        ids = _rand_ids(60, seed=3)
        cache = model.make_cache()
        model(mx.array([ids]), cache=cache)
        cache.trim(7, model)
        assert cache.offset == 53 and cache.token_ids == ids[:53]
        got = np.array(model(mx.array([ids[53:]]), cache=cache))[0, -1]
        assert np.abs(got - _full_last(model, ids)).max() <= TOL


def test_window_trim_past_dropped_keys_reencodes(window_model):
    model, _ = window_model
    ids = _rand_ids(120, seed=4)
    cache = model.make_cache()
    for s in range(0, 120, 10):
        model(mx.array([ids[s: s + 10]]), cache=cache)
    assert cache[0].start > 0
    cache.trim(30, model)  # the keys needed after trimming were dropped: rebuilt from the token ids
    assert cache.offset == 90
    got = np.array(model(mx.array([ids[90:]]), cache=cache))[0, -1]
    assert np.abs(got - _full_last(model, ids)).max() <= TOL


def test_longrope_cache_reencodes_both_ways(longrope_model):
    model, _ = longrope_model
    ids = _rand_ids(100, seed=5)
    cache = model.make_cache()
    model(mx.array([ids[:50]]), cache=cache)
    assert cache.long_rope is False
    out = np.array(model(mx.array([ids[50:]]), cache=cache))[0, -1]  # crosses 64: prefix re-encoded long
    assert cache.long_rope is True
    assert np.abs(out - _full_last(model, ids)).max() <= TOL
    cache.trim(60, model)  # back to 40 tokens: the next pass takes the short factors again
    out = np.array(model(mx.array([ids[40:45]]), cache=cache))[0, -1]
    assert cache.long_rope is False
    assert np.abs(out - _full_last(model, ids[:45])).max() <= TOL


def test_interrupted_pass_is_repaired(window_model):
    model, _ = window_model
    ids = _rand_ids(40, seed=6)
    cache = model.make_cache()
    model(mx.array([ids[:30]]), cache=cache)
    cache.record(mx.array([ids[30:35]]))  # as if a pass stopped after recording, before/inside the layers
    cache[0].update_and_fetch(mx.zeros((1, 4, 5, 96)), mx.zeros((1, 4, 5, 96)))
    cache.repair()
    assert [c.offset for c in cache] == [30, 30] and cache.token_ids == ids[:30]
    got = np.array(model(mx.array([ids[30:]]), cache=cache))[0, -1]
    assert np.abs(got - _full_last(model, ids)).max() <= TOL


# ------------------------------------------------------------------------------------ prompt caches


def test_prompt_cache_file_round_trip(window_model, tmp_path):
    model, tok = window_model
    doc = _rand_ids(90, seed=7)
    cache = model.make_cache(kv_bits=8)
    model(mx.array([doc]), cache=cache)
    cache.save(tmp_path / "doc.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.safetensors"]
    loaded = ModelCache.load(tmp_path / "doc.safetensors", model.identity())
    assert loaded.token_ids == doc and loaded.offset == 90 and loaded[0].bits == 8 and loaded[0].start == cache[0].start
    question = _rand_ids(6, seed=8)
    fresh = [t for t, _ in generate_step(doc + question, model, max_tokens=8, cache=model.make_cache(kv_bits=8))]
    got = [t for t, _ in generate_step(question, model, max_tokens=8, cache=loaded)]
    assert got == fresh


def test_prompt_cache_reuse_equals_fresh_generation(longrope_model, tmp_path):
    model, tok = longrope_model
    doc = _rand_ids(50, seed=9)
    cache = model.make_cache()
    model(mx.array([doc]), cache=cache)
    cache.save(tmp_path / "c.safetensors")
    loaded = ModelCache.load(tmp_path / "c.safetensors", model.identity())
    ids = doc + _rand_ids(30, seed=10)  # crosses the LongRoPE threshold (64) after the cached prefix
    responses = list(stream_generate(model, tok, ids, max_tokens=10, cache=loaded))
    assert responses[-1].cached_tokens == 50
    got = [r.token for r in responses if r.token is not None and r.token not in tok.stop_ids]
    fresh = [t for t, _ in generate_step(ids, model, max_tokens=10)]
    assert got and got == fresh[: len(got)]


def test_prompt_cache_from_another_model_is_refused(window_model, longrope_model, tmp_path):
    model, _ = window_model
    cache = model.make_cache()
    model(mx.array([PROMPT]), cache=cache)
    cache.save(tmp_path / "c.safetensors")
    other, _ = longrope_model
    with pytest.raises(Phi3MLXError, match="different model") as e:
        ModelCache.load(tmp_path / "c.safetensors", other.identity())
    assert "\n" not in str(e.value)
    tuned, _ = load(make_tiny(tmp_path / "same", config={"sliding_window": 32}))  # the same weights...
    assert tuned.identity() == model.identity()
    w = tuned.model.layers[1].mlp.down_proj.weight
    tuned.model.layers[1].mlp.down_proj.weight = w + 0.01  # ...fine-tuned deep inside: refused
    with pytest.raises(Phi3MLXError, match="differs in weights"):
        ModelCache.load(tmp_path / "c.safetensors", tuned.identity())
    (tmp_path / "bad.safetensors").write_bytes(b"not a cache")
    with pytest.raises(Phi3MLXError, match="not a phi3mlx prompt cache"):
        ModelCache.load(tmp_path / "bad.safetensors", model.identity())
    with pytest.raises(Phi3MLXError, match="not found"):
        ModelCache.load(tmp_path / "missing.safetensors", model.identity())


# ----------------------------------------------------------------------------------------- sampling


def test_seeded_sampler_is_reproducible_and_leaves_global_random_state_alone(window_model):
    model, _ = window_model
    mx.random.seed(123)
    before = mx.random.uniform(shape=(3,))
    mx.random.seed(123)
    a = [t for t, _ in generate_step(PROMPT, model, max_tokens=10, sampler=make_sampler(1.0, seed=5))]
    after = mx.random.uniform(shape=(3,))
    assert np.array_equal(np.array(before), np.array(after))  # generation drew nothing from the global state
    b = [t for t, _ in generate_step(PROMPT, model, max_tokens=10, sampler=make_sampler(1.0, seed=5))]
    c = [t for t, _ in generate_step(PROMPT, model, max_tokens=10, sampler=make_sampler(1.0, seed=6))]
    assert a == b and a != c


# --------------------------------------------------------------------------------------------- chat


class _Counting:
    """Wraps a model and counts the tokens each call processes."""

    def __init__(self, model):
        self.model, self.config, self.calls = model, model.config, []

    def __call__(self, inputs, *a, **k):
        self.calls.append(inputs.shape[1])
        return self.model(inputs, *a, **k)

    def make_cache(self, *a, **k):
        return self.model.make_cache(*a, **k)


def test_chat_turns_process_only_new_tokens_and_equal_fresh_answers(window_model):
    model, tok = window_model
    counting = _Counting(model)
    chat = Chat(counting, tok, system="Be brief.", max_tokens=6)
    processed = []
    for turn in range(6):
        before = len(counting.calls)
        msg = f"message number {turn} about the sea and the sky"
        prompt_ids = tok.encode(chat.prompt(msg))
        reply = chat.ask(msg, lambda s: None)
        processed.append(sum(counting.calls[before:]))
        # the same answer as a fresh generation over the whole conversation
        fresh = "".join(r.text for r in stream_generate(model, tok, prompt_ids, max_tokens=6))
        assert reply.text == fresh, turn
    # turn 6 processes about as many tokens as turn 2 (the new message + template), not the whole history
    assert processed[5] <= processed[1] + 4, processed
    assert chat.last.cached_tokens > 0


def test_chat_reset_and_system_clear_the_cache(window_model):
    model, tok = window_model
    chat = Chat(model, tok, max_tokens=4)
    chat.ask("hello", lambda s: None)
    assert chat.cache.offset > 0
    chat.reset()
    assert chat.cache.offset == 0 and chat.history == []
    chat.ask("hello", lambda s: None)
    chat.reset(system="You are terse.")
    assert chat.cache.offset == 0 and chat.system == "You are terse."


@pytest.mark.slow
def test_long_chat_crosses_the_longrope_threshold(tmp_path):
    """A 128k-style model (LongRoPE, here with a threshold of 512 so that the test is quick; the real 4096
    is held against transformers in test_parity): a chat whose history grows past the threshold keeps
    going, and each answer equals greedy decoding with full forward passes over the whole conversation."""
    rope = {"type": "longrope", "short_factor": [1.0 + 0.02 * i for i in range(48)],
            "long_factor": [1.5 + 0.2 * i for i in range(48)]}
    folder = make_tiny(tmp_path / "m", config={"rope_scaling": rope, "original_max_position_embeddings": 512,
                                               "max_position_embeddings": 16384, "sliding_window": 262144})
    model, tok = load(folder)
    chat = Chat(model, tok, max_tokens=3, prefill_step_size=96)  # prompts of several chunks
    words = "the quick brown fox jumps over a lazy dog while rivers run to the distant sea ".split()
    crossed, checked = False, 0
    for turn in range(5):
        msg = " ".join(words[(turn + i) % len(words)] for i in range(125))  # ~125 tokens a turn
        ids = tok.encode(chat.prompt(msg))
        reply = chat.ask(msg, lambda s: None)
        crossed = crossed or chat.cache.long_rope
        if len(ids) > 512:  # past the threshold: greedy over full forward passes gives the same answer
            seq, toks = list(ids), []
            for _ in range(3):
                t = int(np.argmax(_full_last(model, seq)))
                if t in tok.stop_ids:
                    break
                toks.append(t)
                seq.append(t)
            assert reply.text == tok.decode(toks), turn
            checked += 1
    assert crossed and chat.cache.offset > 512 and checked >= 2


def test_chat_skips_a_line_that_is_not_utf8(window_model, monkeypatch, capsys):
    import io
    import sys

    from phi3mlx import chat as chat_mod

    model, tok = window_model
    raw = b"hello\n\xff\xfe bad\n/exit\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), errors="surrogateescape"))  # as the CLI reads
    c = Chat(model, tok, max_tokens=2)
    chat_mod.run(c, chat_mod.PlainUI())
    err = capsys.readouterr().err
    assert "that line is not valid UTF-8 (byte 0xff at character 0); it was skipped" in err
    assert len(c.history) == 2  # "hello" was answered, the bad line skipped, /exit left


def test_cli_prompt_cache_round_trip(tmp_path, capsys):
    """cache-prompt writes a prefix once; generate --prompt-cache reuses it and gives the same text."""
    from phi3mlx.cli import main

    folder = make_tiny(tmp_path / "m")
    doc = "The lighthouse keeper counted the waves every night. " * 20
    f = tmp_path / "doc.safetensors"
    assert main(["cache-prompt", "--model", str(folder), "--system", doc, "--prompt-cache", str(f)]) == 0
    assert f.is_file() and "tokens)" in capsys.readouterr().out
    assert main(["cache-prompt", "--model", str(folder), "--system", doc, "--prompt-cache", str(f)]) == 1
    assert "exists (--force replaces it)" in capsys.readouterr().err
    args = ["generate", "--model", str(folder), "--system", doc, "--prompt", "How many?", "-m", "8", "-v"]
    assert main(args) == 0
    fresh = capsys.readouterr()
    assert main(args + ["--prompt-cache", str(f)]) == 0
    cached = capsys.readouterr()
    assert cached.out == fresh.out
    assert "from the cache" in cached.err and "from the cache" not in fresh.err
    other = make_tiny(tmp_path / "other", seed=1)
    assert main(["generate", "--model", str(other), "--prompt", "x", "--prompt-cache", str(f)]) == 1
    err = capsys.readouterr().err
    assert "different model" in err and err.count("\n") == 1


def test_logits_processors_see_the_cached_prefix(window_model):
    """A repetition penalty gives the same tokens whether the prompt's prefix came from a cache or not."""
    from phi3mlx.generate import make_logits_processors

    model, tok = window_model
    seen = []

    def record(history, logits):
        seen.append(history.size)
        return logits

    ids = _rand_ids(40, seed=11)
    procs = [record] + make_logits_processors(1e6, 64)
    fresh = [t for t, _ in generate_step(ids, model, max_tokens=6, logits_processors=procs)]
    n_fresh = list(seen)
    seen.clear()
    cache = model.make_cache()
    model(mx.array([ids[:30]]), cache=cache)
    cached = [t for t, _ in generate_step(ids[30:], model, max_tokens=6, logits_processors=procs, cache=cache)]
    assert seen == n_fresh == [40, 41, 42, 43, 44, 45]
    assert cached == fresh
    assert not set(cached) & set(ids)  # the huge penalty reached the cached prefix's ids too
    assert list(stream_generate(model, tok, ids, max_tokens=0)) == []


def test_token_ids_are_kept_as_a_list_and_follow_every_change(window_model):
    """token_ids is read once per change (a pool lookup waits for no computation), hands out copies, and
    follows passes, holds, trims, copies and resets."""
    model, _ = window_model
    cache = model.make_cache()
    model(mx.array([[5, 6, 7]]), cache=cache)
    assert cache.token_ids == [5, 6, 7]
    got = cache.token_ids
    got.append(99)  # a copy: the cache is unchanged
    assert cache.token_ids == [5, 6, 7]
    model(mx.array([[8]]), cache=cache)  # a new pass: the list follows
    assert cache.token_ids == [5, 6, 7, 8]
    twin = cache.copy()
    cache.trim(2)
    assert cache.token_ids == [5, 6] and twin.token_ids == [5, 6, 7, 8]
    model(mx.array([[9]]), cache=twin)
    assert twin.token_ids == [5, 6, 7, 8, 9] and cache.token_ids == [5, 6]
    held = twin.copy()
    held.hold([5, 6, 7])  # what set_state'd positions hold, as SlotBatch.take's caller says
    assert held.token_ids == [5, 6, 7] and twin.token_ids == [5, 6, 7, 8, 9]
    cache.reset()
    assert cache.token_ids == []
