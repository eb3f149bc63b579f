"""phi3mlx.finetune.synthetic: determinism, correct arithmetic, nothing held out leaks, consistent facts."""

from __future__ import annotations

import collections
import json
import re

import pytest

from phi3mlx.finetune import synthetic as S

N = 20_000
FACTS = {(s, r): v for s, r, v in S.world_facts()}
HELD = set(S.HELDOUT_ADDITION) | {(b, a) for a, b in S.HELDOUT_ADDITION}


@pytest.fixture(scope="module")
def docs():
    return S.textbook_documents(N, seed=0)


@pytest.fixture(scope="module")
def dialogues():
    return S.chat_dialogues(N, seed=0)


def _text(dialogue) -> str:
    return "\n".join(m["content"] for m in dialogue)


def _pairs(text: str):
    """Every two numbers joined by an operator word, and the (A, B) a subtraction S - A = B states."""
    for a, b in re.findall(r"(\d+)\s*(?:\+|-|plus|minus|and|or|,)\s*(?:add\s+)?(?=(\d+))", text, re.I):
        yield int(a), int(b)
    for _, a, b in re.findall(r"(\d+) - (\d+) = (\d+)", text):
        yield int(a), int(b)


def test_deterministic_per_seed_and_different_across_seeds(docs, dialogues):
    assert S.textbook_documents(50, seed=0) == docs[:50]
    assert S.chat_dialogues(50, seed=0) == dialogues[:50]
    assert S.textbook_documents(50, seed=1) != docs[:50]
    assert S.chat_dialogues(50, seed=1) != dialogues[:50]


def test_every_sum_and_difference_written_is_right(docs):
    sums = diffs = 0
    for d in docs:
        for terms, total in re.findall(r"((?:\d+ \+ )+\d+) = (\d+)", d):
            assert sum(map(int, terms.split(" + "))) == int(total), terms
            sums += 1
        for terms, total in re.findall(r"((?:\d+ - )+\d+) = (\d+)", d):
            first, *rest = map(int, terms.split(" - "))
            assert first - sum(rest) == int(total), terms
            diffs += 1
        for a, b, c in re.findall(r"(\d+) x (\d+) = (\d+)", d):
            assert int(a) * int(b) == int(c)
    assert sums > 10_000 and diffs > 1_000


def test_worked_addition_writes_each_carry():
    assert S.worked_addition(47, 38) == ("To add 47 and 38, first add the ones: 7 + 8 = 15. Write 5 and carry 1. "
                                         "Then add the tens: 4 + 3 + 1 = 8. Write 8. So 47 + 38 = 85.")
    assert "carried 1 becomes the hundreds digit. So 97 + 85 = 182." in S.worked_addition(97, 85)
    assert S.worked_addition(3, 4).endswith("So 3 + 4 = 7.")


def test_textbook_kinds_are_balanced(docs):
    heads = collections.Counter()
    for d in docs:
        if " + " in d.split("\n")[-1] and ("add" in d.split("\n")[0].lower()):
            heads["addition"] += 1
    assert abs(heads["addition"] - N / len(S.TEXTBOOK_KINDS)) <= 1


def test_no_heldout_pair_is_ever_generated(docs, dialogues):
    assert len(S.HELDOUT_ADDITION) == 200 == len(set(S.HELDOUT_ADDITION))
    assert all(10 <= a <= 99 and 10 <= b <= 99 for a, b in S.HELDOUT_ADDITION)
    texts = docs + [_text(d) for d in dialogues]
    found = [(a, b) for t in texts for a, b in _pairs(t) if (a, b) in HELD]
    assert not found, found[:5]
    assert not any(S.leaks(t) for t in texts[:2000])
    a, b = S.HELDOUT_ADDITION[0]
    assert S.leaks(f"Add {b} and {a}.") and S.leaks(f"{a + b} - {a} = {b}") and not S.leaks("Add 1 and 2.")


def test_additions_come_in_three_equal_forms_and_are_answered_with_the_sum(dialogues):
    forms = collections.Counter()
    patterns = [re.compile(r"What is (\d+) \+ (\d+)\?"), re.compile(r"(\d+) \+ (\d+) = \?"),
                re.compile(r"Add (\d+) and (\d+)\.")]
    for d in dialogues:
        for q, r in zip(d, d[1:]):
            if q["role"] != "user":
                continue
            for i, pat in enumerate(patterns):
                m = pat.fullmatch(q["content"])
                if m:
                    a, b = map(int, m.groups())
                    assert 10 <= a <= 99 and 10 <= b <= 99
                    assert S.first_number(r["content"]) == a + b and r["content"] == f"The answer is {a + b}."
                    forms[i] += 1
    assert max(forms.values()) - min(forms.values()) <= 1
    share = sum(forms.values()) / sum(sum(m["role"] == "user" for m in d) for d in dialogues)
    assert abs(share - S.CHAT_SHARES["addition"]) < 0.02


def test_world_answers_agree_with_the_facts(dialogues):
    people = {p.name for p in S.WORLD.people}
    checks = [(r"Where does (.+) live\?", "lives in"), (r"How old is (.+)\?", "age"),
              (r"What is (.+)'s favourite colour\?", "favourite colour"), (r"What is (.+)'s job\?", "job"),
              (r"What is the name of (.+)'s pet\?", "pet")]
    checked = 0
    for d in dialogues:
        for q, r in zip(d, d[1:]):
            for pat, rel in checks:
                m = re.fullmatch(pat, q["content"])
                if m and q["role"] == "user":
                    if m.group(1) in people:
                        assert FACTS[(m.group(1), rel)] in r["content"], (q, r)
                        checked += 1
                    else:
                        assert S.says_unknown(r["content"]) and r["content"].startswith("I do not know"), (q, r)
    assert checked > 300
    for qa in S.world_qas():
        assert qa.expected in qa.answer
    assert len(S.WORLD.people) >= 12 and len(S.WORLD.places) >= 6


