"""The tokenizer interface: encode/decode, chat template, stop ids and a streaming detokenizer.

Two back ends behind one interface (``BaseTokenizer``):

* ``Tokenizer``: Phi-3 text checkpoints ship ``tokenizer.json`` (and/or ``tokenizer.model``); we load
  them through the ``transformers`` tokenizer classes so ids equal ``AutoTokenizer`` on the same folder.
* ``TiktokenTokenizer``: Phi-3-small ships ``cl100k_base.tiktoken`` (tiktoken's cl100k_base BPE ranks)
  plus remote code (``tokenization_phi3_small.py``) that adds special tokens. We rebuild the same
  ``tiktoken.Encoding`` offline from the folder's ``*.tiktoken`` file and the special tokens below; the
  remote code is not needed and tiktoken never downloads anything.

``load_tokenizer(path, config)`` picks the back end (see its docstring).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Iterable, Optional

from .errors import Phi3MLXError

# The Phi-3 instruct format, used when a folder ships no chat template.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Phi-3 end tokens that stop generation whatever the config says.
PHI3_STOP_TOKENS = ("<|end|>", "<|endoftext|>")

# --- Phi-3-small (tiktoken) -------------------------------------------------------------------------
# The Phi-3-small instruct format (its tokenizer_config.json ``chat_template``, same text: jinja sees
# the ``\n`` escapes), used when a folder ships no chat template. bos_token = eos_token = "<|endoftext|>".
PHI3_SMALL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{'<|' + message['role'] + '|>' + '\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# tiktoken's cl100k_base split pattern (as in tiktoken >= 0.7, tiktoken_ext/openai_public.py). Written
# here so that nothing is ever fetched: we never call ``tiktoken.get_encoding``.
CL100K_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
CL100K_RANKS = 100256  # ordinary BPE tokens 0..100255 in cl100k_base.tiktoken
PHI3_SMALL_VOCAB_SIZE = 100352  # the config's padded vocab_size; every id below it has a name


def _phi3_small_special_tokens() -> dict:
    """Special tokens of Phi-3-small, named as Microsoft's ``tokenization_phi3_small.py`` names them.

    Real tokens: ``<|endoftext|>`` 100257 (bos = eos), fim 100258-100260, ``<|system|>`` 100261,
    ``<|user|>`` 100262, ``<|assistant|>`` 100263, ``<|end|>`` 100266, ``<|endofprompt|>`` 100276.
    Unused ids are padding "dummies" with this numbering: ``<|dummy_id_0|>`` 100264,
    ``<|dummy_id_1|>`` 100265, ``<|dummy_id_2|>`` 100256, ``<|dummy_id_3..11|>`` 100267-100275, then
    ``<|dummy_id_N|>`` = 100265 + N for ids 100277-100351 (N = 12..86).
    """
    tokens = {
        "<|endoftext|>": 100257,
        "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260,
        "<|system|>": 100261,
        "<|user|>": 100262,
        "<|assistant|>": 100263,
        "<|end|>": 100266,
        "<|endofprompt|>": 100276,
    }
    dummies = [100264, 100265, 100256, *range(100267, 100276), *range(100277, PHI3_SMALL_VOCAB_SIZE)]
    tokens.update({f"<|dummy_id_{n}|>": i for n, i in enumerate(dummies)})
    return tokens


PHI3_SMALL_SPECIAL_TOKENS = _phi3_small_special_tokens()
# Stop ids of Phi-3-small whatever the config says: <|endoftext|> and <|end|>.
PHI3_SMALL_STOP_TOKENS = ("<|endoftext|>", "<|end|>")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
    "preprocessor_config.json",  # the vision models' image settings (num_crops, mean, std)
    "processor_config.json",
)
# Tokenizer files known by pattern: Phi-3-small's BPE ranks (cl100k_base.tiktoken). Its remote
# ``tokenization_phi3_small.py`` is not needed by us and is not copied.
TOKENIZER_GLOBS = ("*.tiktoken",)
TIKTOKEN_FILE = "cl100k_base.tiktoken"


def utf8_problem(text: str, what: str = "the text") -> Optional[str]:
    """Why ``text`` is not valid Unicode text (one line naming the first bad byte and where), else None.

    Bytes that are not valid UTF-8 reach Python as lone surrogates: U+DC80..U+DCFF stand for the bytes
    0x80..0xFF in command-line arguments and in streams read with ``errors="surrogateescape"``.
    """
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        bad = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"lone surrogate U+{c:04X}"
        return f"{what} is not valid UTF-8 ({bad} at character {e.start})"


def check_text(text: str, what: str = "the text") -> None:
    """Raise ``Phi3MLXError`` if ``text`` cannot be tokenized (see ``utf8_problem``)."""
    problem = utf8_problem(text, what) if isinstance(text, str) else None
    if problem:
        raise Phi3MLXError(problem)


def _check_messages(messages) -> None:
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            check_text(content, f"message {i + 1} ({m.get('role', '?')})")


class _NoTorchNotice(logging.Filter):
    """Drops transformers' import-time "PyTorch was not found" advice: only its tokenizers are used here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "PyTorch was not found" not in record.getMessage()


