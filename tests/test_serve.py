"""``phi3mlx serve``: the official openai client against a server on a free loopback port; batched decoding
against each sequence decoded alone; bad requests; a load of concurrent clients with cancellations."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import mlx.core as mx
import numpy as np
import pytest
import uvicorn

from phi3mlx.cli import main
from phi3mlx.generate import generate, generate_step, make_sampler, stream_generate
from phi3mlx.loader import load
from phi3mlx.server import Server, _Relay
from phi3mlx import serving
from phi3mlx.errors import Phi3MLXError
from phi3mlx.serving import Delta, Done, Engine, OpenBLAS, Request, blas_threads

openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e '.[test]')")

MODEL = "phi3mlx:embedded"
KEY = "test-key"


class Running:
    """A uvicorn server on a free loopback port in a thread."""

    def __init__(self, server: Server):
        self.server = server
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        t = time.time()
        while not self.uv.started:
            assert time.time() - t < 30, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str = KEY, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def close(self):
        self.uv.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def embedded():
    return load(MODEL)


@pytest.fixture(scope="module")
def running(embedded):
    model, tok = embedded
    r = Running(Server(model, tok, MODEL, api_key=KEY, max_batch=16, max_queue=256))
    yield r
    r.close()


def _chat(tok, text: str, system=None) -> str:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def _cli_text(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["generate", "--model", MODEL, *args]) == 0
    return capsys.readouterr().out[:-1]  # the trailing newline the command prints


# ------------------------------------------------------------------------------ the openai client


def test_chat_equals_phi3mlx_generate(running, capsys):
    c = running.client()
    for q in ("What is 23 + 45?", "Tell me about the valley of Orvane."):
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], temperature=0,
                                      max_tokens=40)
        assert r.choices[0].message.content == _cli_text(capsys, "-p", q, "--temp", "0", "-m", "40")
        assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
        assert r.choices[0].finish_reason in ("stop", "length")


def test_seeded_sampling_is_reproducible_and_equals_generate(running, capsys):
    c = running.client()
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story about Orvane."}], temperature=1.2,
              top_p=0.95, max_tokens=30)
    a = c.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = c.chat.completions.create(seed=7, **kw).choices[0].message.content
    other = c.chat.completions.create(seed=8, **kw).choices[0].message.content
    assert a == b and a != other
    assert a == _cli_text(capsys, "-p", "Tell me a story about Orvane.", "--temp", "1.2", "--top-p", "0.95",
                          "--seed", "7", "-m", "30")


def test_completion_equals_generate_raw(running, capsys):
    c = running.client()
    r = c.completions.create(model=MODEL, prompt="The valley of Orvane", temperature=0, max_tokens=25)
    assert r.object == "text_completion"
    assert r.choices[0].text == _cli_text(capsys, "-p", "The valley of Orvane", "--raw", "--temp", "0", "-m", "25")


def test_streaming_equals_whole_with_usage(running, embedded):
    _, tok = embedded
    c = running.client()
    msgs = [{"role": "user", "content": "Who lives in Orvane?"}]
    whole = c.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=30)
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=30, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens == len(
        tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
    assert usage.completion_tokens == whole.usage.completion_tokens
    # completions stream too
    cs = list(c.completions.create(model=MODEL, prompt="Orvane is", temperature=0, max_tokens=12, stream=True))
    whole_c = c.completions.create(model=MODEL, prompt="Orvane is", temperature=0, max_tokens=12)
    assert "".join(ch.choices[0].text for ch in cs) == whole_c.choices[0].text


def test_usage_counts_every_generated_token(running, embedded):
    model, tok = embedded
    c = running.client()
    for prompt, n in (("The valley", 17), ("def ", 40), (_chat(tok, "What is 12 + 30?"), 40)):
        r = c.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=n)
        steps = list(stream_generate(model, tok, prompt, max_tokens=n))
        counted = sum(1 for s in steps if s.token is not None and s.token not in tok.stop_ids)
        assert r.usage.completion_tokens == counted and r.usage.prompt_tokens == len(tok.encode(prompt))
        assert r.choices[0].finish_reason == steps[-1].finish_reason
        assert r.choices[0].text == "".join(s.text for s in steps)


def test_stop_strings(running, embedded):
    model, tok = embedded
    c = running.client()
    q = _chat(tok, "Tell me about the valley of Orvane.")
    full = generate(model, tok, q, max_tokens=60)
    words = full.split()
    assert len(words) > 6
    # two stop strings: the earlier one in the text wins; a stop string made of several tokens
    s1, s2 = " " + words[5], " " + words[3] + " " + words[4]
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me about the valley of "
                                                          "Orvane."}], temperature=0, max_tokens=60, stop=[s1, s2])
    cut = min(i for i in (full.find(s1), full.find(s2)) if i >= 0)
    assert r.choices[0].message.content == full[:cut]
    assert r.choices[0].finish_reason == "stop"
    st = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me about the valley of "
                                                           "Orvane."}], temperature=0, max_tokens=60, stop=s2,
                                   stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in st) == full[: full.find(s2)]


def test_logprobs(running, embedded):
    model, tok = embedded
    c = running.client()
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 12 + 30?"}],
                                  temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}], add_generation_prompt=True,
                                  tokenize=True)
    ref = list(generate_step(ids, model, max_tokens=6))
    for entry, (t, lp) in zip(content, ref):
        assert entry.token == tok.decode([t])
        assert entry.bytes == list(tok.token_bytes(t))
        assert all(x.bytes == list(x.token.encode("utf-8")) for x in entry.top_logprobs)  # whole characters here
        assert abs(entry.logprob - float(lp[t])) < 1e-4
        assert [x.logprob for x in entry.top_logprobs] == sorted([x.logprob for x in entry.top_logprobs], reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
        assert len(entry.top_logprobs) == 3
    rc = c.completions.create(model=MODEL, prompt="The valley", temperature=0, max_tokens=4, logprobs=2)
    lps = rc.choices[0].logprobs
    assert len(lps.tokens) == rc.usage.completion_tokens and len(lps.top_logprobs[0]) == 2
    assert "".join(lps.tokens) == rc.choices[0].text
    # offsets count from the start of the prompt, as OpenAI's do without echo
    assert lps.text_offset == [len("The valley") + sum(len(x) for x in lps.tokens[:i]) for i in range(len(lps.tokens))]
    streamed = [ch.choices[0].logprobs for ch in c.completions.create(model=MODEL, prompt="The valley", temperature=0,
                                                                       max_tokens=4, logprobs=2, stream=True)
                if ch.choices and ch.choices[0].logprobs is not None]
    assert [o for x in streamed for o in x.text_offset] == lps.text_offset


def test_logprob_offsets_follow_the_text_where_the_first_space_is_dropped(folders):
    """Phi-3's tokenizer drops the leading space of the first generated token (" Hello" reads "Hello"):
    each token's offset is where its text starts in the generated text, not a sum of token lengths."""
    from phi3mlx.server import _completion_logprobs

    model, tok = load(str(folders["phi3"]))
    prompt = tok.encode("The valley of")
    spaced = [t for t in range(300, 30000) if tok.token_bytes(t).startswith(b" ") and len(tok.token_bytes(t)) > 2]
    # a prompt after which greedy decoding starts with a space-led token: nudge the last prompt token
    for extra in spaced[:400]:
        ids = prompt + [extra]
        first = int(mx.argmax(model(mx.array([ids]))[0, -1]))
        if tok.token_bytes(first).startswith(b" "):
            break
    else:
        pytest.skip("no prompt found whose first greedy token starts with a space")
    engine = Engine(model, tok)
    events, finished = [], threading.Event()
    engine.submit(Request(emit=lambda ev: (events.append(ev), isinstance(ev, Done) and finished.set()), ids=ids,
                          max_tokens=8, logprobs=1))
    engine.start()
    try:
        assert finished.wait(60)
    finally:
        engine.stop()
    text = "".join(ev.text for ev in events if isinstance(ev, Delta))
    lps = [lp for ev in events if isinstance(ev, Delta) for lp in ev.logprobs]
    assert lps[0].text.startswith(" ") and not text.startswith(" ")  # the case at hand
    assert lps[0].offset == 0
    for a, b in zip(lps, lps[1:]):
        assert text.startswith(b.text, b.offset) or "\ufffd" in b.text, (text, b.text, b.offset)
        assert b.offset == a.offset + len(a.text) - (1 if a is lps[0] else 0) or "\ufffd" in a.text
    assert _completion_logprobs(lps, 13)["text_offset"] == [13 + lp.offset for lp in lps]


