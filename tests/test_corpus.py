"""phi3mlx.finetune.corpus: the standard-library corpus and its quality filter."""

from __future__ import annotations

import random

import pytest

from phi3mlx.finetune import corpus as C

GOOD = ("The parser reads the whole file before it starts, so a mistake near the end is reported before "
        "anything is written. Each option may be given once; a second copy replaces the first. Names are "
        "compared without regard to case, and a missing value falls back to the default of the section.")


@pytest.fixture(scope="module")
def general():
    return C.general_corpus()


def test_general_corpus_is_large_clean_and_deduplicated(general):
    docs, counts = general
    assert sum(map(len, docs)) > 500_000
    assert counts["kept"] == len(docs) and counts["in"] == len(C.stdlib_documents())
    assert all(C.problem(d) is None for d in docs)
    assert all(C.MIN_CHARS <= len(d) <= C.MAX_CHARS for d in docs)
    norm = [C._normalise(d) for d in docs]
    assert len(set(norm)) == len(norm)
    assert counts["short"] > 0 and counts["duplicate"] + counts["near_duplicate"] > 0


def test_sources_are_the_standard_library_in_a_stable_order(general):
    docs = C.stdlib_documents()
    assert docs == C.stdlib_documents()
    assert any("Return True if the string" in d or "Return a copy of the string" in d for d in docs)
    text = "\n".join(docs)
    assert 'The "if" statement is used for conditional execution' in text  # a pydoc topic
    assert C.quality_filter(docs) == general


@pytest.mark.parametrize("reason, bad", [
    ("short", "Return the value."),
    ("non_ascii", GOOD + " " + "\u00e9\u00e8\u00ea\u00eb\u00e0 " * 4),
    ("symbols", GOOD[:120] + "\n>>> f(x)[0] = {'a': [1, 2]}; g(*a, **k) -> (3, 4)\n" * 6),
    ("repeated_lines", "\n".join([GOOD[:60]] + ["this line is said again and again"] * 8)),
    ("repeated_ngrams", "the cat sat on the mat and " * 12 + GOOD[:40]),
])
def test_each_reason_drops_a_bad_document_and_keeps_a_good_one(reason, bad):
    assert C.problem(GOOD) is None
    assert C.problem(bad) == reason
    kept, counts = C.quality_filter([bad, GOOD])
    assert kept == [GOOD] and counts[reason] == 1 and counts["kept"] == 1


def test_duplicates_and_near_duplicates_are_dropped():
    other = GOOD.replace("parser", "reader").replace("second copy", "later copy")  # a few words changed
    different = ("Sockets are the endpoints of a connection. A server binds a socket to an address, listens, "
                 "and accepts connections; a client connects to that address. Data is sent as bytes, and a "
                 "call to recv may return fewer bytes than were sent, so callers loop until they have all.")
    kept, counts = C.quality_filter([GOOD, "  " + GOOD.upper().replace(" ", "\n "), other, different])
    assert kept == [GOOD, different]
    assert counts["duplicate"] == 1 and counts["near_duplicate"] == 1


def test_long_documents_are_split_at_paragraphs():
    rng = random.Random(0)
    paras = [" ".join("".join(rng.choice("abcdefghijklmnoprstuw") for _ in range(rng.randint(2, 8)))
                      for _ in range(60)) for _ in range(40)]
    words = " ".join(f"w{i}" for i in range(3000))
    kept, counts = C.quality_filter(["\n\n".join(paras)])
    assert counts["split"] > 0 and len(kept) == counts["split"] + 1
    assert all(len(d) <= C.MAX_CHARS for d in kept)
    assert all(d.split("\n\n")[0] in paras for d in kept)
    assert all(len(c) <= C.MAX_CHARS for c in C._split_long(words))
