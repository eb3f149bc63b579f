"""Tokenizer: ids as transformers, chat template, stop ids, streaming detokenizer."""

from __future__ import annotations

import json
import shutil

import pytest

from phi3mlx.tokenizer import PHI3_CHAT_TEMPLATE, load_tokenizer

from .helpers import PHI3_TOKENIZER_JSON_SHA256, assert_streams_to_decode, write_tokenizer

TEXTS = [
    "Hello world! How are you today?",
    "  leading spaces and\ttabs\nand newlines\n\n",
    "Größe, naïve café — déjà vu; 東京は日本の首都です。 Привет, мир! مرحبا بالعالم",
    "Emoji: 🤖🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵, math ∑∫√ and code `x += 1`",
    "<|user|>\nHi<|end|>\n<|assistant|>\n",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d)
    (d / "config.json").write_text(json.dumps({"model_type": "phi3", "eos_token_id": 32000}))
    return d


@pytest.fixture(scope="module")
def tok(folder):
    return load_tokenizer(folder, json.loads((folder / "config.json").read_text()))


def test_bundled_tokenizer_is_phi3s():
    """The tests' Phi-3 tokenizer is the package's bundled copy: microsoft/Phi-3-mini-4k-instruct's tokenizer.json."""
    import gzip
    import hashlib

    from phi3mlx.tiny import ASSETS

    with gzip.open(ASSETS / "phi3-tokenizer.json.gz", "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == PHI3_TOKENIZER_JSON_SHA256


def test_ids_equal_autotokenizer(folder, tok):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(folder))
    for t in TEXTS:
        assert tok.encode(t) == ref.encode(t)
        assert tok.decode(tok.encode(t)) == ref.decode(ref.encode(t))


def test_chat_template_and_stop_ids(folder, tok):
    from transformers import AutoTokenizer

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    text = tok.apply_chat_template(msgs)
    assert text == ("<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n"
                    "<|user|>\nBye<|end|>\n<|assistant|>\n")
    ref = AutoTokenizer.from_pretrained(str(folder))
    assert text == ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = tok.apply_chat_template(msgs, tokenize=True)
    assert ids == tok.encode(text)
    assert {32000, 32007} <= tok.stop_ids


def test_fallback_template_and_generation_config_eos(tmp_path):
    write_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [32000, 32001, 32007]}))
    tok = load_tokenizer(tmp_path, {"eos_token_id": 32000})
    assert tok.hf.chat_template == PHI3_CHAT_TEMPLATE
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|user|>\nx<|end|>\n<|assistant|>\n"
    assert {32000, 32001, 32007} <= tok.stop_ids


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_detokenizer_concatenates_to_decode(tok, text):
    assert_streams_to_decode(tok, text)


def test_streaming_detokenizer_on_byte_fallback_pieces(tok):
    # An emoji split into byte tokens: nothing is emitted until the character is complete.
    ids = tok.encode("🤖")
    byte_ids = [i for i in ids if tok.hf.convert_ids_to_tokens(i).startswith("<0x")]
    assert len(byte_ids) >= 2, "the Phi-3 tokenizer spells this emoji with byte tokens"
    detok = tok.detokenizer()
    out = [detok.add(i) for i in ids]
    first, last = ids.index(byte_ids[0]), ids.index(byte_ids[-1])
    assert all(p == "" for p in out[first:last])  # held back while the bytes are incomplete
    assert "🤖" in out[last]
    assert "".join(out) + detok.finalize() == tok.decode(ids)


@pytest.mark.parametrize("text", TEXTS[:4])
def test_token_bytes_join_to_the_text(tok, text):
    """Each token's bytes keep its leading space (a sentencepiece decode of one token drops it) and a
    byte-fallback token is its one byte, so the bytes of a text's tokens join to the text's bytes (after
    the dummy-prefix space the Phi-3 tokenizer puts in front)."""
    ids = tok.encode(text, add_special_tokens=False)
    joined = b"".join(tok.token_bytes(i) for i in ids)
    assert tok.decode(ids) == text
    # decode drops the one space of the dummy prefix "▁" that encoding put on the first piece
    prefix = " " if tok.hf.convert_ids_to_tokens(ids[0]).startswith("\u2581") else ""
    assert joined == (prefix + text).encode("utf-8"), joined
    robot = [tok.token_bytes(i) for i in tok.encode("🤖", add_special_tokens=False)]
    assert b"".join(robot).strip() == "🤖".encode("utf-8") and max(len(b) for b in robot) == 1
    assert tok.token_bytes(tok.convert_tokens_to_ids("<|end|>")) == b"<|end|>"


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    from phi3mlx.errors import Phi3MLXError

    with pytest.raises(Phi3MLXError, match="no tokenizer"):
        load_tokenizer(tmp_path)


def test_folder_copy_keeps_tokenizer(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "c")
    assert load_tokenizer(tmp_path / "c").encode("hi") == load_tokenizer(folder).encode("hi")
