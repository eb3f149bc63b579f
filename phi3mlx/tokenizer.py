"""The tokenizer interface: encode/decode, chat template, stop ids and a streaming detokenizer.

Phi-3 text checkpoints ship ``tokenizer.json`` (and/or ``tokenizer.model``); we load them through
the ``transformers`` tokenizer classes so ids equal ``AutoTokenizer`` on the same folder.
"""

from __future__ import annotations

import json
import logging
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

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)


class StreamingDetokenizer:
    """Turns a growing list of ids into text pieces whose concatenation is ``decode(all ids)``.

    A piece is emitted only once the text decoded so far is stable: it does not end in an incomplete
    UTF-8 sequence (U+FFFD) and a little context before the new ids is decoded with them, so that
    leading spaces and byte-fallback pieces come out right.
    """

    def __init__(self, tokenizer: "Tokenizer"):
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


class Tokenizer:
    def __init__(self, hf_tokenizer, stop_ids: Iterable[int]):
        self._tok = hf_tokenizer
        self.stop_ids = set(int(i) for i in stop_ids)

    # the transformers-compatible surface -------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kw):
        out = self._tok.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=tokenize, **kw
        )
        if tokenize and hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
            out = out["input_ids"]
        return list(out) if tokenize else out

    def convert_tokens_to_ids(self, token):
        return self._tok.convert_tokens_to_ids(token)

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

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)

    def save(self, folder: Path):
        self._tok.save_pretrained(str(folder))


def _eos_list(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in (v if isinstance(v, list) else [v])]


def load_tokenizer(path: Path, config: Optional[dict] = None) -> Tokenizer:
    path = Path(path)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        raise Phi3MLXError(f"no tokenizer in {path}: expected tokenizer.json or tokenizer.model")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Phi3MLXError(f"cannot load the tokenizer in {path}: {msg}") from None
    if not getattr(tok, "chat_template", None):
        tok.chat_template = PHI3_CHAT_TEMPLATE

    stop = set(_eos_list((config or {}).get("eos_token_id")))
    gen_cfg = path / "generation_config.json"
    if gen_cfg.exists():
        try:
            stop.update(_eos_list(json.loads(gen_cfg.read_text()).get("eos_token_id")))
        except (json.JSONDecodeError, AttributeError):
            raise Phi3MLXError(f"{gen_cfg}: not valid JSON") from None
    if tok.eos_token_id is not None:
        stop.add(int(tok.eos_token_id))
    unk = tok.unk_token_id
    for t in PHI3_STOP_TOKENS:
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != unk:
            stop.add(i)
    return Tokenizer(tok, stop)
