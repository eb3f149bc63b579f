"""Fine-tuning data: read JSONL splits, tell their format, encode rows into token ids, batch them.

A data path is a folder holding ``train.jsonl`` / ``valid.jsonl`` / ``test.jsonl``, or one ``.jsonl``
file (the train split). Every row of a file has the same format:

* ``text``              ``{"text": str}``
* ``completion``        ``{"prompt": str, "completion": str}``
* ``chat``              ``{"messages": [{"role": str, "content": str}, ...]}`` (optional ``"tools"``)
* ``preference``        ``{"prompt": P, "chosen": R, "rejected": R}``; P is a string (one user message) or
  a message list, R a string (one assistant message) or a list of assistant messages
* ``openai_preference`` ``{"input": {"messages": [...]}, "preferred_output": [assistant messages],
  "non_preferred_output": [assistant messages]}``

Other keys are ignored. An encoded SFT example is ``(ids, mask)``: two lists of length N where
``mask[i] = 1`` when token ``i`` is a target the loss counts (the batch shifts: inputs ``ids[:-1]``,
targets ``ids[1:]``, loss mask ``mask[1:]``). An encoded preference example is
``(prompt_ids, chosen_ids, rejected_ids)`` with ``prompt_ids + chosen_ids`` the whole chosen
conversation as the chat template renders it.

Batches are ``(inputs (B, L) int32, targets (B, L) int32, loss_mask (B, L) float32)``, right-padded
with 0 (mask 0), built from length-sorted examples so that a batch holds similar lengths.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from phi3mlx.cache import common_prefix
from phi3mlx.errors import Phi3MLXError
from phi3mlx.processor import IMAGE_TAG, keyed_ids
from phi3mlx.tokenizer import BaseTokenizer

FORMATS = ("text", "completion", "chat", "preference", "openai_preference")
SFT_FORMATS = ("text", "completion", "chat")
PREFERENCE_FORMATS = ("preference", "openai_preference")
REQUIRED_KEYS = {
    "text": ("text",),
    "completion": ("prompt", "completion"),
    "chat": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "openai_preference": ("input", "preferred_output", "non_preferred_output"),
}
MAX_LISTED = 5  # bad lines/rows named in one error message; the rest are counted

SFTExample = tuple[list[int], list[int]]
PreferenceExample = tuple[list[int], list[int], list[int]]
Batch = tuple[mx.array, mx.array, mx.array]
Messages = list[dict]


class Row(dict):
    """One JSONL row: a plain dict that also remembers its ``file`` and 1-based ``line``."""

    file: str = ""
    line: int = 0


def _where(row: dict) -> str:
    """``FILE:LINE`` for a row read by ``load_split``, else "example"."""
    line = getattr(row, "line", 0)
    return f"{row.file}:{line}" if line else "example"


def _listed(problems: list[str], noun: str) -> list[str]:
    """The first MAX_LISTED problems, plus "and N more NOUN" for the rest."""
    rest = len(problems) - MAX_LISTED
    return problems[:MAX_LISTED] + ([f"and {rest} more {noun}"] if rest > 0 else [])


# --- reading ------------------------------------------------------------------------------------------

_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def _split_file(path: Path, split: str) -> Optional[Path]:
    """The file holding ``split`` under a data path, or None when that split is absent."""
    if path.is_dir():
        f = path / f"{split}.jsonl"
        return f if f.is_file() else None
    if path.suffix != ".jsonl":
        raise Phi3MLXError(f"{path}: expected a folder with train.jsonl/valid.jsonl/test.jsonl or a .jsonl file")
    return path if split == "train" else None


def _read_jsonl(f: Path) -> list[dict]:
    """Every non-blank line of a JSONL file as a Row; all bad lines are reported in one error."""
    rows, problems = [], []
    for n, raw in enumerate(f.read_bytes().split(b"\n"), 1):
        try:
            text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            problems.append(f"{f}:{n}: not valid UTF-8 (byte {e.start + 1})")
            continue
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(f"{f}:{n}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(value, dict):
            problems.append(f"{f}:{n}: expected a JSON object, got {_JSON_TYPES.get(type(value), 'a value')}")
            continue
        row = Row(value)
        row.file, row.line = str(f), n
        rows.append(row)
    if problems:
        raise Phi3MLXError.many(_listed(problems, "bad lines"))
    if not rows:
        raise Phi3MLXError(f"{f}: no examples")
    return rows


def load_split(path: Union[str, Path], split: str, required: bool = True) -> list[dict]:
    """The rows of one split (``train``, ``valid``, ``test``) of a data path.

    ``path`` is a folder holding ``{split}.jsonl`` files, or one ``.jsonl`` file: the train split (its
    other splits are absent). Blank lines are skipped. Each row is a dict (a ``Row``: it also has
    ``file`` and ``line`` attributes, used in error messages). An absent split gives ``[]`` unless
    ``required``; a missing path, a missing required split, an empty file, a line that is not JSON or
    not an object is a ``Phi3MLXError``.
    """
    path = Path(path)
    if not path.exists():
        raise Phi3MLXError(f"data path {path} does not exist")
    f = _split_file(path, split)
    if f is None:
        if not required:
            return []
        if path.is_dir():
            raise Phi3MLXError(f"no {split}.jsonl in {path}")
        raise Phi3MLXError(f"{path} is one file, used as the train split; for a {split} split give a folder "
                           f"with train.jsonl and {split}.jsonl")
    return _read_jsonl(f)


# --- formats ------------------------------------------------------------------------------------------


def _guess(row: dict) -> Optional[str]:
    """The format a row's keys point to, or None."""
    if "messages" in row:
        return "chat"
    if "preferred_output" in row or "non_preferred_output" in row:
        return "openai_preference"
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "prompt" in row or "completion" in row:
        return "completion"
    if "text" in row:
        return "text"
    return None


