"""Generation API: layers, sampling options, stop ids, stats; the generate CLI."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from phi3mlx import generate, load, stream_generate  # noqa: E402
from phi3mlx.cli import main  # noqa: E402
from phi3mlx.generate import generate_step, make_logits_processors, make_sampler  # noqa: E402

PROMPT = [32010, 15043, 727, 32007, 32001]


@pytest.fixture(scope="module")
def loaded(tiny_folder):
    return load(tiny_folder)


def test_model_call_shapes(loaded):
    model, _ = loaded
    out = model(mx.array([[1, 2, 3], [4, 5, 6]]))
    assert out.shape == (2, 3, 32064)
    assert model(mx.array([[1, 2, 3]]), last_only=True).shape == (1, 1, 32064)


def test_generate_step_greedy_equals_argmax_of_full_pass(loaded):
    model, _ = loaded
    toks = [t for t, _ in generate_step(PROMPT, model, max_tokens=10)]
    seq = list(PROMPT)
    for _ in range(10):
        seq.append(int(np.array(model(mx.array([seq])))[0, -1].argmax()))
    assert toks == seq[len(PROMPT):]


def test_generate_step_never_stops_early_and_yields_logprobs(loaded):
    model, tok = loaded
    out = list(generate_step(PROMPT, model, max_tokens=40))
    assert len(out) == 40
    lp = np.array(out[0][1])
    assert lp.shape == (32064,) and abs(np.exp(lp).sum() - 1) < 1e-3


def test_stream_generate_stops_on_end_ids_without_printing_them(loaded):
    model, tok = loaded
    ids = [t for t, _ in generate_step(PROMPT, model, max_tokens=30)]
    stop = ids[5]  # pretend the 6th greedy token is an end token
    tok.stop_ids.add(stop)
    try:
        rs = list(stream_generate(model, tok, PROMPT, max_tokens=30))
    finally:
        tok.stop_ids.discard(stop)
    first = ids.index(stop)
    assert rs[-1].finish_reason == "stop" and rs[-1].token == stop
    assert "".join(r.text for r in rs) == tok.decode(ids[:first])
    r = rs[-1]
    assert r.prompt_tokens == len(PROMPT) and r.generation_tokens == first + 1
    assert r.prompt_tps > 0 and r.peak_memory_gb > 0


def test_generate_returns_text_and_respects_max_tokens(loaded):
    model, tok = loaded
    text = generate(model, tok, PROMPT, max_tokens=7)
    rs = list(stream_generate(model, tok, PROMPT, max_tokens=7))
    assert text == "".join(r.text for r in rs)
    assert rs[-1].generation_tokens <= 7
    if rs[-1].finish_reason == "length":
        assert rs[-1].generation_tokens == 7
    # a string prompt is encoded as is
    s = "The capital of France is"
    assert generate(model, tok, s, max_tokens=5) == generate(model, tok, tok.encode(s), max_tokens=5)


def test_sampling_seed_and_filters(loaded):
    model, _ = loaded

    def run(repetition_penalty=None, **kw):
        return [t for t, _ in generate_step(PROMPT, model, max_tokens=12, sampler=make_sampler(**kw),
                                            logits_processors=make_logits_processors(repetition_penalty))]

    greedy = run()
    a = run(temperature=1.0, seed=7)
    assert a == run(temperature=1.0, seed=7)  # reproducible
    assert a != greedy  # near-flat random logits: sampling really samples
    assert run(temperature=1.0, top_k=1, seed=3) == greedy
    assert run(temperature=1.0, min_p=0.999, seed=3) == greedy
    assert run(temperature=1.0, top_p=1e-9, seed=3) == greedy
    rep = run(repetition_penalty=1e6)
    assert len(set(rep)) == len(rep)  # a huge penalty forbids any repeat in the window


def test_generate_cli_prints_completion(tiny_folder, capsys):
    assert main(["generate", "--model", str(tiny_folder), "--prompt", "Hello", "--max-tokens", "6", "--verbose"]) == 0
    out, err = capsys.readouterr()
    model, tok = load(tiny_folder)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello"}])
    assert out == generate(model, tok, prompt, max_tokens=6) + "\n"
    assert "prompt:" in err and "tok/s" in err and "peak memory" in err


def test_generate_cli_raw_and_default_model(capsys):
    # the built-in model ships in the package (offline)
    assert main(["generate", "--prompt", "Hi", "--raw", "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_help_documents_every_flag_with_defaults(capsys):
    for cmd in ("convert", "export-hf", "generate", "chat", "bench"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: phi3mlx " + cmd in out
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "(default: 0.0)" in out and "(default: phi3mlx:embedded)" in out


def test_prefilled_cache_crosses_longrope_threshold_by_reencoding(tmp_path):
    """A cache holding a short-factor prefix is re-encoded with the long factors when a generation
    continuing it crosses original_max_position_embeddings: the tokens equal a fresh run over the
    whole sequence and the argmax of full forward passes."""
    from phi3mlx.tiny import make_tiny

    rope = {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [4.0] * 48}
    folder = make_tiny(tmp_path / "lr", config={"rope_scaling": rope, "original_max_position_embeddings": 32,
                                                "max_position_embeddings": 1024, "sliding_window": None})
    model, _ = load(folder)
    cache = model.make_cache()
    model(mx.array([PROMPT * 4]), cache=cache)  # 20 tokens, short factors
    assert cache.long_rope is False
    cont = [t for t, _ in generate_step(PROMPT, model, max_tokens=20, cache=cache)]  # 25 + 20 > 32
    assert cache.long_rope is True and cache.token_ids == PROMPT * 5 + cont[:-1]
    fresh = [t for t, _ in generate_step(PROMPT * 5, model, max_tokens=20)]
    assert cont == fresh
    seq = PROMPT * 5
    for t in cont:  # every token is the argmax of a full forward pass over the sequence so far
        assert int(mx.argmax(model(mx.array([seq]))[0, -1])) == t
        seq = seq + [t]


def test_sampling_filters_match_their_definitions():
    """top-k, min-p and top-p keep exactly the tokens their definitions name; repetition penalty as mlx-lm's."""
    import numpy as np
    from mlx_lm.sample_utils import make_repetition_penalty

    from phi3mlx.generate import min_p_filter, top_k_filter, top_p_filter

    rng = np.random.default_rng(0)
    lp = rng.normal(size=(1, 50)).astype(np.float32) * 3
    lp = lp - np.log(np.exp(lp).sum())
    x = mx.array(lp)
    order = np.argsort(-lp[0])
    kept = lambda a: set(np.nonzero(np.isfinite(np.array(a)[0]))[0])  # noqa: E731
    assert kept(top_k_filter(x, 7)) == set(order[:7])
    assert kept(min_p_filter(x, 0.05)) == set(np.nonzero(np.exp(lp[0]) >= 0.05 * np.exp(lp[0]).max())[0])
    p = np.exp(lp[0])[order]
    n = int(np.searchsorted(np.cumsum(p), 0.8) + 1)  # smallest prefix of the sorted tokens holding 0.8
    assert kept(top_p_filter(x, 0.8)) == set(order[:n])
    assert np.allclose(np.array(top_p_filter(x, 0.8))[0, order[:n]], lp[0, order[:n]])
    hist = mx.array([3, 7, 7, 11])
    ours = make_logits_processors(1.3, 20)[0](hist, x)
    theirs = make_repetition_penalty(1.3, 20)(hist, x)
    assert np.allclose(np.array(ours), np.array(theirs))


