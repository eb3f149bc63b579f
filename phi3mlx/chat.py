"""``phi3mlx chat``: a multi-turn chat in the terminal.

Every turn renders the whole conversation (system message, earlier user and assistant turns, the
new user message) through the model's chat template and streams the answer as it is generated. The
KV cache is kept between turns, so a turn processes only its new tokens, not the whole history.

Commands, typed at the prompt:

    /help          list the commands
    /reset         clear the history (the system message stays)
    /system TEXT   set the system message and clear the history ("/system" alone removes it)
    /image PATH    (vision models) attach an image (a path or URL) to the next message
    /exit          leave; so do Ctrl-D (end of input) and Ctrl-C at the prompt

Empty lines are ignored; any other line starting with "/" is an unknown command.

Ctrl-C while an answer streams stops that answer. The partial answer is kept in the history as
the assistant's turn: it is what was shown, and the history stays a strict user/assistant
alternation. A message that would make the prompt fill the model's context is refused with both
token counts and is not added to the history; answers are capped to the room left in the context.

With stdin not a terminal there are no prompts or colours: each input line is one user turn (or a
command), each answer is printed on stdout followed by a newline, notices go to stderr, and the
program exits at end of input: ``printf 'hi\\nand then?\\n' | phi3mlx chat --model M``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx

from .errors import Phi3MLXError
from .generate import GenerationResponse, image_key, make_sampler, stream_generate
from .models import place_rows
from .processor import IMAGE_TAG, Processor, keyed_ids
from .tokenizer import utf8_problem

SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed")  # make_sampler's arguments

HELP = """commands:
  /help          this list
  /reset         clear the history (the system message stays)
  /system TEXT   set the system message and clear the history ("/system" alone removes it)
  /image PATH    (vision models) attach an image (a path or URL) to the next message
  /exit          leave (also Ctrl-D; Ctrl-C stops an answer, or leaves at the prompt)"""


class ContextOverflow(Phi3MLXError):
    def __init__(self, prompt_tokens: int, context: int):
        self.prompt_tokens, self.context = prompt_tokens, context
        super().__init__(
            f"this message makes the prompt {prompt_tokens} tokens, but the model's context is {context} "
            "tokens (no room for an answer); it was not added to the history (/reset starts over)"
        )


@dataclass
class ChatImage:
    key: int  # names the image's content in the cached ids
    rows: mx.array  # the vision tower's output for it, computed once
    tokens: int  # prompt positions it takes
    source: str


@dataclass
class Reply:
    text: str
    interrupted: bool = False  # Ctrl-C stopped it
    context_full: bool = False  # it ended because the context filled up


class Chat:
    """The conversation state: system message, alternating user/assistant messages and the KV cache.

    The cache is kept across turns: a new turn renders the whole conversation through the chat
    template, keeps the cached tokens it starts with (everything up to the last answer, normally) and
    processes only the rest (template suffix + the new user message). /reset and /system clear it.
    """

    def __init__(self, model, tokenizer, system: Optional[str] = None, max_tokens: int = 512,
                 kv_bits: Optional[int] = None, kv_group_size: Optional[int] = None,
                 num_crops: Optional[int] = None, **gen_kwargs):
        self.model, self.tokenizer = model, tokenizer
        self.system = system or None
        self.history: list[dict] = []
        self.images: list[ChatImage] = []  # image N of the conversation is images[N - 1]
        self.pending: list[int] = []  # numbers of the images the next message carries
        self.num_crops = num_crops
        self.max_tokens = max_tokens
        self.cache = model.make_cache(kv_bits, kv_group_size)
        self.gen_kwargs = gen_kwargs
        if "sampler" not in gen_kwargs:  # one sampler for the whole chat: a seed gives one stream, not a repeat per turn
            self.gen_kwargs["sampler"] = make_sampler(**{k: gen_kwargs.pop(k) for k in SAMPLING if k in gen_kwargs})
        self.last: Optional[GenerationResponse] = None  # the last answer's final stats

    def reset(self, system: Optional[str] = ...) -> None:
        """Clear the history and the cache; with ``system`` given, also replace the system message."""
        self.history = []
        self.images, self.pending = [], []
        self.cache.reset()
        if system is not ...:
            self.system = system or None

    def messages(self, user: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history + [{"role": "user", "content": user}]

    def prompt(self, user: str) -> str:
        return self.tokenizer.apply_chat_template(self.messages(user), add_generation_prompt=True, tokenize=False)

    def add_image(self, src: str) -> ChatImage:
        """Read an image and run the vision tower on it once; the next message carries it."""
        if not self.model.takes_images or not isinstance(self.tokenizer, Processor):
            raise Phi3MLXError(f"this model ({self.model.model_type}) takes no images")
        batch = self.tokenizer.preprocess([src], self.num_crops)
        rows = self.model.encode_images(batch.pixel_values, batch.image_sizes)[0]
        mx.eval(rows)
        image = ChatImage(image_key(batch.pixel_values[0], batch.image_sizes[0]), rows, batch.num_img_tokens[0], str(src))
        self.images.append(image)
        self.pending.append(len(self.images))
        return image

    def _ids(self, user: str):
        """(ids, image rows) of the conversation with ``user`` as the next message."""
        if not self.images:
            return self.tokenizer.encode(self.prompt(user)), None
        ids = self.tokenizer.tokenize(self.prompt(user), [im.tokens for im in self.images])
        rows = place_rows([ids], [im.rows for im in self.images])
        return keyed_ids(ids, [im.key for im in self.images]), rows

    def ask(self, user: str, write: Callable[[str], None]) -> Reply:
        """Answer ``user``, passing text pieces to ``write`` as they come; raise ContextOverflow if it can't fit."""
        if isinstance(self.tokenizer, Processor) and IMAGE_TAG.search(user):
            raise Phi3MLXError("image placeholders are added for you: attach images with /image PATH")
        user = "".join(f"<|image_{n}|>\n" for n in self.pending) + user
        ids, rows = self._ids(user)
        ctx = self.model.config.context_length
        if len(ids) >= ctx:
            if self.pending:  # they came with this message, which is not kept
                self.images = self.images[: self.pending[0] - 1]
                self.pending = []
            raise ContextOverflow(len(ids), ctx)
        self.pending = []
        max_tokens = min(self.max_tokens, ctx - len(ids))
        reply, last = Reply(""), None
        try:
            for last in stream_generate(self.model, self.tokenizer, ids, max_tokens=max_tokens, cache=self.cache,
                                        image_rows=rows, **self.gen_kwargs):
                reply.text += last.text
                if last.text:
                    write(last.text)
        except KeyboardInterrupt:
            reply.interrupted = True
            self.cache.repair()  # a pass may have stopped half way through the layers
        if last is not None:
            reply.context_full = last.finish_reason == "context" or (
                last.finish_reason == "length" and len(ids) + last.generation_tokens >= ctx)
        self.last = last
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": reply.text}]
        return reply