def _message_problem(value, key: str, assistant_only: bool = False) -> Optional[str]:
    """Why ``value`` is not a non-empty list of {role, content} messages (string values), else None."""
    if not isinstance(value, list) or not value:
        return f"'{key}' is not a non-empty list of messages"
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return f"'{key}[{i}]' is not a message with string 'role' and 'content'"
        if assistant_only and m["role"] != "assistant":
            return f"'{key}[{i}]' has role '{m['role']}' (responses are assistant messages)"
    return None


def _text_or_messages(row: dict, key: str, assistant_only: bool) -> Optional[str]:
    value = row[key]
    return None if isinstance(value, str) else _message_problem(value, key, assistant_only)


def _value_problem(row: dict, fmt: str) -> Optional[str]:
    """What is wrong with the values of a row that has ``fmt``'s keys, else None."""
    if fmt in ("text", "completion"):
        bad = [k for k in REQUIRED_KEYS[fmt] if not isinstance(row[k], str)]
        return f"'{bad[0]}' is not a string" if bad else None
    if fmt == "chat":
        problem = _message_problem(row["messages"], "messages")
        if problem is None and not any(m["role"] == "assistant" for m in row["messages"]):
            problem = "no assistant message in 'messages'"
        return problem
    if fmt == "preference":
        return (_text_or_messages(row, "prompt", False) or _text_or_messages(row, "chosen", True)
                or _text_or_messages(row, "rejected", True))
    inp = row["input"]
    if not isinstance(inp, dict) or "messages" not in inp:
        return "'input' is not an object with 'messages'"
    return (_message_problem(inp["messages"], "input.messages")
            or _message_problem(row["preferred_output"], "preferred_output", True)
            or _message_problem(row["non_preferred_output"], "non_preferred_output", True))


def _row_problem(row: dict, fmt: str) -> Optional[str]:
    """Why a row does not fit ``fmt`` (missing keys first, then bad values), else None."""
    missing = [k for k in REQUIRED_KEYS[fmt] if k not in row]
    if missing:
        guess = _guess(row)
        looks = f"a {guess} row, " if guess and guess != fmt else ""
        return f"{looks}missing " + ", ".join(f"'{k}'" for k in missing)
    return _value_problem(row, fmt)


