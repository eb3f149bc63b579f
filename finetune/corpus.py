"""Phase-1 general text, gathered at run time from the Python standard library (nothing downloaded).

Sources (``stdlib_documents``): the module, class and function docstrings of the installed standard
library, read by parsing its ``.py`` files with ``ast`` (nothing is imported, so nothing runs), and
the help topics of ``pydoc_data.topics``. Tests, IDLE, demos, ``lib2to3``, ``site-packages``, the codec
tables of ``encodings`` and the like are skipped (``SKIP_DIRS``). Each text is cleaned with
``inspect.cleandoc``. Documents come in a stable order: by source path, then by position in the file.

The filter (``quality_filter``), in this order, each drop counted under its reason:

1. Splitting: a document longer than ``MAX_CHARS`` is cut at blank lines into chunks of at most
   ``MAX_CHARS`` (a single longer paragraph is truncated at a word boundary). Not a drop.
2. ``short``: fewer than ``MIN_CHARS`` characters (after splitting).
3. ``non_ascii``: more than ``MAX_NON_ASCII`` of the characters are not ASCII.
4. ``symbols``: less than ``MIN_ALPHA_SPACE`` of the characters are letters or spaces (code, tables,
   doctests, signatures).
5. ``repeated_lines``: more than ``MAX_DUP_LINES`` of the non-blank lines repeat an earlier line.
6. ``repeated_ngrams``: more than ``MAX_DUP_TRIGRAMS`` of the word 3-grams repeat an earlier one.
7. ``duplicate``: equal to a kept document after lower-casing and collapsing whitespace.
8. ``near_duplicate``: word 5-gram shingles (lower-cased, CRC32-hashed) with a Jaccard similarity of at
   least ``NEAR_DUP_JACCARD`` to a kept document. Candidates are found by MinHash with locality-sensitive
   hashing (``MINHASH_BANDS`` bands of ``MINHASH_ROWS`` rows, fixed hash parameters); each candidate's
   similarity is then computed exactly. The first document (in order) is kept.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import os
import re
import sysconfig
import zlib
from pathlib import Path

import numpy as np

MIN_CHARS = 200
MAX_CHARS = 4000
MAX_NON_ASCII = 0.01
MIN_ALPHA_SPACE = 0.80
MAX_DUP_LINES = 0.30
MAX_DUP_TRIGRAMS = 0.30
NEAR_DUP_JACCARD = 0.7
SHINGLE_WORDS = 5
MINHASH_BANDS = 8
MINHASH_ROWS = 2
DROP_REASONS = ("short", "non_ascii", "symbols", "repeated_lines", "repeated_ngrams", "duplicate", "near_duplicate")

# Folders of the standard library that hold no prose worth training on (or not the standard library).
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages", "dist-packages",
                       "lib2to3", "__pycache__", "ensurepip", "encodings", "pydoc_data", "venv"})
TOPICS_SOURCE = "pydoc_data/topics.py"

_MERSENNE = (1 << 61) - 1
_rng = np.random.default_rng(20240607)
_HASH_A = _rng.integers(1, 1 << 31, MINHASH_BANDS * MINHASH_ROWS, dtype=np.uint64)
_HASH_B = _rng.integers(0, 1 << 31, MINHASH_BANDS * MINHASH_ROWS, dtype=np.uint64)
_WS = re.compile(r"\s+")


def stdlib_root() -> Path:
    """The folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files(root: Path) -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(("config-", "plat-")))
        files += [Path(folder) / n for n in sorted(names) if n.endswith(".py")]
    return files


@functools.lru_cache(maxsize=1)
def _stdlib_documents() -> tuple[str, ...]:
    root = stdlib_root()
    sources: list[tuple[str, list[str]]] = []
    for f in _source_files(root):
        docs = _file_docstrings(f)
        if docs:
            sources.append((f.relative_to(root).as_posix(), docs))
    topics = importlib.import_module("pydoc_data.topics").topics  # a plain dict of strings: nothing runs
    sources.append((TOPICS_SOURCE, [inspect.cleandoc(topics[k]) for k in sorted(topics) if topics[k].strip()]))
    sources.sort(key=lambda s: s[0])
    return tuple(d for _, docs in sources for d in docs)


