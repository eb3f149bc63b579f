"""The ``phi3mlx`` command line: convert, export-hf, generate, chat, serve, bench, lora, dpo, fuse,
pretrain, corpus, tokenizer train.

Every user mistake is printed as one line ``phi3mlx: error: ...`` with exit code 1: a bad command line
(argparse's errors: unknown flag, missing flag, bad value or choice; the line names the subcommand and
points to its ``--help``) as well as a ``Phi3MLXError`` from the work itself.

A prompt or system message that is not valid UTF-8 (``-p -`` with such bytes on stdin, or such bytes in
an argument) is refused with one line naming the first bad byte and its position; it is never silently
altered.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from . import __version__
from .bench import check_bench_args
from .bench import main as bench_main
from .bench_serve import main as bench_serve_main
from .bench_vision import main as bench_image_main
from .cache import ModelCache
from .chat import main as chat_main
from .convert.hf_to_mlx import convert
from .convert.mlx_to_hf import export_hf
from .errors import Phi3MLXError
from .finetune.bench import add_pretrain_args, add_train_args
from .finetune.bench import main as bench_train_main
from .finetune.bench import main_pretrain as bench_pretrain_main
from .finetune.cli import add_parsers, apply_yaml, run_corpus, run_fuse, run_pretrain, run_training
from .finetune.tokenizer_train import run as run_tokenizer_train
from .generate import format_stats, stream_generate
from . import kernels
from .loader import load
from .hub import resolve
from .config import read_json_object
from .models import parse_config, read_model_config
from .plan import DEVICES, plan, swift_problem
from .processor import IMAGE_TAG
from .server import check_listen, serve
from .tiny import EMBEDDED_ID, TINY_ID
from .tokenizer import utf8_problem

DEFAULT_MODEL = EMBEDDED_ID
TINY_NOTICE = (f"phi3mlx: note: {TINY_ID} is a built-in toy model with random weights: its "
               "output is noise; pass --model with a model folder or a Hugging Face Hub id for a real model")


class UsageError(Phi3MLXError):
    """A bad command line (argparse's errors), reported like every other user mistake."""

    def __init__(self, problem: str, prog: str = "phi3mlx"):
        self.problem, self.prog = problem, prog
        command = prog.partition(" ")[2]  # "phi3mlx generate" -> "generate"
        super().__init__(f"{command + ': ' if command else ''}{problem} (see {prog} --help)")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" once, and only where it says something: not for a default of None or an
    off switch, nor where the help text already states its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "(default" in text:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse's errors as one line (``UsageError``, exit code 1 in ``main``) instead of usage + exit 2."""

    def error(self, message):
        raise UsageError(message, self.prog)

    def parse_args(self, args=None, namespace=None):
        try:
            ns, extras = self.parse_known_args(args, namespace)
        except UsageError as e:  # name unknown flags too, not only the first problem argparse met
            extras = self._unknown_args(args)
            if not extras or "unrecognized arguments" in e.problem:
                raise
            raise UsageError(f"{e.problem}; unrecognized arguments: {' '.join(extras)}", e.prog) from None
        if extras:  # argparse reports them from the top parser: name the subcommand they were given to
            (self._chosen_subparser(ns) or self).error(f"unrecognized arguments: {' '.join(extras)}")
        return ns

    def _chosen_subparser(self, ns):
        """The innermost subcommand parser ``ns`` chose (``corpus textbook``'s, not ``corpus``'s)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                sub = action.choices.get(getattr(ns, action.dest, None))
                return sub and (sub._chosen_subparser(ns) or sub)
        return None

    def _all_parsers(self) -> list:
        return [self] + [q for a in self._actions if isinstance(a, argparse._SubParsersAction)
                         for p in a.choices.values() for q in p._all_parsers()]

    def _unknown_args(self, args) -> list:
        """The arguments no parser recognises, found by parsing again with nothing required."""
        parsers = self._all_parsers()
        relaxed = [a for p in parsers for a in p._actions if a.required]
        for a in relaxed:
            a.required = False
        try:
            return self.parse_known_args(args)[1]
        except UsageError:
            return []
        finally:
            for a in relaxed:
                a.required = True


def _model_arg(p, required=False):
    p.add_argument(
        "--model",
        default=None if required else DEFAULT_MODEL,
        required=required,
        help="model folder (phi3mlx, mlx-lm or Hugging Face layout) or Hugging Face Hub id; "
        f"'{DEFAULT_MODEL}' is the built-in model (a few million parameters, trained by the project: two-digit "
        f"sums and the invented valley of Orvane); '{TINY_ID}' a tiny random-weight one",
    )
    p.add_argument("--adapter-path", default=None, help="folder with fine-tuned adapters to apply (unfused)")


def _image_args(p):
    p.add_argument("--image", "-i", action="append", default=None, metavar="PATH_OR_URL",
                   help="an image for a vision model (phi3_v), repeatable: image N is <|image_N|> in the prompt; "
                   "without placeholders the images go before the prompt's text")
    p.add_argument("--num-crops", type=int, default=None,
                   help="most 336-px crops per image (default: the folder's preprocessor_config.json, 16 for "
                   "Phi-3-vision; 4 suits several images or video frames with Phi-3.5-vision)")


def _sampling_args(p, max_tokens=256):
    p.add_argument("--max-tokens", "-m", type=int, default=max_tokens, help="most tokens to generate")
    p.add_argument("--temp", "--temperature", dest="temperature", type=float, default=0.0,
                   help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens with this much probability (1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep only the k most likely tokens (0 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens less likely than min-p times the top token (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="penalise tokens seen in the last 20 (e.g. 1.1; off by default)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--prefill-step-size", type=int, default=2048, help="prompt tokens processed per chunk")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], default=None,
                   help="store the KV cache quantized to this many bits (less memory for long contexts; default: float)")
    p.add_argument("--no-kernels", action="store_true",
                   help="run MLX ops instead of the custom GPU kernels (Phi-3-small blocksparse decoding)")
    p.add_argument("--kv-group-size", type=int, choices=[32, 64, 128], default=None,
                   help="group size of the quantized KV cache (default: 64, or 32 when the head size is not a "
                   "multiple of 64, as Phi-3's 96)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="phi3mlx",
        description="Run, convert, quantize and benchmark Phi-3 family models with MLX.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"phi3mlx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint to an MLX folder (optionally quantized)",
                       formatter_class=_Formatter,
                       description="Convert a Hugging Face Phi-3 checkpoint (local folder or hub id) into a "
                       "self-contained MLX folder: safetensors shards (<= 5 GB) with an index, config.json, "
                       "tokenizer and generation_config files. Written to a temporary folder, then renamed.")
    p.add_argument("--hf-path", required=True, help="Hugging Face folder or hub id (e.g. microsoft/Phi-3-mini-4k-instruct)")
    p.add_argument("--mlx-path", required=True, help="output folder")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize weights (affine, MLX format)")
    p.add_argument("--q-bits", type=int, default=None, help="bits per weight when quantizing (with -q): 4 or 8 (default: 4)")
    p.add_argument("--q-group-size", type=int, default=None,
                   help="quantization group size (with -q): 32, 64 or 128 (default: 64)")
    p.add_argument("--keep-embeddings-float", action="store_true", help="do not quantize the token embedding")
    p.add_argument("--keep-head-float", action="store_true", help="do not quantize the output head (lm_head)")
    p.add_argument("--quantize-vision", action="store_true",
                   help="vision models: also quantize the vision tower and projector (with -q; by default they "
                   "stay float: they are small next to the language model and quantizing them costs accuracy)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="float type of the weights (default: the checkpoint's)")
    p.add_argument("--context", type=int, default=None, help="context length for the memory estimate (default: min(model context, 4096))")
    p.add_argument("--target", default=None, choices=list(DEVICES), metavar="DEVICE",
                   help="size the folder for a device (" + ", ".join(DEVICES) + "): without -q, the weight format "
                   "'phi3mlx plan' chooses for it; iPhone targets also check that MLX Swift loads the model type")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")

    p = sub.add_parser("plan", help="which context fits each Mac and iPhone, and which quantization to choose",
                       formatter_class=_Formatter,
                       description="For a model (folder, hub id or config.json), per device: the budget an app can "
                       "use, the weight format to choose (float16, 8-bit or 4-bit: the most faithful that holds "
                       "--min-context tokens), its size and the largest context that fits beside weights and "
                       "one prefill chunk's activations; also the context with 4-bit weights and with a 4-bit "
                       "KV cache. Computed from config.json alone: no weights are read.")
    _model_arg(p)
    p.add_argument("--device", action="append", choices=list(DEVICES), metavar="DEVICE", default=None,
                   help="only this device (repeatable; default: " + ", ".join(DEVICES) + ")")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens processed per chunk")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], default=None, help="a quantized KV cache")
    p.add_argument("--min-context", type=int, default=2048, help="context a weight format must hold to be chosen")
    p.add_argument("--budget-gb", type=float, default=None, help="a memory budget in GB instead of the devices' own")

    p = sub.add_parser("export-hf", help="write an MLX folder back as a Hugging Face checkpoint",
                       formatter_class=_Formatter,
                       description="Write an MLX folder (quantized or not) as a Hugging Face folder that "
                       "transformers loads; quantized weights are dequantized.")
    p.add_argument("--mlx-path", required=True, help="MLX model folder")
    p.add_argument("--hf-path", required=True, help="output folder")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="float type of the written weights (default: as stored / dequantized)")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")

    p = sub.add_parser("generate", help="complete one prompt", formatter_class=_Formatter,
                       description="Generate a completion for one prompt. The prompt is wrapped in the "
                       "model's chat template unless --raw is given.")
    _model_arg(p)
    p.add_argument("--prompt", "-p", required=True, help="the prompt text ('-' reads it from stdin)")
    p.add_argument("--system", default=None, help="system message (chat template only)")
    p.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    p.add_argument("--verbose", "-v", action="store_true", help="print prompt/generation speed and peak memory")
    p.add_argument("--prompt-cache", default=None, metavar="FILE",
                   help="a prompt cache written by 'phi3mlx cache-prompt': the part of the prompt it holds is "
                   "not processed again")
    _image_args(p)
    _sampling_args(p)

    p = sub.add_parser("cache-prompt", help="process a long prefix once and save its KV cache to a file",
                       formatter_class=_Formatter,
                       description="Run a prefix (a document, a long system message) through the model and save "
                       "the KV cache with the token ids it holds to FILE (safetensors). 'phi3mlx generate "
                       "--prompt-cache FILE' then processes only what its prompt adds. With the chat template "
                       "(no --raw) the prefix is the rendered system message and the prompt as a user turn, so "
                       "pass the same --system to generate.")
    _model_arg(p)
    p.add_argument("--prompt", "-p", default=None, help="prefix text ('-' reads it from stdin)")
    p.add_argument("--system", default=None, help="system message (chat template only)")
    p.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    p.add_argument("--prompt-cache", required=True, metavar="FILE", help="the file to write")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], default=None, help="store the cache quantized")
    p.add_argument("--kv-group-size", type=int, choices=[32, 64, 128], default=None,
                   help="group size of the quantized cache (64, or 32 for head size 96)")
    p.add_argument("--prefill-step-size", type=int, default=2048, help="prompt tokens processed per chunk")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")

    p = sub.add_parser("chat", help="chat in the terminal (multi-turn)", formatter_class=_Formatter,
                       description="Interactive chat with history kept through the chat template. Commands: "
                       "/reset clears the history, /system TEXT sets the system message, /image PATH attaches "
                       "an image to the next message (vision models), /exit leaves. "
                       "Ctrl-C stops the current answer. With stdin not a terminal, each input line is "
                       "answered once and the program exits at end of input.")
    _model_arg(p)
    p.add_argument("--system", default=None, help="system message")
    _image_args(p)
    _sampling_args(p, max_tokens=512)

    p = sub.add_parser("bench", help="measure prefill/decode speed and memory, optionally against mlx-lm",
                       formatter_class=_Formatter,
                       description="Measure prompt processing (prefill) and generation (decode) speed and "
                       "peak memory on random prompt tokens; with --compare-mlx-lm, mlx-lm runs on the same "
                       "folder in the same process and the ratios (ours / mlx-lm, higher is better) are printed. "
                       "--train measures LoRA training instead; --pretrain measures pretrain's training step "
                       "against a plain MLX loop on a model built from --width/--layers/... (tokens/s, peak "
                       "memory, model FLOPs utilisation).")
    _model_arg(p)
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length")
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine (best is reported)")
    p.add_argument("--compare-mlx-lm", action="store_true", help="also run mlx-lm on the same folder")
    p.add_argument("--no-kernels", action="store_true", help="run MLX ops instead of the custom GPU kernels")
    p.add_argument("--image", action="store_true",
                   help="vision models: image encoding, prefill with an image and decode (without --model: a random "
                   "Phi-3-vision-shaped folder with the full ViT-L/14-336 tower)")
    p.add_argument("--num-crops", type=int, default=None, help="with --image: crops per image (default 4)")
    p.add_argument("--compare-mlx-vlm", action="store_true", help="with --image: also run mlx-vlm on the same folder")
    p.add_argument("--context", type=int, default=None, help="context length for the memory estimate")
    p.add_argument("--seed", type=int, default=0, help="seed for the random prompt")
    p.add_argument("--chat-turns", type=int, default=0, metavar="N",
                   help="instead: time to the first answer token in each of N chat turns of equal length, with "
                   "the chat's cache kept and with the history processed again each turn")
    p.add_argument("--window-memory", action="store_true",
                   help="instead: KV-cache size and peak memory after generating 1x, 2x and 4x a sliding-window "
                   "model's window (with --compare-mlx-lm, mlx-lm's too)")
    p.add_argument("--serve", action="store_true",
                   help="instead: an OpenAI-compatible server's total tokens/s and time to first token at 1, 4 and "
                   "16 concurrent streams (with --compare-mlx-lm, mlx_lm.server's on the same folder)")
    p.add_argument("--workloads", default="greedy,seeded",
                   help="with --serve: comma-separated request kinds, each on freshly started servers: greedy "
                   "(temperature 0), sampled (temperature 0.7, top_p 0.9), seeded (sampled with a seed per "
                   "request)")
    p.add_argument("--streams", default="1,4,16", help="with --serve: comma-separated numbers of concurrent clients")
    p.add_argument("--compile-steps", action=argparse.BooleanOptionalAction, default=None,
                   help="with --serve: start phi3mlx serve with --compile-steps (or --no-compile-steps); default: "
                   "neither, the server's own choice (compiled for a model of at most 32 MB)")
    p.add_argument("--trials", type=int, default=2,
                   help="with --serve: timed rounds per server and number of streams; with --compare-mlx-lm the "
                   "two servers, both running (the model loaded twice), take turns (A B B A ...; an even number "
                   "cancels a steady drift of the machine's speed) and each one's tokens/s is over all its trials")
    add_train_args(p)  # phi3mlx bench --train
    add_pretrain_args(p)  # phi3mlx bench --pretrain

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and completions, streaming, batched)",
                       formatter_class=_Formatter,
                       description="Serve the model over the OpenAI API: POST /v1/chat/completions, POST "
                       "/v1/completions, GET /v1/models, GET /health; streaming (server-sent events) or not. "
                       "Requests that arrive together are decoded together, one batched step over every active "
                       "request (each with its own KV cache, sampler and stop rules); repeated prompt prefixes "
                       "are reused from a prefix cache. Point any OpenAI client at http://HOST:PORT/v1.")
    _model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8080, help="TCP port")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: the PHI3MLX_API_KEY environment variable, "
                   "else no key)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get HTTP 429")
    p.add_argument("--model-id", default=None, help="the name clients use (default: the --model argument)")
    p.add_argument("--compile-steps", action=argparse.BooleanOptionalAction, default=None,
                   help="run the batch's decoding step as one compiled graph (default: for a model of at most 32 "
                   "MB of weights, the built-in one: 4-9%% more tokens/s at 16 streams on a 2-core CPU). Each "
                   "new batch size and cache length is traced once (a pause: about 3 ms for the built-in model, 150 ms "
                   "for a 32-layer one) and kept in memory (about 0.1 MB per layer per shape, 64 shapes at "
                   "most, then it starts afresh)")
    p.add_argument("--blas-threads", type=int, default=None, metavar="N",
                   help="CPU backend with OpenBLAS: BLAS threads while serving (default: 1 for a model of at most "
                   "32 MB of weights, whose matmuls are too small to share out, where an idle BLAS thread "
                   "would spin on a core the server needs; else OpenBLAS's own count)")
    p.add_argument("--image-dir", default=None,
                   help="vision models: image_url paths must lie in this folder (default: any local path when "
                   "listening on loopback, none otherwise; data: URLs always work)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="the HTTP server's log: info logs every request, warning only problems")

    add_parsers(sub, _Formatter)
    return parser


def _cmd_convert(a):
    keep = tuple(n for n, on in (("model.embed_tokens", a.keep_embeddings_float), ("lm_head", a.keep_head_float)) if on)
    res = convert(a.hf_path, a.mlx_path, quantize=a.quantize, q_bits=a.q_bits, q_group_size=a.q_group_size,
                  dtype=a.dtype, keep_float=keep, quantize_vision=a.quantize_vision, force=a.force,
                  context=a.context, target=a.target)
    for line in res.summary:
        print(line)


def _cmd_export(a):
    out = export_hf(a.mlx_path, a.hf_path, dtype=a.dtype, force=a.force)
    print(f"wrote {out}")


def sampling_kwargs(a) -> dict:
    """The generation keyword arguments (stream_generate's) of ``generate``/``chat``'s flags."""
    return dict(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
                repetition_penalty=a.repetition_penalty, seed=a.seed, prefill_step_size=a.prefill_step_size,
                kv_bits=a.kv_bits, kv_group_size=a.kv_group_size)


def _read_stdin() -> str:
    """All of stdin as text; bytes that do not decode stay as surrogates (reported by utf8_problem)."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    return sys.stdin.read()


def image_problems(images) -> list[str]:
    """Image paths that are missing or folders (checked before the model loads; URLs are read later)."""
    out = []
    for src in images:
        if str(src).startswith(("http://", "https://")):
            continue
        p = Path(src).expanduser()
        if not p.exists():
            out.append(f"image not found: {src}")
        elif p.is_dir():
            out.append(f"{src} is a folder, not an image")
    return out


def _messages(system, user) -> list[dict]:
    """The conversation of one command: the system message and the user's prompt, each when given."""
    return [{"role": r, "content": c} for r, c in (("system", system), ("user", user)) if c]


def _note_tiny(a) -> None:
    """Say on stderr that the built-in random model's output is noise, when a command runs it."""
    if str(getattr(a, "model", None)) == TINY_ID:
        print(TINY_NOTICE, file=sys.stderr, flush=True)


def _cmd_generate(a):
    from_stdin = a.prompt == "-"
    prompt = _read_stdin() if from_stdin else a.prompt
    problems = [utf8_problem(prompt, "the prompt read from stdin" if from_stdin else "the prompt (--prompt)"),
                utf8_problem(a.system, "the system message (--system)") if a.system else None]
    if not problems[0] and not prompt.strip():
        problems[0] = "the prompt is empty"
    problems += image_problems(a.image or [])
    if any(problems):
        raise Phi3MLXError.many(problems)
    model, tok = load(a.model, adapter_path=a.adapter_path)
    _note_tiny(a)
    if a.image and not a.raw and not IMAGE_TAG.search(prompt):
        prompt = "".join(f"<|image_{i}|>\n" for i in range(1, len(a.image) + 1)) + prompt
    if not a.raw:
        prompt = tok.apply_chat_template(_messages(a.system, prompt), add_generation_prompt=True, tokenize=False)
    kwargs = sampling_kwargs(a)
    if a.image:
        kwargs.update(images=a.image, num_crops=a.num_crops)
    if a.prompt_cache:
        kwargs["cache"] = ModelCache.load(a.prompt_cache, model.identity())
        kwargs.pop("kv_bits"), kwargs.pop("kv_group_size")  # the file's own setting holds
    last = None
    for last in stream_generate(model, tok, prompt, max_tokens=a.max_tokens, **kwargs):
        print(last.text, end="", flush=True)
    print()
    if a.verbose and last is not None:
        print(format_stats(last, model.config.context_length), file=sys.stderr)
    elif last is not None and last.finish_reason == "context":
        print(f"phi3mlx: note: generation stopped after {last.generation_tokens} tokens: the model's context of "
              f"{model.config.context_length} tokens is full", file=sys.stderr)


def _cmd_cache_prompt(a):
    out = Path(a.prompt_cache)
    from_stdin = a.prompt == "-"
    prompt = _read_stdin() if from_stdin else a.prompt
    problems = [utf8_problem(prompt, "the prompt") if prompt else None,
                utf8_problem(a.system, "the system message (--system)") if a.system else None]
    if not (prompt or "").strip() and not (a.system and not a.raw):
        problems.append("nothing to cache: give --prompt (or --system with the chat template)")
    if out.exists() and not a.force:
        problems.append(f"{out} exists (--force replaces it)")
    if out.is_dir():
        problems.append(f"{out} is a folder")
    if any(problems):
        raise Phi3MLXError.many(problems)
    model, tok = load(a.model, adapter_path=a.adapter_path)
    _note_tiny(a)
    if a.raw:
        ids = tok.encode(prompt)
    else:
        ids = tok.encode(tok.apply_chat_template(_messages(a.system, prompt), add_generation_prompt=False,
                                                 tokenize=False))
    ctx = model.config.context_length
    if len(ids) >= ctx:
        raise Phi3MLXError(f"the prefix has {len(ids)} tokens but the model's context is {ctx} tokens")
    cache = model.make_cache(a.kv_bits, a.kv_group_size)
    cache.extend(model, ids, a.prefill_step_size)
    cache.save(out, metadata={"model": str(a.model)})
    print(f"wrote {out} ({len(ids)} tokens)")


def _cmd_chat(a):
    if a.system and utf8_problem(a.system):
        raise Phi3MLXError(utf8_problem(a.system, "the system message (--system)"))
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 becomes a one-line error, not a traceback
        sys.stdin.reconfigure(errors="surrogateescape")
    problems = image_problems(a.image or [])
    if problems:
        raise Phi3MLXError.many(problems)
    model, tok = load(a.model, adapter_path=a.adapter_path)
    _note_tiny(a)
    chat_main(a, model, tok, sampling_kwargs(a))


def _cmd_bench(a):
    if a.pretrain:
        return bench_pretrain_main(a)
    if a.train:
        return bench_train_main(a)
    if a.image:
        return bench_image_main(a, DEFAULT_MODEL)
    if a.serve:
        return bench_serve_main(a)
    _note_tiny(a)
    bench_main(a)


def _cmd_lora(a):
    run_training(a)


def _cmd_dpo(a):
    run_training(a, dpo=True)


def _cmd_fuse(a):
    run_fuse(a)


def _cmd_pretrain(a):
    run_pretrain(a)


def _cmd_serve(a):
    check_listen(a.host, a.port)  # before the model loads
    model, tok = load(a.model, adapter_path=a.adapter_path)
    _note_tiny(a)
    key = a.api_key if a.api_key is not None else os.environ.get("PHI3MLX_API_KEY") or None
    serve(model, tok, a.model_id or a.model, a.host, a.port, key, a.max_batch, a.max_queue, image_dir=a.image_dir,
          compile_steps=a.compile_steps, log_level=a.log_level, blas_threads=a.blas_threads)


def _cmd_plan(a):
    path = Path(a.model)
    if path.is_file():  # a config.json of any name
        cfg = parse_config(read_json_object(path), source=str(path))
    else:
        cfg = read_model_config(resolve(a.model))
    fits = plan(cfg, a.device, a.prefill_chunk, a.kv_bits, a.min_context, a.budget_gb)
    kv = f"{a.kv_bits}-bit" if a.kv_bits else "float16"
    table = Table(box=box.SIMPLE_HEAD)
    for col in ("device", "budget GB", "choose", "weights GB", f"context, {kv} KV", "4-bit", "4-bit, 4-bit KV"):
        table.add_column(col, justify="left" if col in ("device", "choose") else "right", no_wrap=True)
    for f in fits:
        table.add_row(f.device, f"{f.budget_gb:.1f}", f.choice or "none fits", f"{f.weights_gb:.2f}",
                      f"{f.context:,}" if f.choice else "-", f"{f.context_4bit:,}", f"{f.context_4bit_kv4:,}")
    out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
    out.print(f"{a.model}: {cfg.model_type}, context {cfg.context_length:,}, prefill chunk {a.prefill_chunk}; the "
              "largest context that fits beside the weights (the last two columns: with 4-bit weights)")
    out.print(table)
    if swift_problem(cfg.model_type):
        out.print(f"note: {swift_problem(cfg.model_type)}")


def _cmd_tokenizer(a):
    run_tokenizer_train(a)  # "train" is the group's only command


def _cmd_corpus(a):
    run_corpus(a)


COMMANDS = {"convert": _cmd_convert, "export-hf": _cmd_export, "generate": _cmd_generate,
            "cache-prompt": _cmd_cache_prompt, "chat": _cmd_chat,
            "bench": _cmd_bench, "lora": _cmd_lora, "dpo": _cmd_dpo, "fuse": _cmd_fuse,
            "pretrain": _cmd_pretrain, "tokenizer": _cmd_tokenizer, "corpus": _cmd_corpus, "serve": _cmd_serve,
            "plan": _cmd_plan}


def check_args(a) -> None:
    """Numbers argparse cannot check, all problems in one ``Phi3MLXError``."""
    problems = []

    def need(flag, ok, what, dest=None):
        v = getattr(a, dest or flag.lstrip("-").replace("-", "_"), None)
        if v is not None and not ok(v):
            problems.append(f"{flag} must be {what}, got {v}")

    if a.command in ("generate", "chat"):
        need("--max-tokens", lambda v: v >= 1, "at least 1")
        need("--temp", lambda v: v >= 0, "0 (greedy) or more", dest="temperature")
        need("--top-p", lambda v: 0 <= v <= 1, "in [0, 1]")
        need("--top-k", lambda v: v >= 0, "0 (off) or more")
        need("--min-p", lambda v: 0 <= v <= 1, "in [0, 1]")
        need("--repetition-penalty", lambda v: v > 0, "positive")
        need("--prefill-step-size", lambda v: v >= 1, "at least 1")
        need("--num-crops", lambda v: 1 <= v <= 64, "between 1 and 64")
    if a.command == "cache-prompt":
        need("--prefill-step-size", lambda v: v >= 1, "at least 1")
    if a.command == "plan":
        need("--prefill-chunk", lambda v: v >= 1, "at least 1")
        need("--min-context", lambda v: v >= 1, "at least 1")
        need("--budget-gb", lambda v: v > 0, "positive")
    if a.command == "serve":
        need("--port", lambda v: 0 < v < 65536, "in 1..65535")
        need("--max-batch", lambda v: v >= 1, "at least 1")
        need("--max-queue", lambda v: v >= 1, "at least 1")
        need("--blas-threads", lambda v: v >= 1, "at least 1")
        if a.image_dir is not None and not Path(a.image_dir).is_dir():
            problems.append(f"--image-dir {a.image_dir} is not a folder")
    if a.command == "bench" and not (a.train or a.pretrain):  # before the model loads (and the tiny notice)
        try:
            check_bench_args(a.prompt_tokens, a.gen_tokens, a.repeats)
        except Phi3MLXError as e:
            problems.append(str(e))
    if problems:
        raise Phi3MLXError.many(problems)


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        args = apply_yaml(build_parser(), argv)
        check_args(args)
        kernels.set_enabled(not getattr(args, "no_kernels", False))
        COMMANDS[args.command](args)
    except Phi3MLXError as e:
        print(f"phi3mlx: error: {_one_line(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nphi3mlx: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # unreadable file, permission denied, disk full: the user's environment, not a bug
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"phi3mlx: error: {_one_line(e.strerror or str(e) or type(e).__name__)}{where}", file=sys.stderr)
        return 1
    return 0


def _one_line(msg: str) -> str:
    """Messages that quote a library's error may hold newlines; the CLI promises one line."""
    return " ".join(part.strip() for part in msg.splitlines() if part.strip())


if __name__ == "__main__":
    sys.exit(main())
