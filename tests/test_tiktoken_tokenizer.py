"""Phi-3-small tokenizer (tiktoken cl100k_base + special tokens) behind the common interface.

Uses the real cl100k_base.tiktoken (tests/data, via the ``cl100k_bpe`` fixture). Nothing here may
download: tiktoken.get_encoding is never called.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from phi3mlx.errors import Phi3MLXError

from .helpers import CL100K_SHA256, assert_streams_to_decode, phi3_small_tokenizer_config

tiktoken = pytest.importorskip("tiktoken", reason="tiktoken is needed for the Phi-3-small tokenizer")

from phi3mlx.tokenizer import (  # noqa: E402
    PHI3_SMALL_CHAT_TEMPLATE,
    PHI3_SMALL_SPECIAL_TOKENS,
    BaseTokenizer,
    StreamingDetokenizer,
    TiktokenTokenizer,
    load_tokenizer,
    read_tiktoken_bpe,
)

ENGLISH = "Hello world! How are you today?\n  leading spaces and\ttabs\n\n"
MULTILINGUAL = "Größe, naïve café — déjà vu; 東京は日本の首都です。 Привет, мир! مرحبا بالعالم हिन्दी 한국어"
EMOJI = "Emoji: 🤖🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵, math ∑∫√ and code `x += 1`"
TEXTS = [ENGLISH, MULTILINGUAL, EMOJI, "<|user|>\nHi<|end|>\n<|assistant|>\n"]

TOKENIZER_CONFIG = phi3_small_tokenizer_config()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, cl100k_bpe):
    d = tmp_path_factory.mktemp("phi3small")
    shutil.copy(cl100k_bpe, d / "cl100k_base.tiktoken")
    (d / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    (d / "config.json").write_text(json.dumps({"model_type": "phi3small", "eos_token_id": 100257, "vocab_size": 100352}))
    return d


@pytest.fixture(scope="module")
def tok(folder):
    return load_tokenizer(folder, json.loads((folder / "config.json").read_text()))


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("tiktoken.get_encoding would download; it must never be called")

    monkeypatch.setattr(tiktoken, "get_encoding", refuse)


def test_reference_file_is_cl100k_base(cl100k_bpe):
    assert hashlib.sha256(cl100k_bpe.read_bytes()).hexdigest() == CL100K_SHA256


def test_selected_and_same_interface(tok):
    assert isinstance(tok, TiktokenTokenizer) and isinstance(tok, BaseTokenizer)
    for name in ("encode", "decode", "apply_chat_template", "convert_tokens_to_ids", "detokenizer", "save"):
        assert callable(getattr(tok, name))
    assert isinstance(tok.detokenizer(), StreamingDetokenizer)
    assert tok.vocab_size == 100352  # = the config's padded vocab_size
    assert tok.bos_token_id == tok.eos_token_id == 100257


def test_known_cl100k_ids(tok):
    assert tok.encode("hello world") == [15339, 1917]
    assert tok.encode("Hello, world!") == [9906, 11, 1917, 0]
    assert tok.encode("hello world", add_special_tokens=True) == tok.encode("hello world", add_special_tokens=False)


def test_parser_matches_tiktoken_loader(monkeypatch, cl100k_bpe):
    from tiktoken.load import load_tiktoken_bpe

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no cache copy in $TMPDIR
    assert read_tiktoken_bpe(cl100k_bpe) == load_tiktoken_bpe(str(cl100k_bpe))


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_join_to_the_text(tok, text):
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert tok.token_bytes(100257) == b"<|endoftext|>"  # a special token: its text
    with pytest.raises(ValueError, match="out of range"):
        tok.token_bytes(10**7)


def test_special_tokens(tok):
    expect = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
              "<|fim_suffix|>": 100260, "<|system|>": 100261, "<|user|>": 100262, "<|assistant|>": 100263,
              "<|end|>": 100266, "<|endofprompt|>": 100276}
    for name, i in expect.items():
        assert tok.convert_tokens_to_ids(name) == i
        assert tok.encode(name) == [i]  # recognised when written in the text
        assert tok.decode([i]) == name
    # Microsoft's dummy numbering; every id 100256..100351 has exactly one name
    assert tok.convert_tokens_to_ids(["<|dummy_id_0|>", "<|dummy_id_1|>", "<|dummy_id_2|>", "<|dummy_id_3|>",
                                      "<|dummy_id_11|>", "<|dummy_id_12|>", "<|dummy_id_86|>"]) == [
        100264, 100265, 100256, 100267, 100275, 100277, 100351]
    assert sorted(PHI3_SMALL_SPECIAL_TOKENS.values()) == list(range(100256, 100352))
    assert tok.convert_tokens_to_ids("hello") == 15339 and tok.convert_tokens_to_ids(b" world") == 1917
    assert tok.convert_tokens_to_ids("no such token!") is None
    assert tok.decode([15339, 100266, 1917], skip_special_tokens=True) == "hello world"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([100352])


def test_chat_template_ids(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    text = tok.apply_chat_template(msgs)
    assert text == ("<|endoftext|><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n"
                    "<|user|>\nBye<|end|>\n<|assistant|>\n")
    ids = tok.apply_chat_template(msgs, tokenize=True)
    assert ids == tok.encode(text)
    nl = tok.encode("\n")
    assert nl == [198]
    expected = ([100257, 100261, 198] + tok.encode("Be brief.") + [100266, 198, 100262, 198] + tok.encode("Hi")
                + [100266, 198, 100263, 198] + tok.encode("Hello.") + [100266, 198, 100262, 198] + tok.encode("Bye")
                + [100266, 198, 100263, 198])
    assert ids == expected
    assert tok.apply_chat_template(msgs[:2], add_generation_prompt=False).endswith("<|end|>\n<|endoftext|>")


def test_stop_ids(tok, folder, tmp_path):
    assert {100257, 100266} <= tok.stop_ids
    for f in folder.iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [100257, 100266, 100276]}))
    t = load_tokenizer(tmp_path, {"model_type": "phi3small", "eos_token_id": 100257})
    assert {100257, 100266, 100276} <= t.stop_ids


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_detokenizer_concatenates_to_decode(tok, text):
    assert_streams_to_decode(tok, text)


def test_streaming_detokenizer_waits_for_split_characters(tok):
    # cl100k spells this emoji with byte pieces that are not UTF-8 on their own.
    ids = tok.encode("🤖")
    assert len(ids) >= 2
    assert all(_not_utf8(tok.encoding.decode_single_token_bytes(i)) for i in ids)
    detok = tok.detokenizer()
    out = [detok.add(i) for i in ids]
    assert all(p == "" for p in out[:-1])  # held back while the bytes are incomplete
    assert out[-1] == "🤖"
    assert detok.finalize() == ""


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_defaults_without_tokenizer_config(tmp_path, cl100k_bpe):
    shutil.copy(cl100k_bpe, tmp_path / "cl100k_base.tiktoken")
    # no config, no tokenizer.json: the .tiktoken file alone selects this back end
    t = load_tokenizer(tmp_path)
    assert isinstance(t, TiktokenTokenizer)
    assert t.chat_template == PHI3_SMALL_CHAT_TEMPLATE
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "<|endoftext|><|user|>\nx<|end|>\n<|assistant|>\n"
    assert {100257, 100266} <= t.stop_ids


def test_missing_tiktoken_file_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    with pytest.raises(Phi3MLXError, match=r"no cl100k_base\.tiktoken in .*phi3small folders need their tiktoken file"):
        load_tokenizer(tmp_path, {"model_type": "phi3small"})


def test_bad_tiktoken_file_is_a_clear_error(tmp_path):
    (tmp_path / "cl100k_base.tiktoken").write_text("not base64!! x\n")
    with pytest.raises(Phi3MLXError, match="not a tiktoken BPE file"):
        load_tokenizer(tmp_path, {"model_type": "phi3small"})


def test_save_and_copy_tokenizer_files(tok, folder, tmp_path, cl100k_bpe):
    from phi3mlx.tokenizer import copy_tokenizer_files

    src = tmp_path / "src"
    shutil.copytree(folder, src)
    (src / "tokenization_phi3_small.py").write_text("raise RuntimeError('remote code must not run')\n")
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [100257, 100266]}))
    dst = tmp_path / "dst"
    dst.mkdir()
    copied = copy_tokenizer_files(src, dst)
    assert "cl100k_base.tiktoken" in copied and "tokenizer_config.json" in copied
    assert "tokenization_phi3_small.py" not in copied
    assert (dst / "cl100k_base.tiktoken").read_bytes() == cl100k_bpe.read_bytes()
    t = load_tokenizer(dst, {"model_type": "phi3small"})
    assert t.encode(MULTILINGUAL) == tok.encode(MULTILINGUAL)

    saved = tmp_path / "saved"
    tok.save(saved)
    t2 = load_tokenizer(saved, {"model_type": "phi3small"})
    assert t2.encode(EMOJI) == tok.encode(EMOJI)
    assert t2.chat_template == tok.chat_template


def test_bad_chat_template_is_a_clear_error(tmp_path, cl100k_bpe):
    shutil.copy(cl100k_bpe, tmp_path / "cl100k_base.tiktoken")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**TOKENIZER_CONFIG, "chat_template": "{% for %}"}))
    with pytest.raises(Phi3MLXError, match="chat template does not compile"):
        load_tokenizer(tmp_path, {"model_type": "phi3small"})