def test_completion_logprobs_name_byte_tokens_by_their_bytes():
    """Tokens that are not whole UTF-8 characters read ``bytes:\\x..`` (as OpenAI's completions name them), so
    two byte tokens keep their own entries in top_logprobs instead of both reading U+FFFD."""
    from phi3mlx.server import _completion_logprobs
    from phi3mlx.serving import TokenLogprob

    e2, x80 = ("\ufffd", -0.5, [0xE2]), ("\ufffd", -1.5, [0x80])
    lp = TokenLogprob(5, "\ufffd", -0.5, [(5, *e2), (6, *x80), (7, " the", -2.0, [32, 116, 104, 101])], [0xE2], 0)
    out = _completion_logprobs([lp], 0)
    assert out["tokens"] == ["bytes:\\xe2"]
    assert out["top_logprobs"] == [{"bytes:\\xe2": -0.5, "bytes:\\x80": -1.5, " the": -2.0}]
    # two tokens of the same name (here the same bytes): the likelier one's log-probability is kept
    same = TokenLogprob(8, " a", -0.1, [(8, " a", -0.1, [32, 97]), (9, " a", -3.0, [32, 97])], [32, 97], 0)
    assert _completion_logprobs([same], 0)["top_logprobs"] == [{" a": -0.1}]


def test_models_and_health(running):
    c = running.client()
    assert [m.id for m in c.models.list().data] == [MODEL]
    with urllib.request.urlopen(running.url + "/health") as r:
        assert json.loads(r.read())["status"] == "ok"


def test_prefix_cache_reuses_a_shared_system_prompt(running, embedded):
    model, tok = embedded
    c = running.client()
    system = "You are the keeper of the valley of Orvane. " * 6
    first = c.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": system},
                                                             {"role": "user", "content": "What is 11 + 22?"}],
                                      temperature=0, max_tokens=12)
    second = c.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": system},
                                                              {"role": "user", "content": "What is 31 + 42?"}],
                                       temperature=0, max_tokens=12)
    assert second.usage.prompt_tokens_details.cached_tokens > len(tok.encode(system)) // 2
    assert second.choices[0].message.content == generate(model, tok, _chat(tok, "What is 31 + 42?", system),
                                                         max_tokens=12)
    assert first.choices[0].message.content == generate(model, tok, _chat(tok, "What is 11 + 22?", system),
                                                        max_tokens=12)


# ------------------------------------------------------------------------------ bad requests


def _post(url: str, body, key=KEY, raw: bool = False):
    data = body if raw else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(running):
    url = running.url + "/v1/chat/completions"
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    cases = [
        (b"{not json", 400, None, True),
        ({**ok, "temperature": "hot"}, 400, "temperature", False),
        ({**ok, "max_tokens": 0}, 400, "max_tokens", False),
        ({**ok, "max_tokens": -5}, 400, "max_tokens", False),
        ({**ok, "n": 2}, 400, "n", False),
        ({**ok, "stop": [1, 2]}, 400, "stop", False),
        ({**ok, "messages": "hi"}, 400, "messages", False),
        ({**ok, "messages": [{"role": "user", "content": "hi " * 600}]}, 400, "messages", False),
        ({**ok, "model": "gpt-4"}, 404, "model", False),
        ({**ok, "top_logprobs": 50, "logprobs": True}, 400, "top_logprobs", False),
    ]
    for body, status, param, raw in cases:
        code, err = _post(url, body, raw=raw)
        assert code == status, (body, err)
        assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
        assert err["error"]["param"] == param
    code, err = _post(url, ok, key=None)
    assert code == 401 and err["error"]["code"] == "invalid_api_key"
    code, err = _post(url, ok, key="wrong")
    assert code == 401
    code, err = _post(url, b"{" + b" " * (33 * 1024 * 1024) + b"}", raw=True)
    assert code == 413
    code, err = _post(running.url + "/v1/nothing", ok)
    assert code == 404
    code, body = _post(url, ok)
    assert code == 200 and body["choices"][0]["message"]["role"] == "assistant"
    long = _post(url, {**ok, "messages": [{"role": "user", "content": "hi " * 600}]})[1]
    assert long["error"]["code"] == "context_length_exceeded"