class PlainUI:
    """stdin is not a terminal: plain lines in, answers on stdout, notices on stderr."""

    def read(self) -> Optional[str]:
        line = sys.stdin.readline()
        return None if line == "" else line

    def write(self, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    def end_answer(self, reply: Reply) -> None:
        self.write("\n")

    def notice(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)


class RichUI:
    """An interactive terminal: a coloured prompt with line editing."""

    def __init__(self):
        from rich.console import Console

        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        self.console = Console(highlight=False)

    def read(self) -> Optional[str]:
        try:
            return self.console.input("[bold green]>>> [/]")
        except EOFError:
            self.console.print()
            return None

    def write(self, piece: str) -> None:
        self.console.print(piece, end="", markup=False, soft_wrap=True)

    def end_answer(self, reply: Reply) -> None:
        self.console.print(" [dim](stopped)[/]" if reply.interrupted else "")

    def notice(self, msg: str) -> None:
        self.console.print(msg, style="yellow", markup=False)


def run(chat: Chat, ui) -> None:
    """The read-answer loop; returns at /exit, end of input or Ctrl-C at the prompt."""
    while True:
        try:
            line = ui.read()
        except KeyboardInterrupt:
            ui.notice("")
            return
        except UnicodeDecodeError as e:  # a strict stream; the CLI reads with surrogateescape (below)
            ui.notice(f"that line is not valid UTF-8 (byte 0x{e.object[e.start]:02x}); it was skipped")
            continue
        if line is None:
            return
        problem = utf8_problem(line, "that line")
        if problem:
            ui.notice(problem + "; it was skipped")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd == "/exit":
                return
            elif cmd == "/help":
                ui.notice(HELP)
            elif cmd == "/reset":
                chat.reset()
                ui.notice("history cleared")
            elif cmd == "/system":
                chat.reset(system=arg.strip())
                ui.notice(f"system message {'set' if chat.system else 'removed'}, history cleared")
            elif cmd == "/image":
                if not arg.strip():
                    ui.notice("/image needs a path or URL")
                    continue
                try:
                    image = chat.add_image(arg.strip())
                except Phi3MLXError as e:
                    ui.notice(str(e))
                    continue
                ui.notice(f"image {len(chat.images)} ({image.tokens} positions) goes with your next message")
            else:
                ui.notice(f"unknown command {cmd}; /help lists the commands")
            continue
        try:
            reply = chat.ask(line, ui.write)
        except Phi3MLXError as e:  # ContextOverflow, a placeholder typed into a vision chat, ...
            ui.notice(str(e))
            continue
        ui.end_answer(reply)
        if reply.context_full:
            ui.notice(f"(the context of {chat.model.config.context_length} tokens is full; /reset starts over)")


def main(args, model, tokenizer, gen_kwargs: dict) -> None:
    """Entry point for ``phi3mlx chat``: ``args`` from phi3mlx.cli (``system``, ``max_tokens``, ``model``),
    the model and tokenizer it loaded, and the generation keyword arguments it built from the flags
    (a seed seeds the chat's one sampler, so turns do not repeat the same random stream)."""
    if args.max_tokens < 1:
        raise Phi3MLXError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    chat = Chat(model, tokenizer, system=args.system, max_tokens=args.max_tokens,
                num_crops=getattr(args, "num_crops", None), **gen_kwargs)
    for src in getattr(args, "image", None) or []:
        chat.add_image(src)
    if not sys.stdin.isatty():
        return run(chat, PlainUI())
    from rich.markup import escape

    ui = RichUI()
    ui.console.print(
        f"[bold]phi3mlx chat[/] — {escape(str(args.model))} (context {model.config.context_length} tokens). "
        "/help lists the commands; Ctrl-D leaves.",
        highlight=False,
    )
    run(chat, ui)
