"""Pretraining data: named sources, tokenized once into memory-mapped caches, mixed by phase into batches.

A **source** is either files (text files, JSONL with ``text`` or ``messages``, folders; see
``tokenizer_train.HELP``) or one of the project's own corpora (``BUILTINS``): ``general`` (Python
standard-library documentation, filtered and deduplicated), ``textbook`` (synthetic textbook
exercises and stories) and ``dialogues`` (synthetic chat in the Phi-3 template).

**Token cache.** Each source is tokenized once into ``CACHE/tokens/NAME-KEY.bin`` (uint16 or uint32
ids, every document followed by ``<|endoftext|>``, written document by document, never held whole in
memory) with ``NAME-KEY.json`` beside it (written last: its presence marks a complete cache). KEY hashes
the tokenizer files and the source: its files' paths, sizes and modification times, or a builtin's
name, size and seed. A later run with the same key memory-maps the file and tokenizes nothing.

**Windows.** A source's token stream is cut into windows of ``seq_len + 1`` tokens at stride
``seq_len`` (inputs ``w[:-1]``, targets ``w[1:]``; documents are separated by ``<|endoftext|>`` only).
The last ``VAL_FRACTION`` of the stream (at least one window) is held out for validation.

**Mixing.** Every row of every micro-batch of a phase is drawn from one source with the phase's
weights (seeded by the run's seed and the phase index). A source's rows go through its windows in a
random order per epoch (seeded by source and epoch), continuing across phases, so phase 2 does not
repeat what phase 1 read first. The whole plan is a pair of integer arrays computed up front, so
``seek(n)`` puts a resumed run exactly where it stopped, phase boundaries included.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import mlx.core as mx
import numpy as np

from phi3mlx.errors import Phi3MLXError
from phi3mlx.tokenizer import BaseTokenizer

from . import corpus, synthetic
from .tokenizer_train import file_documents, listed, source_files

VAL_FRACTION = 0.01
ENCODE_BATCH = 256  # documents tokenized per call
BUILTIN_VERSION = 1  # bump when a builtin corpus changes, so caches made from the old one are not reused


def _general(docs: int, seed: int, shares: Optional[dict] = None) -> list[str]:
    texts, _ = corpus.general_corpus()
    return texts if docs <= 0 else texts[:docs]


def _textbook(docs: int, seed: int, shares: Optional[dict] = None) -> list[str]:
    return synthetic.textbook_documents(docs, seed)


def _dialogues(docs: int, seed: int, shares: Optional[dict] = None) -> list:
    return synthetic.chat_dialogues(docs, seed, shares)


# name -> (documents(docs, seed), default number of documents (0: all), documents are message lists)
BUILTINS: dict[str, tuple[Callable, int, bool]] = {
    "general": (_general, 0, False),
    "textbook": (_textbook, 20000, False),
    "dialogues": (_dialogues, 20000, True),
}


@dataclass
class Source:
    """One named source: ``paths`` (files and folders) or ``builtin`` (with ``docs``, ``seed`` and, for
    ``dialogues``, ``shares``: weights of the dialogue kinds, as ``synthetic.chat_dialogues`` takes)."""

    name: str
    paths: list = field(default_factory=list)
    builtin: Optional[str] = None
    docs: int = 0
    seed: int = 0
    shares: Optional[dict] = None

    KEYS = ("paths", "builtin", "docs", "seed", "shares")

    @classmethod
    def parse(cls, name: str, raw, problems: list[str]) -> Optional["Source"]:
        where = f"sources.{name}"
        if isinstance(raw, (str, list)):  # a path or a list of paths
            raw = {"paths": raw if isinstance(raw, list) else [raw]}
        if not isinstance(raw, dict):
            problems.append(f"{where} must be a mapping with paths or builtin, got {raw!r}")
            return None
        unknown = sorted(set(raw) - set(cls.KEYS))
        if unknown:
            problems.append(f"{where}: unknown keys {', '.join(unknown)} (known: {', '.join(cls.KEYS)})")
        paths, builtin = raw.get("paths") or [], raw.get("builtin")
        if isinstance(paths, str):
            paths = [paths]
        if bool(paths) == bool(builtin):
            problems.append(f"{where} needs exactly one of paths (files or folders) or builtin "
                            f"({', '.join(BUILTINS)})")
        if builtin is not None and builtin not in BUILTINS:
            problems.append(f"{where}: unknown builtin {builtin!r} (known: {', '.join(BUILTINS)})")
        for k in ("docs", "seed"):
            if not isinstance(raw.get(k, 0), int) or isinstance(raw.get(k, 0), bool) or raw.get(k, 0) < 0:
                problems.append(f"{where}.{k} must be a non-negative integer, got {raw.get(k)!r}")
        shares = raw.get("shares")
        if shares is not None and (builtin != "dialogues" or not isinstance(shares, dict)):
            problems.append(f"{where}.shares is a mapping of dialogue kinds to weights, for builtin: dialogues only")
            shares = None
        if builtin is None:
            missing = [str(p) for p in paths if not Path(p).expanduser().exists()]
            if missing:
                problems.append(f"{where}: no such file or folder: {', '.join(missing)}")
        try:
            return cls(name, [str(Path(p).expanduser()) for p in paths], builtin, int(raw.get("docs", 0) or 0),
                       int(raw.get("seed", 0) or 0), shares)
        except (TypeError, ValueError):
            return None

    def spec(self) -> dict:
        """What the token cache's key depends on besides the tokenizer."""
        if self.builtin:
            docs = self.docs or BUILTINS[self.builtin][1]
            spec = {"builtin": self.builtin, "docs": docs, "seed": self.seed, "version": BUILTIN_VERSION}
            return dict(spec, shares=self.shares) if self.shares else spec
        files = []
        problems: list[str] = []
        for f in source_files(self.paths, problems):
            st = f.stat()
            files.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
        if problems:
            raise Phi3MLXError.many(listed([f"sources.{self.name}: {p}" for p in problems]))
        return {"files": files}

    def documents(self, tokenizer: BaseTokenizer) -> Iterator[str]:
        """The source's documents as text, one file at a time (chat messages rendered with the template)."""
        if self.builtin:
            make, default, chat = BUILTINS[self.builtin]
            for doc in make(self.docs or default, self.seed, self.shares):
                yield tokenizer.apply_chat_template(doc, add_generation_prompt=False) if chat else doc
            return
        problems: list[str] = []
        for f in source_files(self.paths, problems):
            docs = file_documents(f, problems)
            if problems:
                raise Phi3MLXError.many(listed([f"sources.{self.name}: {p}" for p in problems]))
            yield from docs