def test_a_full_queue_gives_429(embedded):
    model, tok = embedded
    server = Server(model, tok, MODEL, max_batch=1, max_queue=2)
    server.engine._admit = lambda: None  # a busy engine: nothing leaves the queue
    r = Running(server)
    try:
        url = r.url + "/v1/completions"
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        results = []

        def send():
            try:
                results.append(_post(url, body, key=None, raw=False)[0])
            except Exception as e:  # noqa: BLE001
                results.append(repr(e))

        waiting = [threading.Thread(target=send, daemon=True) for _ in range(2)]
        for t in waiting:
            t.start()
        t0 = time.time()
        while server.engine._queue.qsize() < 2:
            assert time.time() - t0 < 10
            time.sleep(0.02)
        code, err = _post(url, body, key=None)
        assert code == 429 and err["error"]["type"] == "rate_limit_error"
        server.engine.__dict__.pop("_admit")  # the engine frees up: the queued requests complete
        for t in waiting:
            t.join(timeout=30)
        assert results == [200, 200]
    finally:
        r.close()


def test_a_client_that_disconnects_frees_its_slot(running):
    c = running.client()
    engine = running.server.engine
    stream = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a long story."}],
                                       temperature=0.8, seed=1, max_tokens=2000, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    t0 = time.time()
    while engine.load["active"]:
        assert time.time() - t0 < 10, "the slot was not freed"
        time.sleep(0.02)
    steps = engine.steps
    time.sleep(0.3)
    assert engine.steps == steps  # nothing is decoded for the gone client


# ------------------------------------------------------------------------------ batching


def run_engine(engine: Engine, prompts: list, max_tokens: int, on_leave=None, settings=None) -> tuple[dict, dict]:
    """Submit one greedy request per prompt before the engine starts (so they are admitted together),
    run it to the end; every sampled token of request i (end tokens included) and its Done event."""
    got = {i: [] for i in range(len(prompts))}
    done = {}
    reqs = [Request(emit=lambda ev, i=i: done.__setitem__(i, ev) if isinstance(ev, Done) else None, ids=p,
                    **{"max_tokens": max_tokens, **(settings[i] if settings else {})}) for i, p in enumerate(prompts)]
    step, leave = engine._step, engine._leave

    def spy_step(slot, token, logprobs):
        got[reqs.index(slot.req)].append(token)
        step(slot, token, logprobs)

    def spy_leave(slot, *args, **kwargs):
        if on_leave is not None:
            on_leave(reqs.index(slot.req), slot)
        leave(slot, *args, **kwargs)

    engine._step, engine._leave = spy_step, spy_leave
    for r in reqs:
        engine.submit(r)
    engine.start()
    t0 = time.time()
    try:
        while len(done) < len(prompts):
            assert time.time() - t0 < 60
            time.sleep(0.01)
    finally:
        engine.stop()
        del engine._step, engine._leave  # the engine's own again: it may be run once more
    return got, done


@pytest.mark.parametrize("kind", ["phi3", "phimoe", "phi3small"])
def test_batched_greedy_equals_alone(folders, kind):
    """8 greedy requests admitted together are decoded in one batch; each gets the tokens it gets alone."""
    model, tok = load(str(folders[kind]))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(100, 5000, n).tolist() for n in (3, 9, 17, 30, 5, 44, 12, 21)]
    alone = [[t for t, _ in generate_step(p, model, max_tokens=12)] for p in prompts]
    engine = Engine(model, tok, max_batch=8)
    got, done = run_engine(engine, prompts, 12)
    assert engine.max_seen_batch == 8
    for i in range(8):
        assert got[i] == alone[i][: len(got[i])], i
        assert len(got[i]) == 12 or got[i][-1] in tok.stop_ids  # it stops only at max_tokens or an end token
        assert done[i].completion_tokens == len([t for t in got[i] if t not in tok.stop_ids])


@pytest.mark.parametrize("compiled", [False, True])
def test_pipelined_batch_mixing_greedy_sampled_and_logprobs_equals_alone(folders, compiled):
    """Greedy, seeded-sampled and logprobs rows in one pipelined batch (step t+1 built before step t's
    tokens are read) each get the tokens they get alone; rows that end leave with exactly the positions
    they hold (the pooled caches), though the next step had already written one more."""
    model, tok = load(str(folders["phi3"]))
    rng = np.random.default_rng(5)
    prompts = [rng.integers(100, 5000, n).tolist() for n in (4, 11, 7, 25, 16, 9, 13, 6)]
    # rows 1, 6 and 7 share their filter (top-p 0.9) and are filtered together, each with its own noise
    settings = [{}, {"temperature": 0.8, "top_p": 0.9, "seed": 1}, {"logprobs": 2}, {},
                {"temperature": 1.0, "seed": 2}, {"max_tokens": 3}, {"temperature": 0.5, "top_p": 0.9, "seed": 3},
                {"temperature": 1.2, "top_p": 0.9, "seed": 4, "logprobs": 1}]
    alone = []
    for p, kw in zip(prompts, settings):
        sampler = make_sampler(kw.get("temperature", 0.0), kw.get("top_p", 1.0), seed=kw.get("seed"))
        alone.append([t for t, _ in generate_step(p, model, max_tokens=kw.get("max_tokens", 10), sampler=sampler)])
    engine = Engine(model, tok, max_batch=8, compiled=compiled)
    got, done = run_engine(engine, prompts, 10, settings=settings)
    for i in range(8):
        assert done[i].finish_reason in ("stop", "length"), done[i]
        assert got[i] == alone[i][: len(got[i])], i
        assert len(got[i]) == len(alone[i]) or got[i][-1] in tok.stop_ids
    assert engine.max_seen_batch == 8 and engine.overlapped > 0
    assert len(engine._pool) == 8
    for c in engine._pool:
        assert {layer.offset for layer in c} == {len(c.token_ids)}


