"""phi3mlx.finetune.evals on a tiny random model, and ``phi3mlx corpus`` on the command line."""

from __future__ import annotations

import json

from phi3mlx.cli import main
from phi3mlx.finetune import corpus as C
from phi3mlx.finetune import synthetic as S
from phi3mlx.finetune.evals import SETS, evaluate_chat
from phi3mlx.loader import load

from .helpers import assert_error


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_evaluate_chat_on_a_random_model(tiny_folder):
    model, tok = load(tiny_folder)  # make_tiny's random model
    seen = []
    res = evaluate_chat(model, tok, S.eval_sets(), limit=3, progress=lambda *a: seen.append(a))
    for name in SETS:
        assert 0.0 <= res[name] <= 1.0 and res["n"][name] == 3
        assert len(res["failures"][name]) == round(3 * (1 - res[name]))
    assert res["addition"] == 0.0  # random weights: noise, never the sum
    assert seen[0] == ("addition", 1, 3) and seen[-1] == ("unknown", 3, 3) and len(seen) == 9
    only = evaluate_chat(model, tok, {"unknown": ["Who is Halvard Esk?"]})
    assert set(only) == {"unknown", "n", "failures"} and only["n"] == {"unknown": 1}


def test_corpus_textbook(tmp_path, capsys):
    out = tmp_path / "tb.jsonl"
    code, so, err = cli(capsys, "corpus", "textbook", "--out", out, "--docs", 30, "--seed", 3)
    assert code == 0, err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == S.textbook_documents(30, seed=3)
    assert so.strip() == f"wrote {out}: 30 documents, {sum(len(r['text']) for r in rows)} characters"
    assert_error(*cli(capsys, "corpus", "textbook", "--out", out, "--docs", 5)[::2], "already exists", "--force")
    assert_error(*cli(capsys, "corpus", "textbook", "--out", tmp_path / "x.jsonl", "--docs", 0)[::2],
                 "--docs must be at least 1")
    assert not (tmp_path / "x.jsonl").exists()
    assert cli(capsys, "corpus", "textbook", "--out", out, "--docs", 2, "--force")[0] == 0
    assert len(out.read_text().splitlines()) == 2


def test_corpus_dialogues(tmp_path, capsys):
    out = tmp_path / "chats"
    code, so, err = cli(capsys, "corpus", "dialogues", "--out", out, "--examples", 40, "--valid", 5)
    assert code == 0, err
    train = [json.loads(x)["messages"] for x in (out / "train.jsonl").read_text().splitlines()]
    valid = [json.loads(x)["messages"] for x in (out / "valid.jsonl").read_text().splitlines()]
    assert train + valid == S.chat_dialogues(45, seed=0) and len(valid) == 5
    assert so.startswith(f"wrote {out}: 40 training and 5 validation dialogues")
    assert_error(*cli(capsys, "corpus", "dialogues", "--out", out, "--examples", 4)[::2], "already exists")
    bad = tmp_path / "bad"
    assert_error(*cli(capsys, "corpus", "dialogues", "--out", bad, "--examples", 0, "--valid", -1)[::2],
                 "--examples must be at least 1", "--valid must be 0 or more")
    assert not bad.exists()


def test_corpus_general(tmp_path, capsys, monkeypatch):
    good = ("A module docstring long enough to keep: it explains what the functions do, which arguments they "
            "take and what they return, in plain sentences that a reader can follow without the source code. "
            "It also names the errors they raise.")
    docs = ["A" * 10, good, good]  # keeps the command fast: three documents stand for the library
    monkeypatch.setattr(C, "stdlib_documents", lambda: docs)
    out = tmp_path / "sub" / "general.jsonl"
    code, so, err = cli(capsys, "corpus", "general", "--out", out)
    assert code == 0, err
    rows = [json.loads(x)["text"] for x in out.read_text().splitlines()]
    assert rows == [good]
    assert f"1 documents, {len(good)} characters (from 3 docstrings" in so and "short 1" in so and "duplicate 1" in so
    assert_error(*cli(capsys, "corpus", "general", "--out", tmp_path)[::2], "is a folder")
    assert_error(*cli(capsys, "corpus", "general")[::2], "corpus general: ", "--out")
    assert_error(*cli(capsys, "corpus", "general", "--out", out, "--bogus")[::2],
                 "corpus general: unrecognized arguments: --bogus", "(see phi3mlx corpus general --help)")