def empty_sources(sources: list[Source]) -> list[str]:
    """The problems of file sources without any text (read only up to each one's first non-blank document)."""
    problems = []
    for s in sources:
        if s.builtin:
            continue
        if not any(d.strip() for d in s.documents(ContentOnly())):
            problems.append(f"source {s.name!r} is empty: its files hold no text")
    return problems


class ContentOnly:
    """Renders chat messages as their contents only."""

    def apply_chat_template(self, messages, add_generation_prompt=False, **kw):
        return "\n".join(m.get("content", "") for m in messages)


def tokenizer_key(folder: Path) -> str:
    """A hash of a tokenizer folder's files (what its ids depend on)."""
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        f = Path(folder) / name
        if f.exists():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _batched(it: Iterable, n: int) -> Iterator[list]:
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode_many(tokenizer: BaseTokenizer, texts: list[str]) -> list[list[int]]:
    hf = getattr(tokenizer, "hf", None)
    if hf is not None:  # the fast tokenizer encodes a batch in one call
        return hf(texts, add_special_tokens=False)["input_ids"]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


@dataclass
class TokenStream:
    """A source's tokens, memory-mapped: ``tokens`` (N,), ``docs`` documents."""

    name: str
    tokens: np.ndarray
    docs: int
    path: Path