def test_load_of_concurrent_clients(running, embedded):
    """16 clients x 10 requests (mixed lengths, half streaming, some cancelled mid-stream): every request
    not cancelled completes with the text it gets alone; memory returns to its level before the load."""
    model, tok = embedded
    questions = ["What is 12 + 30?", "Who lives in Orvane?", "Add 41 and 17.", "Tell me about Mount Caldor.",
                 "45 + 23 = ?"]
    lengths = [5, 12, 24]
    expected = {(q, n): generate(model, tok, _chat(tok, q), max_tokens=n) for q in questions for n in lengths}
    c = running.client(timeout=120)
    c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": questions[0]}], temperature=0,
                              max_tokens=5)
    mx.clear_cache()
    before = mx.get_active_memory()
    failures, completed, cancelled = [], [], []

    def client(k: int):
        for j in range(10):
            q, n = questions[(k + j) % 5], lengths[(k * 3 + j) % 3]
            msgs = [{"role": "user", "content": q}]
            try:
                if (k + j) % 2:
                    s = c.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=n, stream=True)
                    if j % 4 == 3:  # cancel mid-stream
                        for i, _ in enumerate(s):
                            if i == 2:
                                break
                        s.close()
                        cancelled.append(1)
                        continue
                    text = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
                else:
                    text = c.chat.completions.create(model=MODEL, messages=msgs, temperature=0,
                                                     max_tokens=n).choices[0].message.content
                if text != expected[(q, n)]:
                    failures.append((q, n, text, expected[(q, n)]))
                completed.append(1)
            except Exception as e:  # noqa: BLE001
                failures.append(repr(e))

    t0 = time.time()
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads), "clients did not finish in time"
    assert time.time() - t0 < 240
    assert not failures, failures[:3]
    assert len(completed) + len(cancelled) == 160 and cancelled
    assert running.server.engine.max_seen_batch > 4  # requests were decoded together
    with urllib.request.urlopen(running.url + "/health") as r:
        health = json.loads(r.read())
    assert health["steps"] == running.server.engine.steps and health["rows_decoded"] > 2 * health["steps"]
    t1 = time.time()
    while running.server.engine.load["active"] and time.time() - t1 < 10:
        time.sleep(0.05)
    time.sleep(0.2)
    mx.clear_cache()
    after = mx.get_active_memory()
    engine = running.server.engine
    per_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * model.config.head_dim * 4
    pooled = engine.pool_entries * 512 * per_token  # the prefix pool's bound for these short chats
    assert after <= before + pooled + (1 << 20), (before, after)


# ------------------------------------------------------------------------------ the command


def test_serve_command(capsys, tmp_path):
    """`phi3mlx serve` as a user starts it (here with --compile-steps and --log-level warning): a subprocess
    answering on its port, logging no request; its bad flags and a taken port are one-line errors before
    the model loads."""
    import subprocess
    import sys

    from phi3mlx.bench_serve import Subprocess, free_port, stream_request

    port = free_port()
    proc = Subprocess("phi3mlx serve", [sys.executable, "-m", "phi3mlx", "serve", "--port", str(port),
                                        "--model-id", "m", "--compile-steps", "--log-level", "warning"], port)
    try:
        ttft, n = stream_request(port, "m", "What is 12 + 30?", 8)
        assert n >= 1 and ttft > 0
        proc.log.seek(0)
        assert "POST /v1/chat/completions" not in proc.log.read()  # info would log every request
        taken = subprocess.run([sys.executable, "-m", "phi3mlx", "serve", "--port", str(port)], capture_output=True,
                               text=True, timeout=120)
        assert taken.returncode == 1 and taken.stderr.strip().splitlines() == [
            f"phi3mlx: error: cannot listen on 127.0.0.1:{port}: Address already in use"]
    finally:
        proc.close()
    for argv, needle in ((["--port", "70000"], "--port must be in 1..65535"),
                         (["--max-batch", "0"], "--max-batch must be at least 1"),
                         (["--blas-threads", "0"], "--blas-threads must be at least 1, got 0"),
                         (["--compile-steps", "--no-compile-steps", "--max-batch", "0"],
                          "--max-batch must be at least 1"),  # both spellings parse
                         (["--bogus"], "unrecognized arguments: --bogus"),
                         (["--log-level", "loud"], "invalid choice: 'loud'"),
                         (["--model", str(tmp_path / "none")], "model path not found")):
        assert main(["serve", *argv]) == 1
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err


