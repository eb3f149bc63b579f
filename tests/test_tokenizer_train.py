"""``phi3mlx tokenizer train``: the folder it writes gives sentencepiece's ids through transformers and
phi3mlx, round-trips any text, renders the chat template; bad input is one line, exit 1, nothing written.

The corpus is built here: the source and docstrings of a few standard-library modules, plus a few
sentences with accents and CJK written for this test."""

from __future__ import annotations

import ast
import json
import os
import random
from pathlib import Path

import pytest

spm = pytest.importorskip("sentencepiece")
pytest.importorskip("mlx.core")

from phi3mlx.cli import main  # noqa: E402
from phi3mlx.errors import Phi3MLXError  # noqa: E402
from phi3mlx.finetune.tokenizer_train import (  # noqa: E402
    MIN_VOCAB_SIZE, SPECIAL_TOKENS, read_texts, train_tokenizer)
from phi3mlx.tokenizer import load_tokenizer  # noqa: E402

from .helpers import assert_error  # noqa: E402

STDLIB = Path(os.__file__).parent
MODULES = ("argparse.py", "textwrap.py", "json/decoder.py", "json/encoder.py", "shlex.py", "string.py",
           "fractions.py", "pathlib.py" if (STDLIB / "pathlib.py").is_file() else "pathlib/__init__.py")
SENTENCES = ("Le café était déjà fermé; naïve façade, où est-il ? Über die Brücke gehen wir später.",
             "日本語の文章を少し書きます。東京は大きい都市です。", "中文句子：今天天气很好。", "Ωμέγα και άλφα.")

STRINGS = [
    "Hello, world! This is plain ASCII prose.",
    "def f(x):\n    return x ** 2  # square\n",
    "class A:\n\tpass\n\n\n",
    "12345", "x = 3.14159 + 2e10", "phone: 555-0100",
    "   leading, trailing   ", "a  b   c    d", " ", "", "\n", "\r\n\r\n", "\t\t\tx",
    "café déjà vu naïve Ærøskøbing", "日本語のテキスト", "中文", "emoji 🎉👍🏽 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "<|user|>\nhi<|end|>\n<|assistant|>\n", "x<|end|>y<|endoftext|><|endoftext|>", "<|system|>", "<|notatoken|>",
    "e\u0301 combining, \u200b zero width, \x00\x01\x7f controls",
]


def _corpus() -> list[str]:
    docs = list(SENTENCES) * 20
    for name in MODULES:
        src = (STDLIB / name).read_text(encoding="utf-8")
        docs.append(src)
        docs += [d for node in ast.walk(ast.parse(src))
                 if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and (d := ast.get_docstring(node))]
    return docs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    ids = train_tokenizer(_corpus(), out, vocab_size=1024)
    return out, ids


def _random_text(rng: random.Random) -> str:
    """Random code points: ASCII, controls, spaces, combining marks, CJK, astral, any valid scalar value."""
    def char():
        kind = rng.randrange(7)
        if kind == 0:
            return chr(rng.randint(0x20, 0x7E))
        if kind == 1:
            return rng.choice("\t\n\r \x0b\x0c\x00\x1b")
        if kind == 2:
            return " " * rng.randint(1, 5)
        if kind == 3:
            return chr(rng.randint(0x300, 0x36F))
        if kind == 4:
            return chr(rng.randint(0x4E00, 0x9FFF))
        if kind == 5:
            return chr(rng.randint(0x10000, 0x10FFFF))
        c = rng.randint(0, 0x10FFFF)
        return chr(c) if not 0xD800 <= c <= 0xDFFF and c != 0x2581 else "?"  # ▁ decodes as a space (documented)
    return "".join(char() for _ in range(rng.randint(0, 40)))


def test_three_tokenizers_give_the_same_ids(trained):
    from transformers import AutoTokenizer

    out, _ = trained
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(str(out))
    ours = load_tokenizer(out)
    rng = random.Random(1)
    strings = STRINGS + [_random_text(rng) for _ in range(100)]
    for s in strings:
        want = sp.encode(s)
        assert hf.encode(s, add_special_tokens=False) == want, s
        assert ours.encode(s, add_special_tokens=False) == want, s
        assert ours.encode(s) == want, s  # no BOS is added
    assert [sp.id_to_piece(i) for i in sp.encode("12345")] == list("12345")
    user, end = ours.convert_tokens_to_ids("<|user|>"), ours.convert_tokens_to_ids("<|end|>")
    assert ours.encode("<|user|>\nhi<|end|>\n")[0] == user and end in ours.encode("<|user|>\nhi<|end|>\n")
    for t in SPECIAL_TOKENS:
        assert len(ours.encode(t)) == 1 and len(sp.encode(t)) == 1
    # learned pieces are used (not only bytes and characters), and rare text falls back to bytes
    pieces = [sp.id_to_piece(i) for i in sp.encode(STRINGS[1])]
    assert "return" in pieces and len(pieces) < 0.6 * len(STRINGS[1]), pieces
    assert all(sp.is_byte(i) for i in sp.encode("🎉"))
    # the one documented difference: transformers makes the bos/eos/unk text its special id
    assert hf.encode("<s>", add_special_tokens=False) == [1] != sp.encode("<s>")


def test_any_text_round_trips(trained):
    out, _ = trained
    tok = load_tokenizer(out)
    rng = random.Random(0)
    strings = STRINGS + [_random_text(rng) for _ in range(400)]
    assert any(ord(c) > 0xFFFF for s in strings for c in s) and any("\r" in s for s in strings)
    for s in strings:
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s, repr(s)


def test_chat_template(trained):
    out, _ = trained
    tok = load_tokenizer(out)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert text == "<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 2 + 2?<|end|>\n<|assistant|>\n"
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|system|>") and ids[-2] == tok.convert_tokens_to_ids("<|assistant|>")