def detect_format(rows: Sequence[dict], path: Union[str, Path]) -> str:
    """The one format of a file's rows: "text", "completion", "chat", "preference" or "openai_preference".

    The format is the one most rows' keys point to (ties: the earliest). Every row must fit it: rows
    that lack its keys or hold values of the wrong type are all reported in one ``Phi3MLXError``
    naming ``path``, their line numbers (rows from ``load_split``; else their 1-based index) and keys.
    """
    if not rows:
        raise Phi3MLXError(f"{path}: no examples")
    guesses = [_guess(r) for r in rows]
    counts = {g: guesses.count(g) for g in guesses if g is not None}
    if not counts:
        keys = ", ".join(f"'{k}'" for k in list(rows[0])[:8]) or "none"
        raise Phi3MLXError(
            f"{path}: unknown data format (first row's keys: {keys}); expected 'text', 'prompt'+'completion', "
            "'messages', 'prompt'+'chosen'+'rejected' or 'input'+'preferred_output'+'non_preferred_output'")
    fmt = max(counts, key=lambda g: (counts[g], -guesses.index(g)))
    problems = []
    for i, row in enumerate(rows):
        problem = _row_problem(row, fmt)
        if problem:
            problems.append(f"line {getattr(row, 'line', 0) or i + 1}: {problem}")
    if problems:
        keys = ", ".join(REQUIRED_KEYS[fmt])
        raise Phi3MLXError.many(_listed(problems, "rows"),
                                prefix=f"{path}: {len(problems)} of {len(rows)} rows do not fit the {fmt} "
                                       f"format ({keys}): ")
    return fmt


# --- encoding -----------------------------------------------------------------------------------------


def _render(tokenizer: BaseTokenizer, messages: Messages, add_generation_prompt: bool, where: str,
            tools=None) -> list[int]:
    """The chat template's token ids for ``messages``; a template failure is a Phi3MLXError."""
    kw = {"tools": tools} if tools is not None else {}
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, **kw)
    except Exception as e:  # jinja errors, raise_exception() in the template, bad message values
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise Phi3MLXError(f"{where}: the chat template failed ({type(e).__name__}: {msg})") from None
    return [int(i) for i in ids]


def _unstable(where: str, k: int) -> Phi3MLXError:
    return Phi3MLXError(f"{where}: the chat template does not tokenize prefix-stably (the conversation up to "
                        f"message {k} is not a prefix of the whole), so its assistant tokens cannot be found")


def _assistant_mask(messages: Messages, tokenizer: BaseTokenizer, where: str, tools=None, render=None) -> SFTExample:
    """The rendered conversation (N ids) and a mask (N) that is 1 on every assistant turn.

    A turn is found by rendering progressively: it starts after the conversation before it rendered
    with the generation prompt, and ends where the conversation through it rendered closed
    (``add_generation_prompt=False``, e.g. a trailing eos) and open (with the generation prompt) part:
    the content and its end token (``<|end|>``), not what closes the whole conversation. Each partial
    rendering must be a token prefix of the full one. ``render(messages, add_generation_prompt)``
    replaces the template's own tokenization (the vision models' image positions).
    """
    render = render or (lambda m, gen: _render(tokenizer, m, gen, where, tools))
    full = render(messages, False)
    mask = [0] * len(full)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:k], True)
        closed = render(messages[: k + 1], False)
        opened = render(messages[: k + 1], True)
        end = common_prefix(closed, opened)
        if full[: len(before)] != before or full[:end] != closed[:end] or end <= len(before):
            raise _unstable(where, k)
        mask[len(before) : end] = [1] * (end - len(before))
    return full, mask


