"""``phi3mlx tokenizer train``: a sentencepiece BPE tokenizer with the Phi-3 special tokens, from your text.

The result is a folder that ``phi3mlx.tokenizer.load_tokenizer`` and transformers' ``AutoTokenizer``
read, with the ids sentencepiece itself gives:

* ``tokenizer.model``: the sentencepiece model (byte fallback, digits split, no text normalisation,
  no dummy prefix, whitespace-only pieces allowed).
* ``tokenizer.json``: the same vocabulary and merges as a ``tokenizers`` BPE (``" "`` -> ``"▁"``, byte
  fallback), the special tokens as added tokens.
* ``tokenizer_config.json`` and ``special_tokens_map.json``: bos ``<s>``, eos and pad
  ``<|endoftext|>``, unk ``<unk>``, no BOS added by ``encode``, the Phi-3 chat template.

Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, then ``SPECIAL_TOKENS`` (3-7), the 256 byte pieces
``<0x00>``..``<0xFF>`` (8-263), then the learned pieces. Every string round-trips through
encode/decode except one holding ``▁`` (U+2581), which decodes to a space, as in every sentencepiece
tokenizer. Typed as text, ``<s>``, ``</s>`` and ``<unk>`` are plain text to sentencepiece but their
special id to transformers (which registers the bos, eos and unk tokens as special).

Rare characters: when the corpus has more distinct characters than fit in half of the learned part of
the vocabulary, only the most frequent ones get a piece; the others are written as UTF-8 byte pieces
(sentencepiece's own ``character_coverage`` cannot go below 0.98, too high for a small vocabulary).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Union

from phi3mlx.errors import Phi3MLXError
from phi3mlx.tokenizer import PHI3_CHAT_TEMPLATE, utf8_problem
from phi3mlx.weights import atomic_dir, check_output

SPECIAL_TOKENS = ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>")
META_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
BOS, EOS, UNK, PAD = "<s>", "<|endoftext|>", "<unk>", "<|endoftext|>"
FIXED_PIECES = len(META_TOKENS) + len(SPECIAL_TOKENS) + 256  # ids 0..263
MIN_VOCAB_SIZE = 300  # the fixed pieces and a few dozen learned ones
MODEL_MAX_LENGTH = 4096
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIX = ".jsonl"
CHUNK_CHARS = 1 << 14  # documents reach sentencepiece in pieces of at most this many characters
MAX_LISTED = 10  # problems named one by one before "and N more"
FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

HELP = f"""\
Inputs (--input, any number of files and folders, all read and checked before training):
  .jsonl file   one JSON object a line: {{"text": ...}}, {{"messages": [{{"role": ..., "content": ...}}, ...]}}
                (every content string) or {{"prompt": ..., "completion": ...}}; each string is a document
  other file    the whole file is one document (UTF-8 text)
  folder        its {', '.join(TEXT_SUFFIXES)} and {JSONL_SUFFIX} files, recursively, in sorted order
                (hidden files and folders are skipped)
Output (--out): tokenizer.model (sentencepiece), tokenizer.json, tokenizer_config.json and
special_tokens_map.json, written to a temporary folder and renamed; an existing folder is replaced only
with --force. Load it with AutoTokenizer.from_pretrained(DIR) or phi3mlx.tokenizer.load_tokenizer(DIR).
Vocabulary: byte-fallback BPE, so any text round-trips (except ▁, U+2581, which decodes as a space);
digits are single tokens; spaces, tabs and newlines are kept as they are. Ids 0-2: <unk> <s> </s>;
3-7: {' '.join(SPECIAL_TOKENS)} (each always one token); 8-263: the 256 bytes;
then the learned pieces. --vocab-size is at least {MIN_VOCAB_SIZE} and at most what the corpus supports
(the error names that number).
Tokens: bos <s> (not added by encode), eos and pad <|endoftext|>, unk <unk>. Chat template: the Phi-3
format, <|user|>\\n...<|end|>\\n<|assistant|>\\n.
A model config for this tokenizer needs vocab_size, bos_token_id 1 and eos_token_id 3 (printed at the end).
"""


# --- reading ------------------------------------------------------------------------------------------


def listed(problems: list[str]) -> list[str]:
    rest = len(problems) - MAX_LISTED
    return problems[:MAX_LISTED] + ([f"and {rest} more problems"] if rest > 0 else [])


def _read_text(f: Path, problems: list[str]) -> str | None:
    try:
        data = f.read_bytes()
    except OSError as e:
        problems.append(f"{f}: cannot read it ({e.strerror or e})")
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        problems.append(f"{f}: not valid UTF-8 (byte {e.start + 1})")
        return None


def _row_texts(row: dict) -> list[str] | None:
    """The strings of one JSONL row, or None when it has none of the known keys or a wrong type."""
    if isinstance(row.get("text"), str):
        return [row["text"]]
    if isinstance(row.get("messages"), list):
        msgs = row["messages"]
        if all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
            return [m["content"] for m in msgs]
        return None
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return [row["prompt"], row["completion"]]
    return None


def _read_jsonl(f: Path, problems: list[str]) -> list[str]:
    text = _read_text(f, problems)
    if text is None:
        return []
    docs = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{f}:{n}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        texts = _row_texts(row) if isinstance(row, dict) else None
        if texts is None:
            problems.append(f'{f}:{n}: expected {{"text": str}}, {{"messages": [{{"role", "content": str}}, ...]}} '
                            'or {"prompt": str, "completion": str}')
            continue
        docs += texts
    return docs


def _folder_files(folder: Path) -> list[Path]:
    """The text and JSONL files under ``folder``, recursively, sorted; hidden entries skipped."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / n for n in sorted(files)
                  if not n.startswith(".") and Path(n).suffix.lower() in (*TEXT_SUFFIXES, JSONL_SUFFIX)]
    return found