def test_local_image_paths_are_limited_to_the_image_dir(tmp_path, capsys):
    """A request's local image path: any on loopback, none beyond it, only inside --image-dir when given
    (links resolved, so a link out of the folder is refused; a relative path is taken from the folder);
    a Server built without saying takes none."""
    import os

    from PIL import Image

    from phi3mlx.server import ANY_PATH, APIError, _image, local_images

    inside, outside, sibling = tmp_path / "imgs", tmp_path / "other", tmp_path / "imgs2"
    for d in (inside, outside, sibling):
        d.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(inside / "a.png")
    Image.new("RGB", (8, 8), (10, 200, 10)).save(outside / "b.png")
    Image.new("RGB", (8, 8), (10, 10, 200)).save(sibling / "c.png")
    (inside / "link.png").symlink_to(outside / "b.png")
    assert local_images("127.0.0.1", None) is ANY_PATH and local_images("::1", None) is ANY_PATH
    assert local_images("localhost", None) is ANY_PATH
    assert local_images("0.0.0.0", None) is None and local_images("192.168.1.5", None) is None
    root = local_images("0.0.0.0", str(inside))
    assert root == os.path.realpath(inside)
    assert local_images("0.0.0.0", "*") == os.path.realpath("*")  # a folder named *, never "any path"
    assert _image(str(outside / "b.png"), ANY_PATH).getpixel((0, 0)) == (10, 200, 10)
    assert _image("file://" + str(inside / "a.png"), root).getpixel((0, 0)) == (200, 10, 10)
    assert _image("a.png", root).getpixel((0, 0)) == (200, 10, 10)  # relative: from the folder
    for path, allowed, needle in ((outside / "b.png", root, "outside the server's --image-dir"),
                                  (inside / "link.png", root, "outside the server's --image-dir"),
                                  (inside / ".." / "other" / "b.png", root, "outside the server's --image-dir"),
                                  ("../imgs2/c.png", root, "outside the server's --image-dir"),
                                  (sibling / "c.png", root, "outside the server's --image-dir"),
                                  (inside / "a.png", None, "takes no local image paths")):
        with pytest.raises(APIError) as e:
            _image(str(path), allowed)
        assert e.value.status == 403 and needle in e.value.message
    model, tok = load("phi3mlx:embedded")
    assert Server(model, tok, "m").image_dir is None
    assert main(["serve", "--image-dir", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"phi3mlx: error: --image-dir {tmp_path / 'nope'} is not a folder"], err


def test_batched_rows_crossing_the_longrope_threshold(folders):
    """Phi-3-mini-128k's LongRoPE with the threshold at 32 positions: rows that cross it during decoding
    leave the one-buffer batch and re-encode with the long factors; every row still gets its own tokens."""
    from phi3mlx.models import build_model, parse_config

    from .helpers import tiny_hf_config

    cfg = parse_config(tiny_hf_config("Phi-3-mini-128k-instruct", original_max_position_embeddings=32))
    mx.random.seed(5)
    model = build_model(cfg)
    model.eval()
    mx.eval(model.parameters())
    _, tok = load(str(folders["phi3"]))  # the same Phi-3 vocabulary
    rng = np.random.default_rng(4)
    prompts = [rng.integers(100, 5000, n).tolist() for n in (20, 28, 10, 40)]
    alone = [[t for t, _ in generate_step(p, model, max_tokens=16)] for p in prompts]
    engine = Engine(model, tok, max_batch=4)
    left = []
    # a row leaving before its end left because of the threshold
    got, done = run_engine(engine, prompts, 16, on_leave=lambda i, slot: None if slot.done else left.append(i))
    # rows 0 and 1 cross the threshold while decoding; row 3 begins past it; row 2 never reaches it
    assert len(set(left)) >= 2 and 2 not in left, left
    for i in range(4):
        assert got[i] == alone[i][: len(got[i])], i
        assert len(got[i]) == 16 or got[i][-1] in tok.stop_ids


def _slot_test_model(embedded, kind: str):
    """The built-in model, or a random phimoe whose sliding window (20) is shorter than the test's rows."""
    from phi3mlx.models import build_model, parse_config

    from .helpers import FT_MOE

    if kind == "embedded":
        return embedded[0]
    mx.random.seed(0)
    model = build_model(parse_config(dict(FT_MOE, sliding_window=20)))
    model.eval()
    return model


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("kind", ["embedded", "phimoe-window"])
def test_slot_batch_decoding_equals_each_row_alone(embedded, kind, compiled):
    """Model.decode_slots over a SlotBatch (rows of different lengths, a row leaving and joining again,
    a sliding window shorter than the rows), plain or compiled, gives each row the logits of its own
    decoding (the project's parity bound, 1e-4)."""
    from phi3mlx.cache import SlotBatch

    model = _slot_test_model(embedded, kind)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 1000, n).tolist() for n in (3, 17, 40, 9)]
    batch = SlotBatch(len(model.layers))
    alone = []
    for p in prompts:
        c = model.make_cache()
        model(mx.array(p)[None], cache=c)
        alone.append(c)
        c2 = model.make_cache()
        model(mx.array(p)[None], cache=c2)
        batch.add(c2)
    toks = mx.array([5, 6, 7, 8])
    for step in range(30):
        got = model.decode_slots(toks, batch, False, compiled)
        want = mx.concatenate([model(toks[i : i + 1][None], cache=alone[i])[:, -1] for i in range(4)])
        assert float(mx.abs(got - want).max()) <= 1e-4  # float rounding of the masked reduction
        toks = mx.argmax(want, -1)
        if step == 10:  # row 1 leaves (into a cache of its own) and joins again as the last row
            back = batch.take(1, model.make_cache())
            assert back.offset == len(prompts[1]) + 11
            batch.add(back)
            alone.append(alone.pop(1))
            toks = mx.concatenate([toks[:1], toks[2:], toks[1:2]])


@pytest.mark.parametrize("kind", ["embedded", "phimoe-window"])
def test_batched_prefill_equals_each_prompt_alone(embedded, kind):
    """Model.prefill_slots runs prompts of different lengths as right-padded rows of one pass, each
    continuing its own cached prefix (none, a few positions, more than the window): each row's logits
    are those of its prompt's own pass, and decoding on from the rows gives each its own logits
    (the padding's keys are never seen). The project's parity bound, 1e-4."""
    model = _slot_test_model(embedded, kind)
    rng = np.random.default_rng(1)
    prefixes = [[], rng.integers(0, 1000, 5).tolist(), [], rng.integers(0, 1000, 33).tolist()]
    prompts = [rng.integers(0, 1000, n).tolist() for n in (7, 1, 30, 12)]
    main = model.slot_batch()  # a batch with a row already decoding, which the prefilled rows join
    c0 = model.make_cache()
    model(mx.array([[3, 4, 5]]), cache=c0)
    main.add(c0.copy())
    part, alone, want = model.slot_batch(), [], []
    for pre, p in zip(prefixes, prompts):
        c = model.make_cache()
        if pre:
            model(mx.array(pre)[None], cache=c)
        part.add(c.copy())
        want.append(model(mx.array(p)[None], cache=c)[:, -1])
        alone.append(c)
    L = max(map(len, prompts))
    tokens = mx.array([p + [0] * (L - len(p)) for p in prompts])
    got = model.prefill_slots(tokens, [len(p) for p in prompts], part, False)
    assert part.lengths == [len(a) + len(b) for a, b in zip(prefixes, prompts)]
    assert float(mx.abs(got - mx.concatenate(want)).max()) <= 1e-4
    main.extend(part)
    assert main.rows == 5 and main.lengths[1:] == part.lengths
    toks = mx.array([1] + [int(t) for t in mx.argmax(got, -1).tolist()])
    alone.insert(0, c0)
    for _ in range(6):
        got = model.decode_slots(toks, main, False)
        want = mx.concatenate([model(toks[i : i + 1][None], cache=alone[i])[:, -1] for i in range(5)])
        assert float(mx.abs(got - want).max()) <= 1e-4
        toks = mx.argmax(want, -1)
    with pytest.raises(ValueError, match="do not fit"):
        model.prefill_slots(tokens, [len(p) for p in prompts[:3]], model.slot_batch(), False)


