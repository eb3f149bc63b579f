"""``phi3mlx chat``: history through the chat template, commands, context limits, Ctrl-C, piped input.

Expected answers are computed with ``generate`` on the same tiny model and the same template
messages, so every comparison checks the exact prompt the chat rendered.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("mlx.core")

from phi3mlx import generate, load  # noqa: E402
from phi3mlx.chat import Chat, ContextOverflow, run  # noqa: E402
from phi3mlx.cli import main  # noqa: E402

MAX = 8
CTX = 32  # the context of the small-context copy


@pytest.fixture(scope="module")
def loaded(tiny_folder):
    return load(tiny_folder)


@pytest.fixture(scope="module")
def small_ctx_folder(tiny_folder, tmp_path_factory):
    """A copy of the tiny model whose context is only CTX tokens."""
    out = tmp_path_factory.mktemp("ctx") / "tiny-ctx"
    shutil.copytree(tiny_folder, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["max_position_embeddings"] = CTX
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def small(small_ctx_folder):
    return load(small_ctx_folder)


def render(tok, turns, system=None):
    """The chat prompt for ``turns``: user, answer, user, ... ending with the new user message."""
    msgs = [{"role": "system", "content": system}] if system else []
    for role, text in zip(["user", "assistant"] * len(turns), turns):
        msgs.append({"role": role, "content": text})
    return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def n_tokens(loaded, turns):
    return len(loaded[1].encode(render(loaded[1], turns)))


def expected(loaded, turns, system=None, max_tokens=MAX):
    """What ``generate`` answers to the rendered ``turns``."""
    model, tok = loaded
    return generate(model, tok, render(tok, turns, system), max_tokens=max_tokens)


class _Stdin(io.StringIO):
    def __init__(self, text, tty=False):
        super().__init__(text)
        self._tty = tty

    def isatty(self):
        return self._tty


def chat(monkeypatch, capsys, folder, text, *flags, tty=False):
    monkeypatch.setattr(sys, "stdin", _Stdin(text, tty))
    rc = main(["chat", "--model", str(folder), "--max-tokens", str(MAX), *flags])
    out, err = capsys.readouterr()
    return rc, out, err


def test_piped_lines_are_answered_with_history_kept(tiny_folder, loaded):
    a1 = expected(loaded, ["hi"])
    a2 = expected(loaded, ["hi", a1, "there"])
    assert a2 != expected(loaded, ["there"])  # the history changes the answer, so the check means something
    cmd = [sys.executable, "-m", "phi3mlx.cli", "chat", "--model", str(tiny_folder), "--max-tokens", str(MAX)]
    r = subprocess.run(cmd, input="hi\nthere\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{a1}\n{a2}\n"
    assert "\x1b[" not in r.stdout + r.stderr and ">>>" not in r.stdout  # no prompt or colour when piped


def test_reset_gives_a_fresh_answer_and_empty_lines_are_ignored(tiny_folder, loaded, monkeypatch, capsys):
    a1 = expected(loaded, ["hi"])
    assert expected(loaded, ["hi", a1, "hi"]) != a1  # without /reset the second answer would differ
    rc, out, err = chat(monkeypatch, capsys, tiny_folder, "hi\n\n   \n/reset\nhi\n")
    assert rc == 0 and out == f"{a1}\n{a1}\n"
    assert "history cleared" in err


def test_system_message_from_flag_and_command(tiny_folder, loaded, monkeypatch, capsys):
    plain = expected(loaded, ["hi"])
    brief = expected(loaded, ["hi"], system="Be brief.")
    pirate = expected(loaded, ["hi"], system="You are a pirate.")
    assert len({plain, brief, pirate}) == 3  # the system message reaches the rendered prompt
    rc, out, _ = chat(monkeypatch, capsys, tiny_folder, "hi\n/system You are a pirate.\nhi\n/system\nhi\n",
                      "--system", "Be brief.")
    # /system replaces the message and clears the history; "/system" alone removes it
    assert rc == 0 and out == f"{brief}\n{pirate}\n{plain}\n"


def test_unknown_command_help_and_exit(tiny_folder, loaded, monkeypatch, capsys):
    a1 = expected(loaded, ["hi"])
    rc, out, err = chat(monkeypatch, capsys, tiny_folder, "/frobnicate\n/help\nhi\n/exit\nthere\n")
    assert rc == 0 and out == f"{a1}\n"  # nothing after /exit is answered
    assert "unknown command /frobnicate" in err
    for cmd in ("/reset", "/system", "/exit", "/help"):
        assert cmd in err


def test_overflowing_message_is_refused_and_not_kept(small_ctx_folder, small, monkeypatch, capsys):
    assert small[0].config.context_length == CTX
    a1 = expected(small, ["hi"])
    long = " ".join(["hello"] * 100)
    n_long = n_tokens(small, ["hi", a1, long])
    a2 = expected(small, ["hi", a1, "there"])
    assert n_long > CTX
    rc, out, err = chat(monkeypatch, capsys, small_ctx_folder, f"hi\n{long}\nthere\n")
    assert rc == 0
    assert out == f"{a1}\n{a2}\n"  # the long message is not in the history of the next turn
    assert f"{n_long} tokens" in err and f"{CTX} tokens" in err


def test_answer_is_capped_to_the_room_left(small_ctx_folder, small, monkeypatch, capsys):
    n = n_tokens(small, ["hi"])
    capped = expected(small, ["hi"], max_tokens=CTX - n)
    rc, out, err = chat(monkeypatch, capsys, small_ctx_folder, "hi\nthere\n", "--max-tokens", "1000")
    assert rc == 0
    n2 = n_tokens(small, ["hi", capped, "there"])
    assert n2 >= CTX  # so the second line overflows
    assert out == f"{capped}\n"
    assert f"context of {CTX} tokens is full" in err and f"{n2} tokens" in err


def test_ctrl_c_during_an_answer_keeps_the_partial_answer(loaded):
    model, tok = loaded
    c = Chat(model, tok, max_tokens=MAX)
    full = expected(loaded, ["hi"])
    pieces = []

    def write(piece):
        pieces.append(piece)
        if len(pieces) == 2:
            raise KeyboardInterrupt

    reply = c.ask("hi", write)
    assert reply.interrupted and reply.text == "".join(pieces) and full.startswith(reply.text) and reply.text != full
    assert c.history == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply.text}]
    nxt = c.ask("there", lambda piece: None)
    assert not nxt.interrupted and nxt.text == expected(loaded, ["hi", reply.text, "there"])


def test_overflow_raises_without_touching_history(small):
    model, tok = small
    c = Chat(model, tok)
    with pytest.raises(ContextOverflow) as e:
        c.ask(" ".join(["hello"] * 100), lambda piece: None)
    assert e.value.context == CTX and e.value.prompt_tokens > CTX and c.history == []


def test_ctrl_c_at_the_prompt_leaves(loaded):
    class UI:
        def read(self):
            raise KeyboardInterrupt

        def notice(self, msg):
            pass

    run(Chat(*loaded), UI())  # returns instead of raising


def test_terminal_mode_prompts_and_streams(tiny_folder, loaded, monkeypatch, capsys):
    a1 = expected(loaded, ["hi"])
    a2 = expected(loaded, ["hi", a1, "there"])
    rc, out, _ = chat(monkeypatch, capsys, tiny_folder, "hi\n/nope\nthere\n", tty=True)
    assert rc == 0
    assert "phi3mlx chat" in out and ">>> " in out and "unknown command /nope" in out
    assert a1 in out and a2 in out and out.index(a1) < out.index(a2)