def source_files(paths: list[Union[str, Path]], problems: list[str]) -> list[Path]:
    """The files the paths name (a folder: its text and JSONL files, recursively, sorted); a missing
    path or a folder without such files is added to ``problems``."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = _folder_files(p)
            if not files:
                problems.append(f"{p}: no {', '.join(TEXT_SUFFIXES)} or {JSONL_SUFFIX} files in this folder")
            out += files
        elif p.exists():
            out.append(p)
        else:
            problems.append(f"{p}: no such file or folder")
    return out


def file_documents(f: Path, problems: list[str]) -> list[str]:
    """The documents of one file (a JSONL file: one per row string; any other: the whole file)."""
    if f.suffix.lower() == JSONL_SUFFIX:
        return _read_jsonl(f, problems)
    text = _read_text(f, problems)
    return [] if text is None else [text]


def read_texts(paths: list[Union[str, Path]]) -> Iterator[str]:
    """The documents of text files, JSONL files and folders (see ``HELP``), in the order given.

    Everything is read and checked first: a missing path, an unreadable or non-UTF-8 file, a bad JSONL
    line or a folder without such files raise one ``Phi3MLXError`` naming every problem."""
    problems: list[str] = []
    docs: list[str] = []
    for f in source_files(paths, problems):
        docs += file_documents(f, problems)
    if problems:
        raise Phi3MLXError.many(listed(problems))
    return iter(docs)


# --- training -----------------------------------------------------------------------------------------


def _chunks(texts: Iterable[str]) -> list[str]:
    """The documents cut at line ends into pieces of at most CHUNK_CHARS characters (blank ones dropped)."""
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise Phi3MLXError(f"document {i + 1} is {type(text).__name__}, not a string")
        problem = utf8_problem(text, f"document {i + 1}")
        if problem:
            raise Phi3MLXError(problem)
        start = 0
        while start < len(text):
            end = min(start + CHUNK_CHARS, len(text))
            if end < len(text):
                cut = text.rfind("\n", start, end)
                end = cut + 1 if cut > start else end
            if text[start:end].strip():
                out.append(text[start:end])
            start = end
    return out


def _hide_rare_characters(chunks: list[str], max_chars: int) -> list[str]:
    """The chunks with every character but the ``max_chars`` most frequent replaced by NUL.

    sentencepiece gives no piece to NUL (it neither counts it nor learns merges across it) and writes
    it, like any character without a piece, as byte pieces; so the vocabulary holds at most
    ``max_chars`` characters and the rest of the text trains as it is. Space and ``▁`` count as one
    character, as sentencepiece sees them."""
    counts: Counter = Counter()
    for c in chunks:
        counts.update(c)
    counts[" "] += counts.pop("\u2581", 0)
    counts.pop("\0", None)
    if len(counts) <= max_chars:
        return chunks
    keep = {c for c, _ in counts.most_common(max_chars)}
    table = {ord(c): 0 for c in counts if c not in keep}
    if " " not in keep:
        table[ord("\u2581")] = 0
    return [c.translate(table) for c in chunks]


def _train_sentencepiece(chunks: list[str], vocab_size: int) -> bytes:
    import sentencepiece as spm  # kept off the start-up of every other phi3mlx command

    model = io.BytesIO()
    chunks = _hide_rare_characters(chunks, (vocab_size - FIXED_PIECES) // 2)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(chunks), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=list(SPECIAL_TOKENS),
            character_coverage=1.0, max_sentence_length=4 * CHUNK_CHARS + 16, hard_vocab_limit=True,
            num_threads=min(2, os.cpu_count() or 1), minloglevel=2)
    except RuntimeError as e:
        msg = str(e)
        if "Vocabulary size too high" in msg:
            most = msg.rsplit("<=", 1)[-1].strip(" .")
            raise Phi3MLXError(f"the corpus supports a vocabulary of at most {most} tokens, not {vocab_size}: "
                               "give a smaller vocab_size or more text") from None
        raise Phi3MLXError(f"sentencepiece could not train: {msg.strip().splitlines()[-1]}") from None
    return model.getvalue()


def _tokenizer_json(model: bytes) -> str:
    """The sentencepiece model as a ``tokenizers`` BPE (tokenizer.json) that gives the same ids."""
    import sentencepiece as spm  # kept off the start-up of every other phi3mlx command
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers  # as sentencepiece above

    sp = spm.SentencePieceProcessor(model_proto=model)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    learned = {p: i for p, i in vocab.items() if i >= FIXED_PIECES}
    # sentencepiece merges the adjacent pair whose joined piece scores highest (the lowest id): each
    # split of a learned piece into two learned pieces is a merge, ranked by the joined piece's id
    merges = sorted((i, learned[p[:k]], learned[p[k:]], p[:k], p[k:])
                    for p, i in learned.items() for k in range(1, len(p)) if p[:k] in learned and p[k:] in learned)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token=UNK,
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in META_TOKENS + SPECIAL_TOKENS])
    return tok.to_str(pretty=True)


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def _configs() -> tuple[dict, dict]:
    """tokenizer_config.json and special_tokens_map.json."""
    ids = {t: i for i, t in enumerate(META_TOKENS + SPECIAL_TOKENS)}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as it is (a Llama class would add a prefix)
        "bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH, "chat_template": PHI3_CHAT_TEMPLATE,
        "added_tokens_decoder": {str(i): _added_token(t) for t, i in ids.items()},
    }
    special = {k: _added_token(v) for k, v in (("bos_token", BOS), ("eos_token", EOS), ("unk_token", UNK),
                                               ("pad_token", PAD))}
    return config, special


def check_vocab_size(vocab_size: int) -> None:
    """Refuse a vocabulary too small for the fixed pieces and a few learned ones."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise Phi3MLXError(f"the vocabulary size must be at least {MIN_VOCAB_SIZE} ({FIXED_PIECES} fixed pieces: "
                           f"{len(META_TOKENS) + len(SPECIAL_TOKENS)} special tokens and 256 bytes, plus learned "
                           f"ones), got {vocab_size}")