def tokenize_source(source: Source, tokenizer: BaseTokenizer, tok_key: str, eos_id: int, cache: Path,
                    progress: Optional[Callable[[str, int], None]] = None) -> TokenStream:
    """The source's token stream from the cache, tokenizing it first if needed (see the module docstring).

    ``progress(name, docs_done)`` is called as documents are tokenized."""
    key = hashlib.sha256(json.dumps({"tokenizer": tok_key, "source": source.spec()}, sort_keys=True).encode())
    stem = f"{source.name}-{key.hexdigest()[:16]}"
    folder = Path(cache) / "tokens"
    data, meta_file = folder / f"{stem}.bin", folder / f"{stem}.json"
    dtype = np.uint16 if max(tokenizer.vocab_size, eos_id + 1) <= 1 << 16 else np.uint32
    if not (meta_file.exists() and data.exists()):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Phi3MLXError(f"cannot create the token cache {folder}: {e.strerror or e}") from None
        tmp = folder / f".{stem}.bin.tmp-{os.getpid()}"
        n_docs = n_tok = 0
        try:
            with open(tmp, "wb") as f:
                for texts in _batched(source.documents(tokenizer), ENCODE_BATCH):
                    for ids in _encode_many(tokenizer, texts):
                        arr = np.asarray(list(ids) + [eos_id], dtype=dtype)
                        arr.tofile(f)
                        n_tok += arr.size
                    n_docs += len(texts)
                    if progress:
                        progress(source.name, n_docs)
            os.replace(tmp, data)
            meta_tmp = meta_file.with_name(meta_file.name + f".tmp-{os.getpid()}")
            meta_tmp.write_text(json.dumps({"source": source.name, "docs": n_docs, "tokens": n_tok,
                                            "dtype": np.dtype(dtype).name}))
            os.replace(meta_tmp, meta_file)
        except OSError as e:
            raise Phi3MLXError(f"cannot write the token cache {data}: {e.strerror or e}") from None
        finally:
            tmp.unlink(missing_ok=True)
    meta = json.loads(meta_file.read_text())
    tokens = (np.memmap(data, dtype=meta["dtype"], mode="r") if meta["tokens"]
              else np.zeros((0,), dtype=meta["dtype"]))
    return TokenStream(source.name, tokens, meta["docs"], data)