def test_requests_arriving_together_are_prefilled_in_one_pass(folders):
    """Greedy requests admitted in the same round (one continuing a pooled conversation) are prefilled
    as rows of one pass, grouped by length so that padding stays bounded; one whose prompt the pool
    holds but for its last token joins the batch with no pass; each gets the tokens it gets alone."""
    model, tok = load(str(folders["phi3"]))
    rng = np.random.default_rng(7)
    first = rng.integers(5, 1000, 14).tolist()
    prompts = [rng.integers(5, 1000, n).tolist() for n in (10, 12, 9, 11)] + [rng.integers(5, 1000, 120).tolist()]
    engine = Engine(model, tok, max_batch=8)
    got0, done0 = run_engine(engine, [first], 6)  # its cache goes to the pool: the prompt and the tokens fed
    assert done0[0].finish_reason == "length"
    prompts.append(first + got0[0] + rng.integers(5, 1000, 4).tolist())  # the conversation goes on: 5 new
    prompts.append(list(first))  # asked again: all but its last token from the pool, no pass of its own
    alone = [[t for t, _ in generate_step(p, model, max_tokens=8)] for p in prompts]
    calls = []
    real = model.prefill_slots

    def spy(tokens, counts, batch, long_rope):
        calls.append(list(counts))
        return real(tokens, counts, batch, long_rope)

    model.prefill_slots = spy
    try:
        got, done = run_engine(engine, prompts, 8)  # engine runs again, with its pool
    finally:
        del model.prefill_slots
    assert sorted(map(sorted, calls)) == [[5, 9, 10, 11, 12], [120]], calls  # the long prompt in a pass of its own
    assert done[5].cached_tokens == len(first) + 5 and done[6].cached_tokens == len(first) - 1
    for i in range(len(prompts)):
        assert got[i] == alone[i][: len(got[i])], i
        assert len(got[i]) == 8 or got[i][-1] in tok.stop_ids


def test_an_engine_stopped_while_decoding_goes_on_where_it_was(folders):
    """stop() in the middle of a batch (a step in flight, rows holding their tokens), then start(): every
    request ends with the tokens it gets alone, none fed twice."""
    model, tok = load(str(folders["phi3"]))
    rng = np.random.default_rng(11)
    prompts = [rng.integers(100, 5000, n).tolist() for n in (6, 13, 9)]
    alone = [[t for t, _ in generate_step(p, model, max_tokens=24)] for p in prompts]
    engine = Engine(model, tok, max_batch=4)
    got, done = {i: [] for i in range(3)}, {}
    step = engine._step

    def spy(slot, token, logprobs):
        got[prompts.index(slot.req.ids)].append(token)
        step(slot, token, logprobs)

    engine._step = spy
    for i, p in enumerate(prompts):
        engine.submit(Request(emit=lambda ev, i=i: done.__setitem__(i, ev) if isinstance(ev, Done) else None,
                              ids=p, max_tokens=24))
    engine.start()
    t0 = time.time()
    while min(len(g) for g in got.values()) < 5:
        assert time.time() - t0 < 60
        time.sleep(0.001)
    engine.stop()
    assert not done and engine._flight is not None  # stopped mid-way, its next step kept
    engine.start()
    while len(done) < 3:
        assert time.time() - t0 < 60
        time.sleep(0.01)
    engine.stop()
    for i in range(3):
        assert got[i] == alone[i][: len(got[i])] and len(got[i]) == 24, i


def test_slot_batch_takes_several_rows_at_once(embedded):
    """take_rows removes rows in one go: each leaving row's first n positions land in its cache, the rows
    that stay keep their order and contents in buffers cut to what they need; a row named twice or more
    positions than a row has is refused."""
    model = embedded[0]
    batch, caches = model.slot_batch(), []
    for n in (5, 70, 9, 12):
        c = model.make_cache()
        model(mx.arange(1, n + 1)[None], cache=c)
        caches.append(c)
        batch.add(c.copy())
    before = [mx.array(a) for a in batch.keys + batch.values]
    a, b = model.make_cache(), model.make_cache()
    batch.take_rows([(1, a, None), (3, b, 7)])
    assert batch.lengths == [5, 9] and batch.capacity == 64  # the 70-position row is gone: one step of room
    assert a.offset == 70 and b.offset == 7
    for i in range(len(model.layers)):
        for got, want in ((a[i].state[0], caches[1][i].state[0]), (b[i].state[1], caches[3][i].state[1][:, :, :7])):
            assert mx.array_equal(got, want)
        for j, r in enumerate((0, 2)):
            assert mx.array_equal(batch.keys[i][j, :, :9], before[i][r, :, :9])
    for picks, msg in (([(0, a, None), (0, b, None)], "more than once"), ([(1, a, 10)], "cannot take 10"),
                       ([(2, a, None)], "row 2 has no positions")):
        with pytest.raises(ValueError, match=msg):
            batch.take_rows(picks)
    assert batch.lengths == [5, 9]


def test_compiled_slot_step_reads_the_weights_at_every_call():
    """The compiled step takes the model's weights as inputs: weights changed after it was traced (say,
    adapters loaded into a served model) are used, not the traced ones."""
    from phi3mlx.cache import SlotBatch
    from phi3mlx.models import build_model, parse_config

    from .helpers import FT_PHI3

    mx.random.seed(1)
    model = build_model(parse_config(dict(FT_PHI3, model_type="phi3", num_hidden_layers=1, intermediate_size=256,
                                          vocab_size=32064, max_position_embeddings=64, rms_norm_eps=1e-5)))
    model.eval()

    def step():
        batch = SlotBatch(len(model.layers))
        for p in ([1, 2, 3], [4, 5, 6, 7, 8]):
            c = model.make_cache()
            model(mx.array(p)[None], cache=c)
            batch.add(c)
        return model.decode_slots(mx.array([9, 10]), batch, False, compiled=True)

    before = step()
    head = model.lm_head if "lm_head" in model else model.model.embed_tokens
    head.weight = head.weight * 2.0
    after = step()
    assert float(mx.abs(after - 2.0 * before).max()) <= 1e-4 * float(mx.abs(before).max())


def test_compiled_slot_step_keeps_a_bounded_number_of_traces(monkeypatch):
    """Past ``max_slot_traces`` shapes the compiled step starts afresh (MLX keeps every trace of a compiled
    function), and every shape still gives the plain step's logits."""
    from phi3mlx.cache import SlotBatch
    from phi3mlx.models import build_model, parse_config

    from .helpers import FT_PHI3

    mx.random.seed(2)
    model = build_model(parse_config(dict(FT_PHI3, model_type="phi3", num_hidden_layers=1, intermediate_size=256,
                                          vocab_size=32064, max_position_embeddings=256, rms_norm_eps=1e-5)))
    model.eval()
    monkeypatch.setattr(type(model), "max_slot_traces", 3)
    fns = []  # the compiled functions used, kept alive
    for rows in (1, 2, 3, 4, 5, 2):
        got = {}
        for compiled in (False, True):
            batch = SlotBatch(len(model.layers))
            for r in range(rows):
                c = model.make_cache()
                model(mx.array([[1 + r, 2, 3]]), cache=c)
                batch.add(c)
            got[compiled] = model.decode_slots(mx.arange(rows), batch, False, compiled=compiled)
        assert float(mx.abs(got[True] - got[False]).max()) <= 1e-4, rows
        fn, shapes = model._slot_steps[False]
        assert len(shapes) <= 3 and (rows, 64) in shapes
        if not any(f is fn for f in fns):
            fns.append(fn)
    assert len(fns) == 2  # shapes 1-3 on the first function, 4, 5 and 2 on a fresh one