def _import_transformers():
    """``transformers``, imported without its notice about a missing torch, its own logging at ERROR."""
    log = logging.getLogger("transformers")
    if not any(isinstance(f, _NoTorchNotice) for f in log.filters):
        log.addFilter(_NoTorchNotice())
    import transformers

    log.setLevel(logging.ERROR)  # after the import: transformers sets its level when it first logs
    return transformers


def tokenizer_files(folder: Path) -> list[str]:
    """Names of the tokenizer files present in ``folder`` (TOKENIZER_FILES, then TOKENIZER_GLOBS)."""
    folder = Path(folder)
    names = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
    for pattern in TOKENIZER_GLOBS:
        names += sorted(f.name for f in folder.glob(pattern) if f.is_file() and f.name not in names)
    return names


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files (TOKENIZER_FILES and *.tiktoken) so the new folder works offline."""
    copied = []
    for name in tokenizer_files(src):
        shutil.copy2(Path(src) / name, Path(dst) / name)
        copied.append(name)
    return copied


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds a vocabulary file we can load (tokenizer.json/.model or *.tiktoken)."""
    names = tokenizer_files(folder)
    return any(n in names for n in ("tokenizer.json", "tokenizer.model")) or any(n.endswith(".tiktoken") for n in names)


def missing_tokenizer(folder: Path, model_type: Optional[str] = None) -> Optional[str]:
    """Why ``load_tokenizer`` would find no vocabulary in ``folder`` for this model_type (a one-line
    message), else None. Same rules as ``load_tokenizer``: a phi3small folder needs its *.tiktoken file
    (or a converted tokenizer.json); other folders tokenizer.json, tokenizer.model or a *.tiktoken file."""
    folder = Path(folder)
    names = tokenizer_files(folder)
    tiktoken_file = any(n.endswith(".tiktoken") for n in names)
    if model_type == "phi3small":
        if tiktoken_file or "tokenizer.json" in names:
            return None
        return f"no {TIKTOKEN_FILE} in {folder} (phi3small folders need their tiktoken file)"
    if tiktoken_file or "tokenizer.json" in names or "tokenizer.model" in names:
        return None
    return f"no tokenizer in {folder}: expected tokenizer.json, tokenizer.model or {TIKTOKEN_FILE}"


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a sentencepiece byte-fallback piece