def test_top_p_over_a_batch_with_ties_and_a_tiny_top_p():
    """Rows filtered together each keep their own nucleus; tokens tied at the edge are kept alike; a tiny top_p
    keeps only the most likely token; bfloat16 rows keep their dtype."""
    import numpy as np

    from phi3mlx.generate import top_p_filter

    p = np.array([[0.4, 0.2, 0.2, 0.1, 0.1], [0.05, 0.05, 0.1, 0.3, 0.5]], np.float32)
    out = np.array(top_p_filter(mx.array(np.log(p)), 0.5))
    assert np.isfinite(out[0]).tolist() == [True, True, True, False, False]  # 0.4 + 0.2 holds 0.5; its tie too
    assert np.isfinite(out[1]).tolist() == [False, False, False, False, True]  # 0.5 alone holds 0.5
    tiny = np.array(top_p_filter(mx.array(np.log(p)), 1e-9))
    assert np.isfinite(tiny).sum(axis=1).tolist() == [1, 1]
    low = top_p_filter(mx.array(np.log(p)).astype(mx.bfloat16), 0.7)  # no edge within bfloat16's rounding
    assert low.dtype == mx.bfloat16
    assert np.isfinite(np.array(low.astype(mx.float32))).tolist() == [[True, True, True, False, False],
                                                                       [False, False, False, True, True]]


def test_seeded_sampler_draws_what_mlx_categorical_draws():
    """The sampler's draw (filtered log-probabilities over the temperature, plus Gumbel noise from its own key
    split once per call) is mx.random.categorical's with the same key, in float32 and bfloat16."""
    from phi3mlx.generate import make_sampler

    x = mx.random.normal((3, 500), key=mx.random.key(4)) * 2
    for dtype in (mx.float32, mx.bfloat16):
        lp = (x - mx.logsumexp(x, axis=-1, keepdims=True)).astype(dtype)
        sampler, key = make_sampler(0.7, seed=11), mx.random.key(11)
        for _ in range(4):  # the key advances per call, as the reference's does
            key, sub = mx.random.split(key)
            assert sampler(lp).tolist() == mx.random.categorical(lp * (1.0 / 0.7), key=sub).tolist()


def test_reaching_the_context_says_so_with_the_real_rate(tmp_path, capsys):
    """A generation cut short by the context ends with finish_reason "context", a real rate, and the CLI
    says why it stopped (with and without --verbose)."""
    from phi3mlx.cli import main
    from phi3mlx.generate import stream_generate
    from phi3mlx.tiny import make_tiny

    folder = make_tiny(tmp_path / "c", config={"max_position_embeddings": 40, "original_max_position_embeddings": 40,
                                               "sliding_window": None})
    model, tok = load(folder)
    rs = list(stream_generate(model, tok, PROMPT, max_tokens=100))
    assert rs[-1].finish_reason == "context" and rs[-1].generation_tokens == 40 - len(PROMPT) + 1
    assert rs[-1].generation_tps > 0
    assert main(["generate", "--model", str(folder), "-p", "hello", "--raw", "-m", "100"]) == 0
    err = capsys.readouterr().err
    assert "generation stopped after" in err and "context of 40 tokens is full" in err
    assert main(["generate", "--model", str(folder), "-p", "hello", "--raw", "-m", "100", "-v"]) == 0
    err = capsys.readouterr().err
    assert "stopped: the context of 40 tokens is full" in err and " 0.0 tok/s | peak" not in err