def test_engine_survives_bad_requests_and_keeps_to_the_context(folders):
    """A request that fails at admission ends alone (the engine goes on); rows decoding in the shared
    buffer stop at the model's context."""
    from phi3mlx.models import build_model, parse_config

    from .helpers import FT_PHI3

    _, tok = load(str(folders["phi3"]))
    cfg = parse_config(dict(FT_PHI3, model_type="phi3", num_hidden_layers=2, intermediate_size=256, vocab_size=32064,
                            max_position_embeddings=24, original_max_position_embeddings=24, rms_norm_eps=1e-5))
    mx.random.seed(0)
    model = build_model(cfg)
    model.eval()
    mx.eval(model.parameters())  # MLX streams are per thread: the engine thread gets evaluated weights
    engine = Engine(model, tok).start()
    try:
        done = {}
        engine.submit(Request(emit=lambda ev: done.__setitem__("bad", ev) if isinstance(ev, Done) else None,
                              ids=[5, 6], temperature=0.7, seed=-1))
        engine.submit(Request(emit=lambda ev: done.__setitem__("ok", ev) if isinstance(ev, Done) else None,
                              ids=list(range(100, 110)), max_tokens=100))
        t0 = time.time()
        while len(done) < 2:
            assert time.time() - t0 < 30
            time.sleep(0.01)
        assert done["bad"].finish_reason == "error" and done["bad"].error
        ok = done["ok"]
        assert ok.finish_reason in ("length", "stop") and ok.prompt_tokens + ok.completion_tokens <= 24
    finally:
        engine.stop()


def test_stop_strings_are_held_back_until_decided(embedded):
    """Text that may begin a stop string is not sent (with several stop strings too); at a stop string
    the text before it is sent and the request ends."""
    from types import SimpleNamespace

    model, tok = embedded
    engine = Engine(model, tok)
    sent, ends = [], []
    req = SimpleNamespace(stop=["zq", "xyzw"], emit=lambda ev: (sent if not isinstance(ev, Done) else ends).append(ev))
    s = SimpleNamespace(req=req, text="", sent=0, pending_lp=[], done=False, in_batch=False, ids=[1], n=0, cached=0,
                        cache=model.make_cache())
    for piece in ("ab", "xyz"):
        s.text += piece
        assert not engine._check_stop(s)
    assert "".join(d.text for d in sent) == "ab"  # "xyz" may begin "xyzw"
    s.text += "w"
    assert engine._check_stop(s) and ends[0].finish_reason == "stop"
    assert "".join(d.text for d in sent) == "ab"


def test_token_id_prompts_are_range_checked(running):
    code, err = _post(running.url + "/v1/completions", {"model": MODEL, "prompt": [5, 99999], "max_tokens": 2})
    assert code == 400 and "token ids must be in [0, 1024)" in err["error"]["message"]
    code, err = _post(running.url + "/v1/completions", {"model": MODEL, "prompt": "hi", "seed": -1})
    assert code == 400 and err["error"]["param"] == "seed"


def test_waiting_events_go_out_in_one_write_one_event_each(embedded):
    """Events that queued up while the stream was busy are sent in one write, still one SSE event per
    delta, in order, ending with the finish chunk, usage and [DONE]; the relay hands a round's events
    over in one go."""
    model, tok = embedded
    server = Server(model, tok, "m", engine=Engine(model, tok))

    async def scenario():
        events: asyncio.Queue = asyncio.Queue()
        relay = _Relay(asyncio.get_running_loop())
        for ev in (Delta("a"), Delta("b"), Delta("c"), Done("stop", 5, 3, 0)):
            relay.put(events, ev)
        assert events.empty()  # nothing is handed over before the round ends
        relay.kick()
        relay.kick()  # a second kick before the flush schedules nothing more
        await asyncio.sleep(0)
        assert events.qsize() == 4
        req = Request(emit=lambda ev: None, ids=[1, 2])
        gen = server._stream(req, events, "id", 0, True, True, 0)
        return [part async for part in gen]

    parts = asyncio.run(scenario())
    assert len(parts) == 2  # the role chunk, then everything that was waiting
    events = [json.loads(e[6:]) for e in parts[1].split("\n\n") if e and e != "data: [DONE]"]
    assert [e["choices"][0]["delta"].get("content") for e in events[:3]] == ["a", "b", "c"]
    assert events[3]["choices"][0]["finish_reason"] == "stop" and events[4]["usage"]["completion_tokens"] == 3
    assert parts[1].endswith("data: [DONE]\n\n")


def test_completion_prompt_ids_a_tokenizer_cannot_decode_get_a_400():
    """Token ids the model's vocabulary has but its tokenizer does not (Phi-3-small pads its vocabulary) are a
    400 naming the problem when logprobs need the prompt's text, and are not decoded otherwise."""
    from types import SimpleNamespace

    from phi3mlx.server import APIError

    def decode(ids, skip_special_tokens=False):
        raise ValueError(f"token id {max(ids)} is out of range for this tokenizer (0..99)")

    stub = SimpleNamespace(tokenizer=SimpleNamespace(decode=decode), model=SimpleNamespace(config=SimpleNamespace(
        vocab_size=128)))
    assert Server._completion_prompt(stub, {"prompt": [5, 120]}, False) == ([5, 120], 0)
    with pytest.raises(APIError) as e:
        Server._completion_prompt(stub, {"prompt": [5, 120]}, True)
    assert e.value.status == 400 and "token id 120 is out of range" in str(e.value)