def encode_sft(row: dict, fmt: str, tokenizer: BaseTokenizer, mask_prompt: bool = False) -> SFTExample:
    """A row of a text/completion/chat file as ``(ids, mask)``, two lists of length N.

    ``mask[i] = 1`` when token i is a target the loss counts.

    * text: ``tokenizer.encode`` (bos as the tokenizer adds it) plus eos if the tokenizer has one and it
      is not already last; every token is a target.
    * completion: the prompt as a user message and the completion as the assistant message, through
      the chat template; targets are the completion and its end token when ``mask_prompt``, else all.
    * chat: the chat template's rendering; targets are the assistant turns (content + end token) only,
      whatever ``mask_prompt``.
    """
    where = _where(row)
    if fmt == "text":
        ids = tokenizer.encode(row["text"])
        eos = tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(int(eos))
        return ids, [1] * len(ids)
    if fmt == "completion":
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
        if not mask_prompt:
            ids = _render(tokenizer, messages, False, where)
            return ids, [1] * len(ids)
        return _assistant_mask(messages, tokenizer, where)
    if fmt == "chat":
        return _assistant_mask(row["messages"], tokenizer, where, row.get("tools"))
    if fmt in PREFERENCE_FORMATS:
        raise Phi3MLXError(f"{where}: {fmt} data is for preference training, not supervised fine-tuning")
    raise Phi3MLXError(f"unknown data format {fmt!r} (expected one of {', '.join(SFT_FORMATS)})")


# --- image rows (vision models) -------------------------------------------------------------------


def image_paths(row: dict, base: Path) -> tuple[list[Path], Optional[str]]:
    """The row's ``images`` as paths (relative ones from the data file's folder), or a problem."""
    images = row.get("images")
    if images is None:
        return [], None
    if not isinstance(images, list) or not all(isinstance(x, str) and x for x in images):
        return [], "'images' is not a list of image paths"
    paths = [Path(x).expanduser() if Path(x).expanduser().is_absolute() else base / x for x in images]
    missing = [str(p) for p in paths if not p.is_file()]
    return paths, (f"image(s) not found: {', '.join(missing)}" if missing else None)


def image_problems(rows: Sequence[dict]) -> list[str]:
    """Every row whose images are not a list of existing files (checked before the model loads)."""
    problems = []
    for row in rows:
        _, problem = image_paths(row, Path(getattr(row, "file", ".") or ".").parent)
        if problem:
            problems.append(f"{_where(row)}: {problem}")
    return problems