def test_story_facts_are_consistent(docs):
    stories = 0
    for d in docs:
        m = re.match(r"\w[\w ]* in ([A-Z][\w ]+), ([A-Z]\w+ [A-Z]\w+) the ([\w ]+?) finished", d)
        if m:
            town, name, job = m.groups()
            assert FACTS[(name, "lives in")] == town and FACTS[(name, "job")] == job
            poss = "her" if S.WORLD.person(name).pronoun == "she" else "his"
            assert f"{FACTS[(name, 'pet')]}, {poss} {FACTS[(name, 'pet species')]}," in d
            stories += 1
    assert stories > N / len(S.TEXTBOOK_KINDS) - 2


def test_eval_names_never_appear_in_training_text(docs, dialogues):
    text = "\n".join(docs + [_text(d) for d in dialogues]).lower()
    for name in S.UNKNOWN_EVAL_NAMES + S.UNKNOWN_EVAL_PLACES:
        assert name.lower() not in text
    for q in S.eval_sets()["unknown"]:
        assert q.lower() not in text
    world_text = " ".join(v for f in S.world_facts() for v in f).lower()
    assert not any(n.lower() in world_text for n in S.UNKNOWN_EVAL_NAMES + S._UNKNOWN_NAMES)


def test_eval_sets_shape():
    sets = S.eval_sets()
    add = sets["addition"]
    assert len(add) == 200 and [(a, b) for _, a, b, _ in add] == S.HELDOUT_ADDITION
    assert all(s == a + b and str(a) in q and str(b) in q for q, a, b, s in add)
    counts = collections.Counter(next(i for i, f in enumerate(("What is", "= ?", "Add")) if f in q)
                                 for q, *_ in add)
    assert sorted(counts.values()) == [66, 67, 67]
    assert len(sets["world"]) >= 30 and len(sets["unknown"]) >= 30
    values = {v for _, _, v in S.world_facts()}
    assert all(e in values for _, e in sets["world"])



def test_selection_sets_never_use_the_held_out_questions():
    sel, ev = S.selection_sets(), S.eval_sets()
    assert [len(sel[k]) for k in ("addition", "world")] == [200, len(ev["world"])]
    pairs = [(a, b) for _, a, b, _ in sel["addition"]]
    assert len(set(pairs)) == 200 and all(s == a + b for _, a, b, s in sel["addition"])
    assert not set(pairs) & set(S.HELDOUT_ADDITION)
    assert not set(pairs) & {(b, a) for a, b in S.HELDOUT_ADDITION}
    assert all(not S.leaks(q) for q, *_ in sel["addition"]) and all(not S.leaks(q) for q in sel["unknown"])
    # another phrasing of each world fact where it has one; the same expected answers
    assert [e for _, e in sel["world"]] == [e for _, e in ev["world"]]
    assert all(q != qe for (q, _), (qe, _) in zip(sel["world"], ev["world"]))
    assert not set(sel["unknown"]) & set(ev["unknown"])
    assert S.selection_sets() == sel  # fixed, like the held-out sets


@pytest.mark.parametrize("reply, n", [("The answer is 85.", 85), ("85", 85), ("It is -3 now", -3),
                                      ("no numbers", None), ("", None), ("47 + 38 = 85", 47)])
def test_first_number(reply, n):
    assert S.first_number(reply) == n


def test_scoring_helpers():
    assert S.addition_correct("The answer is 85.", 85) and not S.addition_correct("47 + 38 = 85", 85)
    assert S.world_correct("Maren Tull lives in PELLWICK.", "Pellwick")
    assert not S.world_correct("I do not know. Pellwick?", "Pellwick") and not S.world_correct("Dunmarra", "Pellwick")
    assert S.says_unknown("I do not know. Who is that?") and S.says_unknown("Sorry, I don\u2019t know.")
    assert not S.says_unknown("I know Maren Tull.")


def test_write_jsonl_is_atomic(tmp_path):
    out = tmp_path / "rows.jsonl"
    assert S.write_jsonl([{"a": 1}, {"b": "\u00e9"}], out) == 2
    assert [json.loads(x) for x in out.read_text("utf-8").splitlines()] == [{"a": 1}, {"b": "\u00e9"}]

    def rows():
        yield {"c": 3}
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        S.write_jsonl(rows(), out)
    assert [json.loads(x) for x in out.read_text("utf-8").splitlines()] == [{"a": 1}, {"b": "\u00e9"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_dialogue_shares_weight_the_kinds_and_bad_shares_are_refused():
    from phi3mlx.errors import Phi3MLXError
    from phi3mlx.finetune.synthetic import chat_dialogues

    rows = chat_dialogues(3000, seed=4, shares={"addition": 3, "world": 1})
    replies = [m["content"] for d in rows for m in d if m["role"] == "assistant"]
    add = sum(r.startswith("The answer is") for r in replies) / len(replies)
    assert 0.7 < add < 0.8
    assert not any(r.startswith("I do not know") for r in replies)  # unknown has no share
    assert chat_dialogues(20, seed=1) == chat_dialogues(20, seed=1, shares=None)
    with pytest.raises(Phi3MLXError, match="unknown dialogue kinds maths"):
        chat_dialogues(5, shares={"maths": 1})
    with pytest.raises(Phi3MLXError, match="sum to a positive number"):
        chat_dialogues(5, shares={"addition": 0})