def test_a_small_model_is_served_with_one_blas_thread_and_the_count_is_put_back(embedded, monkeypatch):
    """On the CPU backend a model of at most SMALL_MODEL_BYTES of weights (the built-in one: about 7 MB) runs
    with one BLAS thread while the engine runs, a larger one with the process's count; an explicit count wins;
    the count before start() is back after stop()."""
    model, tok = embedded
    if mx.default_device() != mx.cpu:
        pytest.skip("the automatic rule is for MLX's CPU backend")
    assert blas_threads(model) == 1 and blas_threads(model, 3) == 3
    with pytest.raises(Phi3MLXError, match="BLAS thread count must be 1 or more, got 0"):
        blas_threads(model, 0)
    monkeypatch.setattr(serving, "SMALL_MODEL_BYTES", 1024)
    assert blas_threads(model) is None

    class FakeBLAS:  # the library's count, as OpenBLAS keeps it
        count, seen = 2, []

        @property
        def threads(self):
            return FakeBLAS.count

        @threads.setter
        def threads(self, n):
            FakeBLAS.count = n
            FakeBLAS.seen.append(n)

    monkeypatch.setattr(serving.OpenBLAS, "find", classmethod(lambda cls: FakeBLAS()))
    monkeypatch.setattr(serving, "_blas_users", 0)  # engines of other tests (the real library) aside
    seen_during = []
    a, b = Engine(model, tok, blas=1), Engine(model, tok, blas=1)  # the count is the process's: two engines
    a.start(), b.start()
    a.stop()
    assert FakeBLAS.count == 1  # b still runs
    b.stop()
    assert FakeBLAS.count == 2 and FakeBLAS.seen == [1, 1, 2]
    FakeBLAS.seen.clear()
    for blas, during in ((None, 2), (1, 1)):  # None: automatic, here a "large" model: left as it is
        e = Engine(model, tok, blas=blas)
        got, done = run_engine(e, [tok.encode("Add 2 and 3.")], 4,
                               on_leave=lambda i, slot: seen_during.append(FakeBLAS.count))
        assert done[0].finish_reason in ("stop", "length") and seen_during[-1] == during
        assert FakeBLAS.count == 2  # put back by stop()
    assert FakeBLAS.seen == [1, 2]


def test_openblas_is_found_and_set_where_this_process_has_it():
    """Where MLX runs on OpenBLAS here (.ci/run preloads it when the machine has it), its thread count is
    read and set through the library itself."""
    lib = OpenBLAS.find()
    if lib is None:
        pytest.skip("no OpenBLAS in this process (MLX's bundled BLAS has no thread count to set)")
    before = lib.threads
    try:
        lib.threads = 1
        assert lib.threads == 1
        a = mx.random.normal((64, 256))
        assert mx.allclose(a @ a.T, mx.array(np.array(a) @ np.array(a).T), atol=1e-3)  # still multiplies
    finally:
        lib.threads = before
    assert lib.threads == before


def test_the_prefix_pool_keeps_one_entry_per_prefix(embedded):
    """Requests asking the same again refresh one pooled entry instead of filling the pool with copies,
    so the other prefixes stay; an entry that a longer one starts with gives way to it; the repeated
    prompt then joins with its whole prompt but the last token from the pool."""
    model, tok = embedded
    engine = Engine(model, tok, max_batch=4, pool_entries=3)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True)
               for q in ("What is 23 + 45?", "Who lives in the valley?", "Add 17 and 38.")]
    got, done = run_engine(engine, prompts, 6)  # three prefixes pooled
    held = sorted(c.token_ids for c in engine._pool)
    assert len(held) == 3 and all(any(h[: len(p)] == p for h in held) for p in prompts)
    for _ in range(2):  # the first prompt four times at once, twice: still three entries, one per prompt
        got2, done2 = run_engine(engine, [prompts[0]] * 4, 6)
        assert all(d.cached_tokens == len(prompts[0]) - 1 for d in done2.values())
        assert got2[0] == got2[1] == got2[2] == got2[3] == got[0]
        assert sorted(c.token_ids for c in engine._pool) == held
    oldest, short = engine._pool[0], engine._pool[1]
    longer = short.copy()  # a cache holding the same ids and more
    longer.extend(model, [5, 6, 7], 3, short.long_rope)
    longer.hold(short.token_ids + [5, 6, 7])
    engine._to_pool(longer)
    assert len(engine._pool) == 3 and engine._pool[-1] is longer and all(c is not short for c in engine._pool)
    assert engine._pool[0] is oldest  # nothing else had to go


def test_a_pooled_cache_covers_another_only_where_it_can_be_cut_back_to_it():
    """A cache covers another (and replaces it in the prefix pool) only if it holds the other's ids first,
    with the same LongRoPE set, and can be cut back to them without a prefill: a window cache that has
    dropped positions cannot, so the shorter one is kept."""

    class Layer:
        def __init__(self, ok):
            self.ok = ok

        def can_trim(self, n):
            return self.ok or n == 0

    class Cache(list):
        def __init__(self, ids, long=False, ok=True):
            super().__init__([Layer(ok), Layer(ok)])
            self.token_ids, self.long_rope = ids, long

    short, longer = Cache([1, 2, 3]), Cache([1, 2, 3, 4, 5])
    assert serving._covers(longer, short) and not serving._covers(short, longer)
    assert serving._covers(short, Cache([1, 2, 3]))  # equal ids: either covers the other
    assert not serving._covers(Cache([1, 2, 3, 4, 5], long=True), short)  # another LongRoPE set
    assert not serving._covers(Cache([1, 2, 9, 4, 5]), short)
    assert not serving._covers(Cache([1, 2, 3, 4, 5], ok=False), short)  # past its window: no cut back
    assert serving._covers(Cache([1, 2, 3], ok=False), short)  # nothing to cut


def test_a_small_models_steps_are_compiled_by_default(embedded, monkeypatch):
    """By default (compiled=None) a model of at most SMALL_MODEL_BYTES of weights decodes its SlotBatch
    steps as compiled graphs, a larger one does not; an explicit choice wins either way."""
    model, tok = embedded
    assert serving.small_model(model)
    assert Engine(model, tok).compiled is True and Engine(model, tok, compiled=False).compiled is False
    monkeypatch.setattr(serving, "SMALL_MODEL_BYTES", 1024)
    assert Engine(model, tok).compiled is False and Engine(model, tok, compiled=True).compiled is True
    monkeypatch.undo()
    model.__dict__.pop("_slot_steps", None)  # other tests' compiled steps
    got, done = run_engine(Engine(model, tok, max_batch=2), [tok.encode("Add 2 and 3."), tok.encode("Hello")], 5)
    ref, _ = run_engine(Engine(model, tok, max_batch=2, compiled=False),
                        [tok.encode("Add 2 and 3."), tok.encode("Hello")], 5)
    assert got == ref and model.__dict__.get("_slot_steps")  # the compiled steps ran, with the same tokens