class ImageTable:
    """The vision tower's rows of every image in a data set, computed once (the tower is frozen).

    Image k (1-based, one per distinct file) stands in the encoded ids as -k at each of its positions;
    ``rows_for`` gives the rows for a batch's negative ids (row-major, as the decoder takes them)."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.keys: dict[str, int] = {}
        self.rows: list[mx.array] = []

    def add(self, path: Path) -> int:
        key = str(Path(path).resolve())
        if key not in self.keys:
            batch = self.processor.preprocess([path])
            rows = self.model.encode_images(batch.pixel_values, batch.image_sizes)[0]
            mx.eval(rows)
            self.rows.append(rows)
            self.keys[key] = len(self.rows)
        return self.keys[key]

    def rows_for(self, inputs: np.ndarray) -> Optional[mx.array]:
        """(n, hidden) for the negative ids of ``inputs`` (B, L): each run of -k takes image k's rows
        from the start (a sequence cut at the end keeps the first rows of a cut image)."""
        parts = []
        for row in np.asarray(inputs):
            neg = np.nonzero(row < 0)[0]
            if not len(neg):
                continue
            starts = [0] + [i for i in range(1, len(neg)) if neg[i] != neg[i - 1] + 1 or row[neg[i]] != row[neg[i - 1]]]
            for a, b in zip(starts, starts[1:] + [len(neg)]):
                parts.append(self.rows[-int(row[neg[a]]) - 1][: b - a])
        return mx.concatenate(parts, axis=0) if parts else None


def encode_sft_images(row: dict, processor, table: ImageTable) -> SFTExample:
    """A chat row with ``images`` for a vision model: ``(ids, mask)`` with image k's positions -k.

    Placeholders ``<|image_N|>`` in the messages name the row's images (N = 1.. in the order given);
    a row without any gets them before the first user message's text. The assistant turns are the
    targets, found as ``encode_sft`` finds them."""
    where = _where(row)
    paths, problem = image_paths(row, Path(getattr(row, "file", ".") or ".").parent)
    if problem:
        raise Phi3MLXError(f"{where}: {problem}")
    messages = [dict(m) for m in row["messages"]]
    if paths and not any(IMAGE_TAG.search(m["content"]) for m in messages):
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise Phi3MLXError(f"{where}: images but no user message to carry them")
        first["content"] = "".join(f"<|image_{i}|>\n" for i in range(1, len(paths) + 1)) + first["content"]
    keys = [table.add(p) for p in paths]
    counts = [table.rows[k - 1].shape[0] for k in keys]

    def render(msgs: Messages, gen: bool) -> list[int]:
        text = processor.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
        n = len(IMAGE_TAG.findall(text))  # a prefix of the conversation holds the first n images
        try:
            ids = processor.tokenize(text, counts[:n])
        except Phi3MLXError as e:
            raise Phi3MLXError(f"{where}: {e} (placeholders must appear in order, each once)") from None
        return keyed_ids(ids, keys)

    return _assistant_mask(messages, processor, where, render=render)


def _preference_parts(row: dict, fmt: str) -> tuple[Messages, Messages, Messages, Optional[list]]:
    """(prompt messages, chosen messages, rejected messages, tools) of a preference row."""
    if fmt == "openai_preference":
        inp = row["input"]
        return inp["messages"], row["preferred_output"], row["non_preferred_output"], inp.get("tools")

    def as_messages(value, role: str) -> Messages:
        return [{"role": role, "content": value}] if isinstance(value, str) else value

    return (as_messages(row["prompt"], "user"), as_messages(row["chosen"], "assistant"),
            as_messages(row["rejected"], "assistant"), row.get("tools"))


def encode_preference(row: dict, fmt: str, tokenizer: BaseTokenizer) -> PreferenceExample:
    """A row of a preference/openai_preference file as ``(prompt_ids, chosen_ids, rejected_ids)``.

    ``prompt_ids`` is the prompt messages rendered with the generation prompt; ``chosen_ids`` the rest
    of the chosen conversation rendered closed (responses, their end tokens and whatever the template
    closes a conversation with), so ``prompt_ids + chosen_ids`` is the full chosen conversation.
    Likewise for ``rejected_ids``.
    """
    where = _where(row)
    if fmt not in PREFERENCE_FORMATS:
        raise Phi3MLXError(f"{where}: {fmt} data has no chosen/rejected responses; preference training "
                           f"needs the {' or '.join(PREFERENCE_FORMATS)} format")
    prompt, chosen, rejected, tools = _preference_parts(row, fmt)
    prompt_ids = _render(tokenizer, prompt, True, where, tools)

    def response(messages: Messages) -> list[int]:
        full = _render(tokenizer, prompt + messages, False, where, tools)
        if full[: len(prompt_ids)] != prompt_ids or len(full) == len(prompt_ids):
            raise _unstable(where, len(prompt))
        return full[len(prompt_ids) :]

    return prompt_ids, response(chosen), response(rejected)


# --- batching -----------------------------------------------------------------------------------------


def _length(example: Sequence[list[int]]) -> int:
    """Tokens in the longest sequence an example becomes: ids, or prompt + the longer response."""
    if len(example) == 3:
        return len(example[0]) + max(len(example[1]), len(example[2]))
    return len(example[0])


def count_truncated(examples: Sequence[Sequence[list[int]]], max_seq_length: int) -> int:
    """How many examples batching truncates: more than ``max_seq_length + 1`` tokens.

    Takes SFT examples ``(ids, mask)`` or preference examples ``(prompt, chosen, rejected)`` (prompt plus
    the longer response). Packed text is never truncated.
    """
    return sum(1 for e in examples if _length(e) > max_seq_length + 1)


def truncation_warning(examples: Sequence[Sequence[list[int]]], max_seq_length: int) -> Optional[str]:
    """One summary line about truncated examples (see ``count_truncated``), or None when there are none."""
    n = count_truncated(examples, max_seq_length)
    if not n:
        return None
    return (f"{n} of {len(examples)} examples longer than {max_seq_length + 1} tokens "
            f"(max_seq_length {max_seq_length} + 1) are truncated")


def summarize(examples: Sequence[Sequence[list[int]]]) -> dict:
    """Sizes for progress/info lines: n, tokens, targets, max_length and mean_length.

    SFT examples: tokens = sum of len(ids), targets = masked-in targets. Preference examples:
    tokens = prompt + chosen + rejected, targets = response tokens. max_length/mean_length are of the
    longest sequence per example (ids, or prompt + the longer response).
    """
    lengths = [_length(e) for e in examples]
    if examples and len(examples[0]) == 3:
        tokens = sum(len(p) + len(c) + len(r) for p, c, r in examples)
        targets = sum(len(c) + len(r) for _, c, r in examples)
    else:
        tokens = sum(len(ids) for ids, _ in examples)
        targets = sum(int(sum(mask[1:])) for _, mask in examples)
    return {"n": len(examples), "tokens": tokens, "targets": targets, "max_length": max(lengths, default=0),
            "mean_length": sum(lengths) / len(lengths) if lengths else 0.0}


def _check_sizes(batch_size: int, max_seq_length: int) -> None:
    problems = [f"batch size must be at least 1, got {batch_size}" if batch_size < 1 else "",
                f"max_seq_length must be at least 1, got {max_seq_length}" if max_seq_length < 1 else ""]
    if any(problems):
        raise Phi3MLXError.many(problems)


def _pad(seqs: Sequence[SFTExample], width: Optional[int] = None) -> Batch:
    """Shift and right-pad ``(ids, mask)`` sequences: inputs, targets (B, L) int32, loss_mask (B, L) float32.

    L is ``width``, else the longest sequence minus one (at least 1). Padding is 0 with mask 0.
    """
    width = width or max(1, max(len(ids) for ids, _ in seqs) - 1)
    inputs = np.zeros((len(seqs), width), np.int32)
    targets = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), np.float32)
    for r, (ids, m) in enumerate(seqs):
        n = len(ids) - 1
        if n > 0:
            inputs[r, :n], targets[r, :n], mask[r, :n] = ids[:-1], ids[1:], m[1:]
    return mx.array(inputs), mx.array(targets), mx.array(mask)


def _batch_plan(lengths: Sequence[int], batch_size: int, by_length: bool = True, seed: int = 0) -> list[list[int]]:
    """Example indices sorted by length (stable), or in a random order from ``default_rng(seed)``, cut
    into batches; the last may be smaller."""
    if by_length:
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    else:
        order = [int(i) for i in np.random.default_rng(seed).permutation(len(lengths))]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _epochs(plan: list[list[int]], shuffle: bool, seed: int, loop: bool) -> Iterator[list[int]]:
    """The plan's batches, each epoch in a new order from ``default_rng(seed)`` (or in order)."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(plan)) if shuffle else range(len(plan))
        for b in order:
            yield plan[b]
        if not loop:
            return