class StreamingDetokenizer:
    """Turns a growing list of ids into text pieces whose concatenation is ``decode(all ids)``.

    A piece is emitted only once the text decoded so far is stable: it does not end in an incomplete
    UTF-8 sequence (U+FFFD) and a little context before the new ids is decoded with them, so that
    leading spaces and byte-fallback pieces come out right.
    """

    def __init__(self, tokenizer: "BaseTokenizer"):
        self._decode = tokenizer.decode
        self.reset()

    def reset(self):
        self.ids: list[int] = []
        self._prefix = 0  # start of the context decoded with the new ids
        self._read = 0  # ids up to here have been emitted
        self.text = ""

    def add(self, token: int) -> str:
        """Add one id; return the newly stable text (possibly "")."""
        self.ids.append(int(token))
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            piece = new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += piece
            return piece
        return ""

    def finalize(self) -> str:
        """Flush whatever is left (e.g. an incomplete byte sequence at the very end)."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        piece = new_text[len(prefix_text) :]
        self._prefix = self._read = len(self.ids)
        self.text += piece
        return piece


class BaseTokenizer:
    """What generate/chat/cli use: every back end has these methods and properties.

    ``encode(text, add_special_tokens=True)``, ``decode(ids, skip_special_tokens=False)``,
    ``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``,
    ``convert_tokens_to_ids(token)``, ``eos_token_id``, ``bos_token_id``, ``vocab_size``, ``stop_ids``
    (a set), ``detokenizer()`` and ``save(folder)``.
    """

    def __init__(self, stop_ids: Iterable[int]):
        self.stop_ids = set(int(i) for i in stop_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kw):
        raise NotImplementedError

    def convert_tokens_to_ids(self, token):
        raise NotImplementedError

    @property
    def eos_token_id(self) -> Optional[int]:
        raise NotImplementedError

    @property
    def bos_token_id(self) -> Optional[int]:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)

    def token_bytes(self, token: int) -> bytes:
        """The UTF-8 bytes one token stands for, its leading space included; a text's tokens' bytes join
        to the text's bytes. The back ends override this where a token can be part of a character (a
        sentencepiece byte-fallback token is its one raw byte); this default decodes the token alone."""
        return self.decode([int(token)]).encode("utf-8")

    def save(self, folder: Path):
        raise NotImplementedError


class Tokenizer(BaseTokenizer):
    """A transformers tokenizer (tokenizer.json / tokenizer.model) behind the common interface."""

    def __init__(self, hf_tokenizer, stop_ids: Iterable[int]):
        super().__init__(stop_ids)
        self._tok = hf_tokenizer
        # a fast tokenizer's Rust decoder: what transformers' decode calls without space clean-up, minus
        # its per-call Python overhead (a streaming detokenizer decodes twice per generated token)
        self._backend = getattr(hf_tokenizer, "backend_tokenizer", None)

    # the transformers-compatible surface -------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_text(text)
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if self._backend is not None:
            return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kw):
        _check_messages(messages)
        out = self._tok.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=tokenize, **kw
        )
        if tokenize and hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
            out = out["input_ids"]
        return list(out) if tokenize else out

    def convert_tokens_to_ids(self, token):
        return self._tok.convert_tokens_to_ids(token)

    def token_bytes(self, token: int) -> bytes:
        # from the piece, not decode([token]): a sentencepiece decode drops the leading space of "▁word"
        piece = self._tok.convert_ids_to_tokens(int(token)) or ""
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        if "\u2581" in piece and piece not in self._added:  # an added token's text is literal
            return piece.replace("\u2581", " ").encode("utf-8")
        return super().token_bytes(token)

    @functools.cached_property
    def _added(self) -> frozenset:
        return frozenset(self._tok.get_added_vocab())

    @property
    def eos_token_id(self) -> Optional[int]:
        return self._tok.eos_token_id

    @property
    def bos_token_id(self) -> Optional[int]:
        return self._tok.bos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def hf(self):
        """The underlying transformers tokenizer."""
        return self._tok

    def save(self, folder: Path):
        self._tok.save_pretrained(str(folder))


def _token_content(v) -> Optional[str]:
    """A token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _compile_chat_template(source: str):
    """A chat template compiled as transformers compiles it (sandboxed jinja2, trim/lstrip blocks)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


class TiktokenTokenizer(BaseTokenizer):
    """Phi-3-small: tiktoken cl100k_base ranks plus Phi-3-small's special tokens.

    Same ids as Microsoft's remote ``Phi3SmallTokenizer`` (trust_remote_code), with these choices:

    * ``encode`` recognises every special token written in the text (``<|user|>``, ``<|end|>``, ...),
      as the remote code does (``allowed_special="all"``): the chat template renders them as text.
      So user text that contains ``<|endoftext|>`` becomes the special id, like in transformers.
    * ``add_special_tokens`` adds nothing: the remote tokenizer adds no bos/eos on encode. The bos
      (``<|endoftext|>`` = 100257, the same id as eos) comes from the chat template's ``{{ bos_token }}``.
    * ``decode`` uses ``errors="replace"``: an incomplete UTF-8 sequence (a character split across
      tokens) comes out as U+FFFD, which the StreamingDetokenizer waits on.
      ``skip_special_tokens`` drops every special id (>= 100256, dummies included).
    * ``vocab_size`` is the tiktoken size, 100352 with all dummies named: equal to the config's padded
      vocab_size (100352); only ids 0..100255 and the nine real special tokens mean anything.
    * ``convert_tokens_to_ids`` takes special-token names, or ordinary tokens as bytes or str (their
      UTF-8 bytes); an unknown token gives None (there is no unk token).
    """

    def __init__(self, encoding, stop_ids: Iterable[int], chat_template: str, bos_token: str, eos_token: str,
                 bpe_file: Optional[Path] = None, tokenizer_config: Optional[dict] = None):
        super().__init__(stop_ids)
        self._enc = encoding
        self._special = dict(encoding._special_tokens)
        self._special_ids = set(self._special.values())
        self.chat_template = chat_template
        self._template = _compile_chat_template(chat_template)
        self.bos_token, self.eos_token = bos_token, eos_token
        self._bpe_file = Path(bpe_file) if bpe_file else None
        self._config = dict(tokenizer_config or {})

    @property
    def encoding(self):
        """The underlying ``tiktoken.Encoding``."""
        return self._enc

    @property
    def special_tokens(self) -> dict:
        return dict(self._special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_text(text)  # tiktoken would silently replace the bad bytes
        return self._enc.encode(text, allowed_special="all", disallowed_special=())

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        n = self._enc.n_vocab
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for this tokenizer (0..{n - 1})")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._enc.decode(ids, errors="replace")

    def token_bytes(self, token: int) -> bytes:
        self.decode([token])  # its range check
        return self._enc.decode_single_token_bytes(int(token))

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kw):
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **kw}
        text = self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def convert_tokens_to_ids(self, token):
        if isinstance(token, (list, tuple)):
            return [self.convert_tokens_to_ids(t) for t in token]
        if isinstance(token, str) and token in self._special:
            return self._special[token]
        b = token.encode("utf-8") if isinstance(token, str) else bytes(token)
        try:
            return self._enc.encode_single_token(b)
        except KeyError:
            return None

    @property
    def eos_token_id(self) -> Optional[int]:
        return self._special.get(self.eos_token)

    @property
    def bos_token_id(self) -> Optional[int]:
        return self._special.get(self.bos_token)

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    def save(self, folder: Path):
        """Write the BPE file and a tokenizer_config.json (the source one, with the chat template)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        name = self._bpe_file.name if self._bpe_file else TIKTOKEN_FILE
        target = folder / name
        if self._bpe_file is not None:
            if not target.exists() or not target.samefile(self._bpe_file):
                shutil.copyfile(self._bpe_file, target)
        else:  # an Encoding built elsewhere: write its ranks in the .tiktoken format
            import base64

            lines = sorted(((r, t) for t, r in self._enc._mergeable_ranks.items()))
            target.write_bytes(b"".join(base64.b64encode(t) + b" " + str(r).encode() + b"\n" for r, t in lines))
        cfg = dict(self._config)
        cfg.setdefault("bos_token", self.bos_token)
        cfg.setdefault("eos_token", self.eos_token)
        cfg.setdefault("chat_template", self.chat_template)
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _eos_list(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in (v if isinstance(v, list) else [v])]