def _file_docstrings(path: Path) -> list[str]:
    """Docstrings of the module and of every class and function in it (nested ones too), in file order."""
    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (SyntaxError, ValueError, OSError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = [n for n in ast.walk(tree) if isinstance(n, kinds)]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    out = []
    for n in nodes:
        doc = ast.get_docstring(n, clean=False)
        if doc and doc.strip():
            out.append(inspect.cleandoc(doc))
    return out


def stdlib_documents() -> list[str]:
    """Docstrings of the installed standard library (parsed, never imported) and pydoc's help topics.

    Ordered by source path, then by position in the file; computed once per process."""
    return list(_stdlib_documents())


def _split_long(doc: str, limit: int = MAX_CHARS) -> list[str]:
    """``doc`` cut at blank lines into chunks of at most ``limit`` characters."""
    if len(doc) <= limit:
        return [doc]
    chunks, cur = [], ""
    for para in re.split(r"\n\s*\n", doc):
        para = para.strip()
        if not para:
            continue
        if len(para) > limit:  # one paragraph too long: cut at the last space before the limit
            cut = para.rfind(" ", 0, limit)
            para = para[:cut if cut > 0 else limit]
        if cur and len(cur) + 2 + len(para) > limit:
            chunks.append(cur)
            cur = para
        else:
            cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        chunks.append(cur)
    return chunks


def _normalise(doc: str) -> str:
    return _WS.sub(" ", doc).strip().lower()


def problem(doc: str) -> str | None:
    """The first filter reason (of ``DROP_REASONS``, not the duplicate ones) ``doc`` fails, or None."""
    n = len(doc)
    if n < MIN_CHARS:
        return "short"
    if sum(1 for c in doc if ord(c) > 127) > MAX_NON_ASCII * n:
        return "non_ascii"
    if sum(1 for c in doc if c.isalpha() or c == " ") < MIN_ALPHA_SPACE * n:
        return "symbols"
    lines = [ln.strip() for ln in doc.splitlines() if ln.strip()]
    if lines and len(lines) - len(set(lines)) > MAX_DUP_LINES * len(lines):
        return "repeated_lines"
    words = doc.lower().split()
    grams = list(zip(words, words[1:], words[2:]))
    if grams and len(grams) - len(set(grams)) > MAX_DUP_TRIGRAMS * len(grams):
        return "repeated_ngrams"
    return None


def _shingles(norm: str) -> np.ndarray:
    words = norm.split()
    k = min(SHINGLE_WORDS, len(words))
    grams = {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}
    return np.array(sorted(zlib.crc32(g.encode()) for g in grams), dtype=np.uint64)


def _band_keys(shingles: np.ndarray) -> list[tuple]:
    sig = ((shingles[:, None] * _HASH_A[None, :] + _HASH_B[None, :]) % _MERSENNE).min(axis=0)
    return [(b, *sig[b * MINHASH_ROWS:(b + 1) * MINHASH_ROWS].tolist()) for b in range(MINHASH_BANDS)]


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / max(len(a) + len(b) - inter, 1)


def quality_filter(docs) -> tuple[list[str], dict]:
    """The documents that pass every check (long ones split first), and the drops per reason.

    The counts hold every reason of ``DROP_REASONS`` (zero included), plus ``in`` (documents given),
    ``split`` (extra chunks made by splitting) and ``kept``. See the module docstring for the checks."""
    counts = dict.fromkeys(DROP_REASONS, 0)
    counts.update({"in": 0, "split": 0})
    kept: list[str] = []
    seen: set[str] = set()
    buckets: dict[tuple, list[int]] = {}
    kept_shingles: list[np.ndarray] = []
    for doc in docs:
        counts["in"] += 1
        chunks = _split_long(doc.strip())
        counts["split"] += len(chunks) - 1
        for chunk in chunks:
            reason = problem(chunk)
            if reason:
                counts[reason] += 1
                continue
            norm = _normalise(chunk)
            if norm in seen:
                counts["duplicate"] += 1
                continue
            sh = _shingles(norm)
            keys = _band_keys(sh)
            cands = {i for k in keys for i in buckets.get(k, ())}
            if any(_jaccard(sh, kept_shingles[i]) >= NEAR_DUP_JACCARD for i in sorted(cands)):
                counts["near_duplicate"] += 1
                continue
            seen.add(norm)
            for k in keys:
                buckets.setdefault(k, []).append(len(kept))
            kept_shingles.append(sh)
            kept.append(chunk)
    counts["kept"] = len(kept)
    return kept, counts


def general_corpus() -> tuple[list[str], dict]:
    """``stdlib_documents()`` through ``quality_filter``: (documents, counts), in a stable order."""
    return quality_filter(stdlib_documents())