def train_tokenizer(texts: Iterable[str], out: Path, vocab_size: int = 2048, *, force: bool = False) -> dict:
    """Train a BPE tokenizer on ``texts`` and write it to the folder ``out`` (see the module docstring).

    Returns the ids a model config needs: ``vocab_size``, ``bos_token_id``, ``eos_token_id``
    (``<|endoftext|>``), ``end_token_id`` (``<|end|>``) and ``pad_token_id``."""
    out = Path(out)
    check_vocab_size(vocab_size)
    check_output(out, force)
    chunks = _chunks(texts)
    if not chunks:
        raise Phi3MLXError("the corpus is empty: no document holds any text other than whitespace")
    model = _train_sentencepiece(chunks, vocab_size)
    tokenizer_json = _tokenizer_json(model)
    config, special = _configs()
    with atomic_dir(out, force=force) as tmp:
        (tmp / "tokenizer.model").write_bytes(model)
        (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    ids = {t: i for i, t in enumerate(META_TOKENS + SPECIAL_TOKENS)}
    return {"vocab_size": vocab_size, "bos_token_id": ids[BOS], "eos_token_id": ids[EOS],
            "end_token_id": ids["<|end|>"], "pad_token_id": ids[PAD]}


# --- command line -------------------------------------------------------------------------------------


def add_parser(sub, formatter) -> None:
    """``tokenizer train`` under the ``tokenizer`` group's subparsers ``sub``."""
    p = sub.add_parser("train", help="train a BPE tokenizer with the Phi-3 special tokens on your text",
                       formatter_class=formatter, epilog=HELP,
                       description="Train a sentencepiece BPE tokenizer on text files, JSONL files or folders "
                       "and write a folder that transformers and phi3mlx load.")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="text files, .jsonl files or folders of them")
    p.add_argument("--out", required=True, metavar="DIR", help="the tokenizer folder to write")
    p.add_argument("--vocab-size", type=int, default=2048, metavar="N",
                   help=f"tokens in the vocabulary, at least {MIN_VOCAB_SIZE}")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")


def run(args: argparse.Namespace) -> dict:
    """The body of ``phi3mlx tokenizer train``; prints a summary to stderr."""
    start = time.perf_counter()
    check_vocab_size(args.vocab_size)  # the cheap checks before reading anything
    check_output(Path(args.out), args.force)
    texts = list(read_texts(args.input))
    ids = train_tokenizer(texts, Path(args.out), args.vocab_size, force=args.force)
    print(f"wrote {args.out} ({', '.join(FILES)}): {ids['vocab_size']} tokens from {len(texts)} documents "
          f"({sum(map(len, texts)) / 1e6:.2f}M characters) in {time.perf_counter() - start:.1f} s; "
          f"bos_token_id {ids['bos_token_id']}, eos_token_id {ids['eos_token_id']} (<|endoftext|>), "
          f"<|end|> {ids['end_token_id']}", file=sys.stderr)
    return ids