def _config_stop_ids(path: Path, config: Optional[dict]) -> set:
    """eos ids from config.json (as passed) and the folder's generation_config.json."""
    stop = set(_eos_list((config or {}).get("eos_token_id")))
    gen_cfg = path / "generation_config.json"
    if gen_cfg.exists():
        try:
            stop.update(_eos_list(json.loads(gen_cfg.read_text()).get("eos_token_id")))
        except (json.JSONDecodeError, AttributeError):
            raise Phi3MLXError(f"{gen_cfg}: not valid JSON") from None
    return stop


def _read_json(f: Path) -> dict:
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Phi3MLXError(f"{f}: not valid JSON") from None
    if not isinstance(d, dict):
        raise Phi3MLXError(f"{f}: expected a JSON object, got {type(d).__name__}")
    return d


def _folder_chat_template(path: Path, tok_cfg: dict) -> Optional[str]:
    """The folder's chat template as transformers finds it: chat_template.jinja, chat_template.json,
    then tokenizer_config.json (a list of named templates gives the "default" one)."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    t = None
    if (path / "chat_template.json").is_file():
        t = _read_json(path / "chat_template.json").get("chat_template")
    if t is None:
        t = tok_cfg.get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default")
    return t if isinstance(t, str) and t else None


def _find_tiktoken_file(path: Path) -> Optional[Path]:
    """cl100k_base.tiktoken if present, else the folder's only *.tiktoken file, else None."""
    if (path / TIKTOKEN_FILE).is_file():
        return path / TIKTOKEN_FILE
    found = sorted(f for f in path.glob("*.tiktoken") if f.is_file())
    if len(found) > 1:
        raise Phi3MLXError(f"several tiktoken files in {path} ({', '.join(f.name for f in found)}); "
                           f"expected one, named {TIKTOKEN_FILE}")
    return found[0] if found else None