def _pack(examples: Sequence[SFTExample], max_seq_length: int) -> list[SFTExample]:
    """All examples concatenated (in order) and cut into windows of ``max_seq_length + 1`` tokens.

    Windows start every ``max_seq_length`` tokens, so consecutive windows share one token and every
    token after the first is a target exactly once; the last window may be shorter (at least 2 tokens).
    """
    ids = [t for e in examples for t in e[0]]
    mask = [m for e in examples for m in e[1]]
    return [(ids[s : s + max_seq_length + 1], mask[s : s + max_seq_length + 1])
            for s in range(0, len(ids) - 1, max_seq_length)]


def sequence_count(examples: Sequence[SFTExample], max_seq_length: int, pack: bool = False) -> int:
    """How many sequences ``iterate_batches`` cuts an epoch's batches from (the windows, with ``pack``)."""
    return len(_pack(examples, max_seq_length)) if pack else len(examples)


def iterate_batches(examples: Sequence[SFTExample], batch_size: int, max_seq_length: int, *, shuffle: bool = True,
                    seed: int = 0, loop: bool = False, pack: bool = False, by_length: bool = True) -> Iterator[Batch]:
    """SFT batches ``(inputs (B, L) int32, targets (B, L) int32, loss_mask (B, L) float32)``.

    Examples are ``(ids, mask)`` (see ``encode_sft``), cut to ``max_seq_length + 1`` tokens (so
    L <= max_seq_length), sorted by length and grouped ``batch_size`` at a time (the last batch of an
    epoch may be smaller); each epoch yields every example once, in batch order shuffled by
    ``numpy.random.default_rng(seed)`` (deterministic; a new order each epoch). ``loop`` repeats
    epochs forever. ``by_length`` False: batches of randomly drawn examples instead of length-sorted
    ones (short examples of several kinds then share a batch rather than each filling batches of its
    own). ``pack`` first concatenates the examples into ``max_seq_length + 1`` windows
    (see ``_pack``; meant for text). Fewer examples (or windows) than ``batch_size`` is a Phi3MLXError,
    raised at the call.
    """
    _check_sizes(batch_size, max_seq_length)
    if pack:
        seqs = _pack(examples, max_seq_length)
        if len(seqs) < batch_size:
            raise Phi3MLXError(f"packing gives {len(seqs)} sequences of {max_seq_length + 1} tokens, fewer than "
                               f"the batch size {batch_size}")
    else:
        seqs = [(list(ids[: max_seq_length + 1]), list(mask[: max_seq_length + 1])) for ids, mask in examples]
        if len(seqs) < batch_size:
            raise Phi3MLXError(f"{len(seqs)} examples are fewer than the batch size {batch_size}")
    plan = _batch_plan([len(ids) for ids, _ in seqs], batch_size, by_length, seed)

    def batches() -> Iterator[Batch]:
        for idx in _epochs(plan, shuffle, seed, loop):
            yield _pad([seqs[i] for i in idx])

    return batches()