def test_returned_ids_and_files(trained):
    out, ids = trained
    tok = load_tokenizer(out)
    assert ids == {"vocab_size": 1024, "bos_token_id": 1, "eos_token_id": 3, "end_token_id": 7, "pad_token_id": 3}
    assert tok.vocab_size == 1024 and tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>") == 3
    assert tok.bos_token_id == 1 and tok.hf.pad_token_id == 3 and tok.convert_tokens_to_ids("<|end|>") == 7
    assert tok.stop_ids == {3, 7}
    assert sorted(p.name for p in out.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                     "tokenizer.model", "tokenizer_config.json"]
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|endoftext|>" and cfg["added_tokens_decoder"]["7"]["content"] == "<|end|>"


def test_many_rare_characters_fall_back_to_bytes(tmp_path):
    """More distinct characters than fit: the frequent ones get pieces, the rest bytes; text round-trips."""
    rng = random.Random(2)
    docs = ["".join(chr(0x4E00 + int(rng.paretovariate(0.7)) % 3000) for _ in range(300)) for _ in range(60)]
    ids = train_tokenizer(docs, tmp_path / "t", vocab_size=MIN_VOCAB_SIZE)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "t" / "tokenizer.model"))
    assert ids["vocab_size"] == sp.get_piece_size() == MIN_VOCAB_SIZE
    assert len(set("".join(docs))) > MIN_VOCAB_SIZE
    tok = load_tokenizer(tmp_path / "t")
    for d in docs[:5]:
        assert tok.encode(d) == sp.encode(d)
        assert tok.decode(tok.encode(d)) == d


def test_read_texts(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("second\n\nparagraph")
    (tmp_path / "d" / "a.md").write_text("# first")
    (tmp_path / "d" / "sub" / "c.jsonl").write_text(
        '{"text": "row text"}\n\n{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", '
        '"content": "a"}]}\n{"prompt": "p", "completion": "c"}\n')
    (tmp_path / "d" / "skip.bin").write_bytes(b"\xff")
    (tmp_path / "d" / ".hidden.txt").write_text("hidden")
    (tmp_path / "one.data").write_text("any file")
    docs = list(read_texts([tmp_path / "d", str(tmp_path / "one.data")]))
    assert docs == ["# first", "second\n\nparagraph", "row text", "q", "a", "p", "c", "any file"]


def test_read_texts_names_every_problem(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n{"other": 1}\n')
    (tmp_path / "empty").mkdir()
    with pytest.raises(Phi3MLXError) as e:
        read_texts([tmp_path / "missing.txt", tmp_path / "bad.txt", tmp_path / "bad.jsonl", tmp_path / "empty"])
    msg = str(e.value)
    assert "\n" not in msg
    for needle in ("missing.txt: no such file", "bad.txt: not valid UTF-8 (byte 4)", "bad.jsonl:2: not valid JSON",
                   "bad.jsonl:3: expected", "empty: no .txt"):
        assert needle in msg, msg


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    return code, *capsys.readouterr()


def test_cli_trains_and_replaces_only_with_force(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("\n".join(_corpus()[:40]))
    out = tmp_path / "tok"
    code, stdout, err = _cli(capsys, "tokenizer", "train", "--input", data, "--out", out, "--vocab-size", 512)
    assert code == 0, err
    assert "wrote" in err and "512 tokens" in err and stdout == ""
    assert load_tokenizer(out).vocab_size == 512
    code, _, err = _cli(capsys, "tokenizer", "train", "--input", data, "--out", out, "--vocab-size", 400, "--force")
    assert code == 0, err
    assert load_tokenizer(out).vocab_size == 400


@pytest.mark.parametrize("args, needles", [
    (["tokenizer"], ["tokenizer: the following arguments are required: COMMAND", "(see phi3mlx tokenizer --help)"]),
    (["tokenizer", "train", "--bogus"], ["tokenizer train: the following arguments are required: --input, --out; "
                                         "unrecognized arguments: --bogus", "(see phi3mlx tokenizer train --help)"]),
    (["tokenizer", "train", "--input", "x", "--out", "y", "--bogus"], ["tokenizer train: unrecognized arguments"]),
    (["tokenizer", "train", "--input", "x", "--out", "y", "--vocab-size", "many"], ["--vocab-size: invalid int"]),
])
def test_cli_usage_errors_name_the_nested_command(capsys, args, needles):
    assert_error(*_cli(capsys, *args)[::2], *needles)


def test_cli_help_explains_inputs_outputs_and_specials(capsys):
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    for needle in ("--input PATH [PATH ...]", ".jsonl", "folder", "tokenizer.model", "tokenizer.json", "--force",
                   " ".join(SPECIAL_TOKENS), "Chat template", "(default: 2048)"):
        assert needle in text, needle


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\t\n")
    small = tmp_path / "small.txt"
    small.write_text("hello world")
    out = tmp_path / "out"
    cases = [
        (["--input", blank], "the corpus is empty"),
        (["--input", tmp_path / "nope.txt", small], "nope.txt: no such file or folder"),
        (["--input", small, "--vocab-size", 100], f"at least {MIN_VOCAB_SIZE}"),
        (["--input", small, "--vocab-size", 2048], "at most 290 tokens, not 2048"),
    ]
    for args, needle in cases:
        assert_error(*_cli(capsys, "tokenizer", "train", "--out", out, *args)[::2], needle)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.txt", "small.txt"]
    out.mkdir()
    assert_error(*_cli(capsys, "tokenizer", "train", "--input", small, "--out", out)[::2], "already exists",
                 "--force")
    assert list(out.iterdir()) == []