def read_tiktoken_bpe(f: Path) -> dict:
    """Parse a .tiktoken file (``base64(token) rank`` per line) into ``{bytes: rank}``.

    Same format as ``tiktoken.load.load_tiktoken_bpe``, read directly: that function also copies the
    file into a cache keyed by its path (``$TMPDIR/data-gym-cache``), which would serve stale ranks
    if another file later sits at the same path.
    """
    import base64
    import binascii

    ranks = {}
    for n, line in enumerate(Path(f).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise Phi3MLXError(f"{f}: not a tiktoken BPE file (line {n}: {line[:40]!r})") from None
    return ranks


def load_tiktoken_tokenizer(path: Path, config: Optional[dict] = None, bpe_file: Optional[Path] = None) -> TiktokenTokenizer:
    """The Phi-3-small tokenizer from ``path`` (its *.tiktoken file, tokenizer_config.json and
    generation_config.json when present). Nothing is downloaded."""
    path = Path(path)
    bpe_file = Path(bpe_file) if bpe_file else _find_tiktoken_file(path)
    if bpe_file is None:
        raise Phi3MLXError(f"no {TIKTOKEN_FILE} in {path} (phi3small folders need their tiktoken file)")
    try:
        import tiktoken
    except ImportError:
        raise Phi3MLXError("the Phi-3-small tokenizer needs the tiktoken package: pip install 'tiktoken>=0.7'") from None

    ranks = read_tiktoken_bpe(bpe_file)
    if not ranks or max(ranks.values()) >= min(PHI3_SMALL_SPECIAL_TOKENS.values()):
        raise Phi3MLXError(f"{bpe_file}: expected the cl100k_base ranks (0..{CL100K_RANKS - 1}), "
                           f"got {len(ranks)} tokens up to rank {max(ranks.values(), default=-1)}")
    try:
        enc = tiktoken.Encoding(name="phi3small", pat_str=CL100K_PAT_STR, mergeable_ranks=ranks,
                                special_tokens=PHI3_SMALL_SPECIAL_TOKENS)
    except Exception as e:  # e.g. duplicate ranks
        raise Phi3MLXError(f"{bpe_file}: cannot build the tokenizer ({type(e).__name__}: {e})") from None

    tok_cfg = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    eos = _token_content(tok_cfg.get("eos_token")) or "<|endoftext|>"
    bos = _token_content(tok_cfg.get("bos_token")) or eos  # Phi-3-small: bos = eos
    template = _folder_chat_template(path, tok_cfg) or PHI3_SMALL_CHAT_TEMPLATE

    stop = _config_stop_ids(path, config)
    stop.update(PHI3_SMALL_SPECIAL_TOKENS[t] for t in PHI3_SMALL_STOP_TOKENS)
    if eos in PHI3_SMALL_SPECIAL_TOKENS:
        stop.add(PHI3_SMALL_SPECIAL_TOKENS[eos])
    from jinja2.exceptions import TemplateError

    try:
        return TiktokenTokenizer(enc, stop, template, bos, eos, bpe_file=bpe_file, tokenizer_config=tok_cfg)
    except TemplateError as e:
        raise Phi3MLXError(f"{path}: the chat template does not compile ({type(e).__name__}: {e})") from None


def load_tokenizer(path: Path, config: Optional[dict] = None) -> BaseTokenizer:
    """The tokenizer of a model folder.

    The tiktoken back end (Phi-3-small) is used when the config's model_type is ``phi3small`` and the
    folder has a ``*.tiktoken`` file, or when the folder has a ``*.tiktoken`` file and neither
    tokenizer.json nor tokenizer.model. A phi3small folder with no tiktoken file falls back to a
    tokenizer.json if it has one (a converted fast tokenizer), else it is a ``Phi3MLXError`` naming
    the missing file. Everything else goes through transformers (``Tokenizer``).
    """
    path = Path(path)
    model_type = (config or {}).get("model_type")
    bpe_file = _find_tiktoken_file(path) if path.is_dir() else None
    has_json, has_model = (path / "tokenizer.json").exists(), (path / "tokenizer.model").exists()
    if bpe_file is not None and (model_type == "phi3small" or not (has_json or has_model)):
        return load_tiktoken_tokenizer(path, config, bpe_file)
    problem = missing_tokenizer(path, model_type)
    if problem:
        raise Phi3MLXError(problem)
    AutoTokenizer = _import_transformers().AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Phi3MLXError(f"cannot load the tokenizer in {path}: {msg}") from None
    if not getattr(tok, "chat_template", None):
        tok.chat_template = PHI3_CHAT_TEMPLATE

    stop = _config_stop_ids(path, config)
    if tok.eos_token_id is not None:
        stop.add(int(tok.eos_token_id))
    unk = tok.unk_token_id
    for t in PHI3_STOP_TOKENS:
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != unk:
            stop.add(i)
    return Tokenizer(tok, stop)