@dataclass
class Windows:
    """A source's training and validation windows (``seq_len + 1`` tokens at stride ``seq_len``)."""

    stream: TokenStream
    seq_len: int

    @property
    def split(self) -> int:
        """Where validation starts in the token stream."""
        n = len(self.stream.tokens)
        val = max(self.seq_len + 1, int(n * VAL_FRACTION))
        return max(0, n - val)

    @property
    def n_train(self) -> int:
        return max(0, (self.split - 1) // self.seq_len)

    @property
    def n_val(self) -> int:
        n = len(self.stream.tokens) - self.split
        return max(0, (n - 1) // self.seq_len)

    def train_window(self, i: int) -> np.ndarray:
        s = i * self.seq_len
        return self.stream.tokens[s:s + self.seq_len + 1]

    def val_window(self, i: int) -> np.ndarray:
        s = self.split + i * self.seq_len
        return self.stream.tokens[s:s + self.seq_len + 1]


@dataclass
class Phase:
    """A phase of pretraining: a token budget and mixture weights over named sources."""

    name: str
    tokens: int
    mix: dict


def phase_problems(phases: list[Phase], sources: dict) -> list[str]:
    problems = []
    names = [p.name for p in phases]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"phase name {dup!r} is used twice")
    for p in phases:
        where = f"phase {p.name!r}"
        if not isinstance(p.tokens, int) or isinstance(p.tokens, bool) or p.tokens <= 0:
            problems.append(f"{where} has a token budget of {p.tokens!r}; it must be a positive number of tokens")
        if not isinstance(p.mix, dict) or not p.mix:
            problems.append(f"{where} needs mix: a mapping of source names to weights")
            continue
        bad = [f"{k}={v!r}" for k, v in p.mix.items()
               if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0]
        if bad:
            problems.append(f"{where}: weights must be non-negative numbers ({', '.join(bad)})")
        elif not sum(p.mix.values()) > 0:
            problems.append(f"{where}: the weights sum to {sum(p.mix.values())}; they must sum to a positive number")
        unknown = sorted(k for k in p.mix if k not in sources)
        if unknown:
            problems.append(f"{where} mixes unknown sources {', '.join(unknown)} (defined: {', '.join(sources) or 'none'})")
    if not phases:
        problems.append("no phases: give at least one phase with a token budget and a mix")
    return problems


def phase_steps(phases: list[Phase], tokens_per_step: int) -> list[int]:
    """Optimizer steps per phase: its token budget over the tokens of one step, rounded up."""
    return [max(1, math.ceil(p.tokens / tokens_per_step)) for p in phases]


class PretrainBatches:
    """The micro-batches of a whole run, phase after phase (an iterator with ``seek``).

    Each micro-batch is ``(inputs (B, L) int32, targets (B, L) int32, mask (B, L) float32)`` with L the
    sequence length; ``steps[i] * grad_accum`` micro-batches make phase i.
    """

    def __init__(self, windows: dict[str, Windows], phases: list[Phase], steps: list[int], batch_size: int,
                 grad_accum: int, seed: int = 0):
        self.windows, self.phases, self.steps = windows, phases, steps
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        names = list(windows)
        row_source, row_index = [], []
        taken = {n: 0 for n in names}
        for pi, (phase, n_steps) in enumerate(zip(phases, steps)):
            rows = n_steps * grad_accum * batch_size
            used = [n for n in names if phase.mix.get(n, 0) > 0]
            w = np.array([float(phase.mix[n]) for n in used])
            pick = np.random.default_rng([seed, pi]).choice(len(used), size=rows, p=w / w.sum())
            pos = np.empty(rows, dtype=np.int64)  # each row's place in its source's sequence of windows
            for j, n in enumerate(used):
                at = np.flatnonzero(pick == j)
                pos[at] = taken[n] + np.arange(at.size)
                taken[n] += at.size
            row_source.append(np.array([names.index(n) for n in used], dtype=np.int64)[pick])
            row_index.append(pos)
        self.names = names
        self.row_source = np.concatenate(row_source) if row_source else np.zeros(0, np.int64)
        self.row_index = np.concatenate(row_index) if row_index else np.zeros(0, np.int64)
        self.taken = taken
        self.position = 0  # micro-batches given out
        self._perms: dict = {}

    def __len__(self) -> int:
        return len(self.row_source) // self.batch_size

    def __iter__(self):
        return self

    def seek(self, n: int) -> None:
        self.position = n

    def phase_at(self, step: int) -> int:
        """The phase index optimizer step ``step`` (1-based) belongs to."""
        bounds = np.cumsum(self.steps)
        return int(min(np.searchsorted(bounds, step, side="left"), len(self.steps) - 1))

    def _window(self, source: int, index: int) -> np.ndarray:
        w = self.windows[self.names[source]]
        epoch, i = divmod(int(index), w.n_train)
        key = (source, epoch)
        if key not in self._perms:
            self._perms[key] = np.random.default_rng([self.seed, 1000 + source, epoch]).permutation(w.n_train)
        return w.train_window(int(self._perms[key][i]))

    def __next__(self):
        if self.position >= len(self):
            raise StopIteration
        r = self.position * self.batch_size
        rows = np.stack([self._window(s, i) for s, i in zip(self.row_source[r:r + self.batch_size],
                                                            self.row_index[r:r + self.batch_size])]).astype(np.int32)
        self.position += 1
        return mx.array(rows[:, :-1]), mx.array(rows[:, 1:]), mx.ones(rows[:, 1:].shape, dtype=mx.float32)

    def epochs(self) -> dict[str, float]:
        """How many times the run reads each source's training windows."""
        return {n: self.taken[n] / max(1, self.windows[n].n_train) for n in self.names}


def validation_batches(windows: dict[str, Windows], phase: Phase, batch_size: int, n_batches: int):
    """A function giving the validation batches of one phase: its sources' held-out windows, as many
    from each as its weight asks for out of ``n_batches * batch_size`` rows (at least one row a source)."""
    used = [n for n in windows if phase.mix.get(n, 0) > 0]
    total = sum(float(phase.mix[n]) for n in used)
    rows = []
    want = max(1, n_batches) * batch_size
    for n in used:
        w = windows[n]
        k = min(w.n_val, max(1, round(want * float(phase.mix[n]) / total)))
        rows += [w.val_window(i) for i in range(k)]

    def batches():
        for s in range(0, max(1, len(rows) - batch_size + 1), batch_size):  # whole batches (one short one if few)
            chunk = np.stack(rows[s:s + batch_size]).astype(np.int32)
            yield mx.array(chunk[:, :-1]), mx.array(chunk[:, 1:]), mx.ones(chunk[:, 1:].shape, dtype=mx.float32)

    return batches