def truncate_preference(prompt: list[int], chosen: list[int], rejected: list[int],
                        max_seq_length: int) -> PreferenceExample:
    """Cut a preference example so prompt + each response fits ``T = max_seq_length + 1`` tokens.

    The rule: both responses keep their start and share one prompt tail. If prompt + the longer
    response R fits, nothing changes. Else the responses get ``min(R, max(T // 2, T - len(prompt)))``
    tokens of room (the prompt is cut first, from its left, down to half the budget) and the prompt
    keeps its last ``T - room`` tokens (all of it when shorter); each response keeps its first
    ``T - len(kept prompt)`` tokens.
    """
    total = max_seq_length + 1
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= total:
        return prompt, chosen, rejected
    room = min(longest, max(total // 2, total - len(prompt)))
    kept = prompt[len(prompt) - min(len(prompt), total - room) :]
    room = total - len(kept)
    return kept, chosen[:room], rejected[:room]


def iterate_preference_batches(examples: Sequence[PreferenceExample], batch_size: int, max_seq_length: int, *,
                               shuffle: bool = True, seed: int = 0, loop: bool = False) -> Iterator[dict]:
    """Preference batches ``{"chosen": (inputs, targets, loss_mask), "rejected": (...)}``.

    Examples are ``(prompt, chosen, rejected)`` ids (see ``encode_preference``), cut by
    ``truncate_preference``. Each side is prompt + response with the loss mask on the response tokens
    only; both sides are (B, L) with the same L (the longest of the two, minus one). Sorting,
    shuffling, ``loop`` and the batch-size check are as in ``iterate_batches``.
    """
    _check_sizes(batch_size, max_seq_length)
    if len(examples) < batch_size:
        raise Phi3MLXError(f"{len(examples)} preference examples are fewer than the batch size {batch_size}")
    cut = [truncate_preference(list(p), list(c), list(r), max_seq_length) for p, c, r in examples]
    plan = _batch_plan([_length(e) for e in cut], batch_size)

    def side(prompt: list[int], response: list[int]) -> SFTExample:
        return prompt + response, [0] * len(prompt) + [1] * len(response)

    def batches() -> Iterator[dict]:
        for idx in _epochs(plan, shuffle, seed, loop):
            chosen = [side(cut[i][0], cut[i][1]) for i in idx]
            rejected = [side(cut[i][0], cut[i][2]) for i in idx]
            width = max(1, max(len(ids) for ids, _ in chosen + rejected) - 1)
            yield {"chosen": _pad(chosen, width), "rejected": _pad(rejected, width)}

    return batches()
