"""``phi3mlx chat``: a multi-turn chat in the terminal.

Every turn renders the whole conversation (system message, earlier user and assistant turns, the
new user message) through the model's chat template and streams the answer as it is generated. The
KV cache is kept between turns, so a turn processes only its new tokens, not the whole history.

Commands, typed at the prompt:

    /help          list the commands
    /reset         clear the history (the system message stays)
    /system TEXT   set the system message and clear the history ("/system" alone removes it)
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

from .errors import Phi3MLXError
from .generate import GenerationResponse, make_sampler, stream_generate
from .tokenizer import utf8_problem

SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed")  # make_sampler's arguments

HELP = """commands:
  /help          this list
  /reset         clear the history (the system message stays)
  /system TEXT   set the system message and clear the history ("/system" alone removes it)
  /exit          leave (also Ctrl-D; Ctrl-C stops an answer, or leaves at the prompt)"""


class ContextOverflow(Phi3MLXError):
    def __init__(self, prompt_tokens: int, context: int):
        self.prompt_tokens, self.context = prompt_tokens, context
        super().__init__(
            f"this message makes the prompt {prompt_tokens} tokens, but the model's context is {context} "
            "tokens (no room for an answer); it was not added to the history (/reset starts over)"
        )


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
                 kv_bits: Optional[int] = None, kv_group_size: Optional[int] = None, **gen_kwargs):
        self.model, self.tokenizer = model, tokenizer
        self.system = system or None
        self.history: list[dict] = []
        self.max_tokens = max_tokens
        self.cache = model.make_cache(kv_bits, kv_group_size)
        self.gen_kwargs = gen_kwargs
        if "sampler" not in gen_kwargs:  # one sampler for the whole chat: a seed gives one stream, not a repeat per turn
            self.gen_kwargs["sampler"] = make_sampler(**{k: gen_kwargs.pop(k) for k in SAMPLING if k in gen_kwargs})
        self.last: Optional[GenerationResponse] = None  # the last answer's final stats

    def reset(self, system: Optional[str] = ...) -> None:
        """Clear the history and the cache; with ``system`` given, also replace the system message."""
        self.history = []
        self.cache.reset()
        if system is not ...:
            self.system = system or None

    def messages(self, user: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history + [{"role": "user", "content": user}]

    def prompt(self, user: str) -> str:
        return self.tokenizer.apply_chat_template(self.messages(user), add_generation_prompt=True, tokenize=False)

    def ask(self, user: str, write: Callable[[str], None]) -> Reply:
        """Answer ``user``, passing text pieces to ``write`` as they come; raise ContextOverflow if it can't fit."""
        ids = self.tokenizer.encode(self.prompt(user))
        ctx = self.model.config.context_length
        if len(ids) >= ctx:
            raise ContextOverflow(len(ids), ctx)
        max_tokens = min(self.max_tokens, ctx - len(ids))
        reply, last = Reply(""), None
        try:
            for last in stream_generate(self.model, self.tokenizer, ids, max_tokens=max_tokens, cache=self.cache,
                                        **self.gen_kwargs):
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
            else:
                ui.notice(f"unknown command {cmd}; /help lists the commands")
            continue
        try:
            reply = chat.ask(line, ui.write)
        except ContextOverflow as e:
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
    chat = Chat(model, tokenizer, system=args.system, max_tokens=args.max_tokens, **gen_kwargs)
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
