"""``phi3mlx lora``, ``phi3mlx dpo``, ``phi3mlx fuse``, ``phi3mlx pretrain``, ``phi3mlx corpus`` and the
``phi3mlx tokenizer`` group.

Any flag can also come from a YAML file given with ``--config`` (keys as the flags' long names,
with ``-`` or ``_``); flags given on the command line win, and one that excludes a key of the file
clears it (``--iters`` clears the file's ``epochs`` and the other way round, ``--dora`` its ``full``
and the other way round). Unknown keys are an error.

Everything that can be checked before the model loads is, and every problem is named at once: the
flags, the data (format, sizes against ``--batch-size``, a last batch too small for the processes of
``mlx.launch``) and ``--adapter-path`` (a folder holding an earlier run's adapters is replaced only
with ``--force``, continued only with ``--resume``). Nothing is written before training starts.
A ``--warmup`` longer than the run is shortened to the run, with a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from phi3mlx.convert.mlx_to_hf import export_hf
from phi3mlx.config import read_yaml_mapping
from phi3mlx.errors import Phi3MLXError
from phi3mlx.hub import resolve
from phi3mlx.loader import load, load_model
from phi3mlx.models.maps import mlx_to_folder
from phi3mlx.processor import Processor
from phi3mlx.tiny import EMBEDDED_ID
from phi3mlx.tokenizer import copy_tokenizer_files
from phi3mlx.weights import atomic_dir, check_output, save_weights

from . import data as D
from . import lora, tokenizer_train
from . import pretrain as P
from .corpus import general_corpus
from .synthetic import chat_dialogues, textbook_documents, write_jsonl
from .losses import make_dpo_loss, make_image_sft_loss, sft_loss
from .trainer import CHECKPOINT, METRICS, STEPS, TrainArgs, remove_run_files, train

# What a training run writes into --adapter-path (--force replaces exactly these).
RUN_FILES = (lora.ADAPTER_FILE, lora.CONFIG_FILE, CHECKPOINT, METRICS, CHECKPOINT + ".tmp", CHECKPOINT + ".old",
             STEPS, "selection.json")  # selection.json: examples/select_embedded.py's table of the kept steps
# Flags that exclude each other: one given on the command line clears the other from a --config file.
EXCLUSIVE = (("iters", "epochs"), ("dora", "full"))

TRAIN_HELP = """\
Data: a folder with train.jsonl (and valid.jsonl, test.jsonl) or one .jsonl file. One JSON object a line:
  {"text": ...}                         the whole text is trained
  {"prompt": ..., "completion": ...}    rendered as a user/assistant exchange (--mask-prompt: loss on the completion only)
  {"messages": [{"role": ..., "content": ...}, ...]}   rendered with the model's chat template, loss on assistant turns
QLoRA: give a quantized (4-bit) model folder; the packed weights stay frozen.
Adapters are written to --adapter-path as adapters.safetensors + adapter_config.json; a resumable
checkpoint (adapters, optimizer state, step) is kept in --adapter-path/checkpoint. Ctrl-C saves it.
Every report is also a line of --adapter-path/metrics.jsonl. An earlier run's files there are replaced
only with --force (or continued with --resume).
"""

DPO_HELP = """\
Data: {"prompt", "chosen", "rejected"} (strings or message lists) or
{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}.
The reference log-probabilities come from the base model with the adapters switched off (no second
copy in memory), or from --reference-model.
"""


def _train_args(p: argparse.ArgumentParser, dpo: bool = False) -> None:
    p.add_argument("--config", default=None, help="YAML file with any of these flags (flags on the command line win)")
    p.add_argument("--model", default=EMBEDDED_ID,
                   help="model folder or hub id (a quantized folder gives QLoRA); default: the built-in model")
    p.add_argument("--data", default=None, help="folder with train.jsonl/valid.jsonl, or one .jsonl file (required)")
    p.add_argument("--adapter-path", default="adapters", help="where the adapters and checkpoints are written")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha: the update is scaled by alpha / rank")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the LoRA input")
    p.add_argument("--targets", default=None,
                   help="comma-separated projection names to adapt (default: every attention and MLP projection, "
                   "MoE experts included)")
    p.add_argument("--num-layers", type=int, default=-1, help="adapt only the last N layers (-1: all)")
    p.add_argument("--dora", action="store_true", help="DoRA instead of LoRA")
    p.add_argument("--full", action="store_true", help="full fine-tuning of the target layers instead of adapters")
    p.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--iters", type=int, default=None, help="optimizer steps (default 1000 unless --epochs)")
    p.add_argument("--epochs", type=float, default=None, help="passes over the training data (instead of --iters)")
    p.add_argument("--lr", type=float, default=1e-4 if not dpo else 1e-5, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=0,
                   help="linear warmup steps, then cosine decay (longer than the run: shortened to it, with a warning)")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="the cosine decays to lr x this")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-seq-length", type=int, default=2048, help="longer examples are truncated (one warning)")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute activations: less memory, ~30%% slower")
    p.add_argument("--grad-clip", type=float, default=None,
                   help="clip each step's gradient to this global norm (without it: no clipping)")
    p.add_argument("--val-every", type=int, default=100, help="validate every N steps (and at the end)")
    p.add_argument("--val-batches", type=int, default=25, help="validation batches (-1: all)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="also keep every checkpoint's adapters in --adapter-path/steps/NNNNNNN (to pick the best "
                   "step afterwards: phi3mlx fuse --adapter-path ADAPTERS/steps/NNNNNNN); with --full each is a "
                   "copy of the trained weights")
    p.add_argument("--report-every", type=int, default=10, help="print training loss every N steps")
    p.add_argument("--resume", action="store_true", help="continue from --adapter-path/checkpoint")
    p.add_argument("--force", action="store_true",
                   help="replace the adapters, checkpoint and metrics of an earlier run in --adapter-path")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, dropout and initialisation")
    if dpo:
        p.add_argument("--beta", type=float, default=0.1, help="DPO beta (strength of the KL anchor)")
        p.add_argument("--loss", choices=["sigmoid", "ipo", "hinge"], default="sigmoid", help="preference loss")
        p.add_argument("--reference-model", default=None, help="reference model folder (default: the base, adapters off)")
    else:
        p.add_argument("--mask-prompt", action="store_true", help="prompt/completion data: loss on the completion only")
        p.add_argument("--pack", action="store_true", help="text data: pack examples into --max-seq-length windows")
        p.add_argument("--mixed-lengths", action="store_true",
                       help="batches of randomly drawn examples (each padded to its longest) instead of length-sorted "
                       "ones: with many short examples of several kinds, sorted batches each hold one kind")


def add_parsers(sub, formatter) -> None:
    p = sub.add_parser("lora", help="fine-tune with LoRA, QLoRA, DoRA or full fine-tuning", formatter_class=formatter,
                       description="Fine-tune a model on your data.", epilog=TRAIN_HELP)
    _train_args(p)
    p = sub.add_parser("dpo", help="preference-tune with DPO (sigmoid, IPO or hinge loss)", formatter_class=formatter,
                       description="Direct preference optimisation with adapters.", epilog=DPO_HELP)
    _train_args(p, dpo=True)
    p = sub.add_parser("fuse", help="merge adapters into the model and save it", formatter_class=formatter,
                       description="Write a model folder with the adapters merged into its weights.")
    p.add_argument("--model", default=None,
                   help="the base model folder or hub id; without it, the base_model adapter_config.json records")
    p.add_argument("--adapter-path", required=True, help="folder with adapters.safetensors + adapter_config.json")
    p.add_argument("--save-path", required=True, help="the new model folder")
    p.add_argument("--dequantize", action="store_true", help="write float weights even if the base is quantized")
    p.add_argument("--export-hf", action="store_true", help="write a Hugging Face checkpoint instead of an MLX folder")
    p.add_argument("--force", action="store_true", help="replace an existing --save-path")
    _pretrain_parser(sub, formatter)
    p = sub.add_parser("tokenizer", help="tokenizer tools (train)", formatter_class=formatter,
                       description="Tokenizer tools.")
    group = p.add_subparsers(dest="tokenizer_command", metavar="COMMAND")
    group.required = True
    tokenizer_train.add_parser(group, formatter)
    _corpus_parsers(sub, formatter)


PRETRAIN_HELP = """\
The YAML file (--config) holds any of these keys; a flag given on the command line wins; an unknown
key is an error. Example (examples/embedded.yaml is the recipe of the built-in model):

  out: runs/small
  model: {model_type: phi3, hidden_size: 256, num_hidden_layers: 4, num_attention_heads: 4,
          intermediate_size: 512}            # any config.json key; phi3small and phimoe work too
  tokenizer: {vocab_size: 2048}              # trained on the sources (cached), or {path: FOLDER}
  sources:
    general: {builtin: general}              # Python standard-library docs, filtered and deduplicated
    textbook: {builtin: textbook, docs: 20000, seed: 0}   # synthetic exercises and stories
    chat: {builtin: dialogues, docs: 20000}  # synthetic dialogues in the Phi-3 chat template
    mine: {paths: [notes/, extra.jsonl]}     # text files, JSONL ("text" or "messages"), folders
  phases:
    - {name: general, tokens: 500000, mix: {general: 1}}
    - {name: textbook, tokens: 500000, mix: {general: 0.3, textbook: 0.5, chat: 0.2}}
  seq_len: 128
  batch_size: 16
  lr: 3.0e-3
  schedule: wsd                              # cosine | wsd (warmup-stable-decay) | constant

Sources are tokenized once into memory-mapped caches (--cache-dir) and reused. --out becomes a normal
model folder (config.json, model.safetensors, tokenizer, pretrain.yaml, metrics.jsonl, loss.png) at
every checkpoint; out/checkpoint holds the optimizer state and the data position for --resume.
Ctrl-C saves a checkpoint. Data parallel: mlx.launch -n N phi3mlx pretrain ...
"""

# flag -> (PretrainConfig key or "model.KEY", type, help)
PRETRAIN_FLAGS = {
    "--out": ("out", str, "the model folder to write (default: pretrained)"),
    "--model-type": ("model.model_type", str, "architecture: phi3 (default), phi3small or phimoe"),
    "--hidden-size": ("model.hidden_size", int, "model width"),
    "--num-hidden-layers": ("model.num_hidden_layers", int, "decoder layers"),
    "--num-attention-heads": ("model.num_attention_heads", int, "attention heads"),
    "--vocab-size": ("tokenizer.vocab_size", int, "vocabulary of the tokenizer trained for the run"),
    "--seq-len": ("seq_len", int, "tokens per training sequence (default 128)"),
    "--batch-size": ("batch_size", int, "sequences per micro-batch (default 16)"),
    "--grad-accum": ("grad_accum", int, "micro-batches per optimizer step (default 1)"),
    "--lr": ("lr", float, "peak learning rate (default 3e-3)"),
    "--schedule": ("schedule", str, "cosine, wsd (warmup-stable-decay; default) or constant"),
    "--warmup": ("warmup", int, "linear warmup steps (default 50)"),
    "--min-lr-ratio": ("min_lr_ratio", float, "the schedule decays to lr x this (default 0.1)"),
    "--weight-decay": ("weight_decay", float, "AdamW decoupled weight decay, not on embeddings, norms, biases "
                                              "(default 0.1)"),
    "--grad-clip": ("grad_clip", float, "clip each step's gradient to this global norm (default 1.0)"),
    "--base-width": ("base_width", int, "muP: the proxy width the hyperparameters were tuned at"),
    "--seed": ("seed", int, "seed for initialisation and the data plan (default 0)"),
    "--val-every": ("val_every", int, "validate every N steps and at the end of each phase (default 100)"),
    "--save-every": ("save_every", int, "checkpoint (and publish --out) every N steps (default 100)"),
    "--report-every": ("report_every", int, "report every N steps (default 10)"),
    "--cache-dir": ("cache_dir", str, "where token caches and trained tokenizers are kept "
                                      "(default ~/.cache/phi3mlx/pretrain)"),
}


def _pretrain_parser(sub, formatter) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model from scratch in data phases (muP, tokenizer training)",
                       formatter_class=formatter, description="Pretrain a Phi-3-architecture model from scratch.",
                       epilog=PRETRAIN_HELP)
    p.add_argument("--config", default=None, help="YAML file with the run's settings (see below)")
    for flag, (key, typ, text) in PRETRAIN_FLAGS.items():
        p.add_argument(flag, type=typ, default=None, dest="pt_" + key.replace(".", "__"), help=text,
                       metavar={int: "N", float: "X"}.get(typ, flag.lstrip("-").split("-")[0].upper()))
    p.add_argument("--mup", action="store_const", const=True, default=None,
                   help="muP: hidden init variance and Adam rates scaled by --base-width / width, logits / "
                   "(width / base), attention 1/head_dim (saved as a plain Phi-3 checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--force", action="store_true", help="replace an earlier run in --out")


def pretrain_config(a) -> "P.PretrainConfig":
    """The run's settings: the --config file with the flags given on top."""
    overrides, model, tok = {}, {}, {}
    for flag, (key, _, _) in PRETRAIN_FLAGS.items():
        v = getattr(a, "pt_" + key.replace(".", "__"))
        if v is None:
            continue
        if key.startswith("model."):
            model[key[6:]] = v
        elif key.startswith("tokenizer."):
            tok[key[10:]] = v
        else:
            overrides[key] = v
    if a.mup:
        overrides["mup"] = True
    c = P.PretrainConfig.from_yaml(Path(a.config) if a.config else None, overrides)
    if model:
        c.model = dict(c.model or {}, **model) if isinstance(c.model, dict) else model
    if tok:
        c.tokenizer = dict(c.tokenizer or {}, **tok) if isinstance(c.tokenizer, dict) else tok
    return c


def run_pretrain(a) -> list[dict]:
    """The body of ``phi3mlx pretrain``."""
    group = mx.distributed.init()
    world, rank = group.size(), group.rank()
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)
    c = pretrain_config(a)
    tok_prog = Progress(TextColumn("tokenizing {task.description}"), TextColumn("{task.completed} documents"),
                        TimeElapsedColumn(), console=Console(stderr=True), transient=True,
                        disable=rank != 0 or not sys.stderr.isatty())
    tasks: dict = {}

    def tokenizing(name: str, docs: int) -> None:
        if name not in tasks:
            tasks[name] = tok_prog.add_task(name, total=None)
        tok_prog.update(tasks[name], completed=docs)

    with tok_prog:
        prep = P.prepare(c, resume=a.resume, force=a.force, say=say, progress=tokenizing)
    n_params = sum(v.size for _, v in tree_flatten(prep.model.parameters()))
    say(f"pretrain {c.model_type}: {n_params / 1e6:.2f}M parameters, vocabulary {prep.tokenizer.vocab_size}, "
        f"{sum(prep.steps)} steps of {c.batch_size} x {c.grad_accum} x {c.seq_len} tokens"
        f"{f' over {world} processes' if world > 1 else ''}{', muP base width ' + str(c.base_width) if c.mup else ''}")
    for phase, n in zip(prep.phases, prep.steps):
        mix = ", ".join(f"{k} {v:g}" for k, v in phase.mix.items())
        say(f"  phase {phase.name}: {n} steps, {n * c.seq_len * c.batch_size * c.grad_accum:,} tokens ({mix})")
    reads = ", ".join(f"{k} {v:.2f}x" for k, v in prep.batches.epochs().items())
    say(f"  sources read: {reads} (epochs over each source's training tokens)")
    prog, report = _progress_report(sum(prep.steps), show=rank == 0)
    with prog:
        history = P.run(prep, resume=a.resume, report=report)
    say(f"wrote {c.out} (a model folder: phi3mlx generate --model {c.out})")
    return history


CORPUS_HELP = """\
general:   docstrings of the installed Python standard library and pydoc's help topics, filtered
           (length, character mix, repetition, exact and near duplicates); {"text": ...} rows
textbook:  synthetic lessons (addition with carries, subtraction, comparisons, counting, units, the
           invented valley and stories set in it); {"text": ...} rows
dialogues: synthetic chats (additions, questions about the valley, questions it cannot answer);
           DIR/train.jsonl and DIR/valid.jsonl of {"messages": [...]} rows, as 'phi3mlx lora --data DIR' reads
Generated data never holds the held-out evaluation questions. The same --seed gives the same data.
"""


def _shares(text):
    """``addition=0.7,world=0.3`` as a mapping (None stays None); a malformed item is a one-line error."""
    if text is None:
        return None
    out = {}
    for item in text.split(","):
        k, _, v = item.partition("=")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise Phi3MLXError(f"--shares: {item!r} is not KIND=WEIGHT (e.g. addition=0.7,world=0.3)") from None
    return out


def _corpus_parsers(sub, formatter) -> None:
    p = sub.add_parser("corpus", help="write the general, textbook or dialogue training data",
                       formatter_class=formatter, epilog=CORPUS_HELP,
                       description="Write training data made on this machine (nothing is downloaded).")
    kinds = p.add_subparsers(dest="corpus", metavar="KIND")
    kinds.required = True
    g = kinds.add_parser("general", help="filtered standard-library docstrings (.jsonl)", formatter_class=formatter)
    g.add_argument("--out", required=True, help="the .jsonl file to write")
    t = kinds.add_parser("textbook", help="synthetic textbook documents (.jsonl)", formatter_class=formatter)
    t.add_argument("--out", required=True, help="the .jsonl file to write")
    t.add_argument("--docs", type=int, required=True, help="number of documents")
    d = kinds.add_parser("dialogues", help="synthetic chats (a folder with train.jsonl, valid.jsonl)",
                         formatter_class=formatter)
    d.add_argument("--out", required=True, help="the folder to write")
    d.add_argument("--examples", type=int, required=True, help="training dialogues")
    d.add_argument("--valid", type=int, default=100, help="validation dialogues (0: no valid.jsonl)")
    d.add_argument("--shares", default=None,
                   help="weights of the dialogue kinds, e.g. addition=0.7,world=0.2,unknown=0.1 (kinds: "
                   "addition, world, unknown, other; default 0.5/0.3/0.15/0.05)")
    for q in (t, d):
        q.add_argument("--seed", type=int, default=0, help="seed of the generator")
    for q in (g, t, d):
        q.add_argument("--force", action="store_true", help="replace the output if it exists")


_UNSET = object()


def _given(parser: argparse.ArgumentParser, target: argparse.ArgumentParser, argv) -> set:
    """The dests of ``target`` (a subcommand's parser) that ``argv`` gives on the command line."""
    saved = {a: a.default for a in target._actions}
    saved_defaults = dict(target._defaults)
    try:
        target.set_defaults(**{a.dest: _UNSET for a in target._actions if a.default is not argparse.SUPPRESS})
        parsed = vars(parser.parse_args(argv))
    finally:
        for a, d in saved.items():
            a.default = d
        target._defaults.clear()
        target._defaults.update(saved_defaults)
    return {k for k, v in parsed.items() if v is not _UNSET}


def apply_yaml(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parse ``argv``; when it names --config, the YAML values become defaults and argv is parsed again.

    A flag on the command line wins over the file's value, and clears the file's value of a flag it
    excludes (``EXCLUSIVE``: ``--iters 2`` with a file holding ``epochs: 2`` trains 2 steps)."""
    args = parser.parse_args(argv)
    if not getattr(args, "config", None) or getattr(args, "command", None) == "pretrain":
        return args  # pretrain reads its own (nested) config: pretrain.PretrainConfig
    path = Path(args.config)
    values = read_yaml_mapping(path, "flag names to values")
    target = parser  # the subcommand's own parser holds its flags
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, "command", None) in action.choices:
            target = action.choices[args.command]
    known = {a.dest for a in target._actions}
    unknown = sorted(k for k in values if k not in known or k in ("help", "config"))
    if unknown:
        raise Phi3MLXError(f"{path}: unknown keys {', '.join(unknown)}")
    given = _given(parser, target, argv)
    for a, b in EXCLUSIVE:
        for flag, other in ((a, b), (b, a)):
            if flag in given:
                values.pop(other, None)
    target.set_defaults(**values)
    return parser.parse_args(argv)


def _val_line(rec: dict) -> str:
    return (f"step {rec['step']}: val loss {rec['val_loss']:.4f}"
            + "".join(f", {k[4:]} {v:.4f}" for k, v in rec.items() if k.startswith("val_") and k != "val_loss"))


REPORT_KEYS = ("step", "loss", "lr", "tokens_per_sec", "peak_gb")


def _plain_line(rec: dict, total: int) -> str:
    """One report as a plain line (logs, pipes): step, [phase,] loss, lr, tokens/s, peak memory, other metrics."""
    extra = "".join(f", {k} {v:.4f}" for k, v in rec.items()
                    if k not in REPORT_KEYS and not k.startswith("val_") and not isinstance(v, str))
    phase = f" [{rec['phase']}]" if "phase" in rec else ""
    return (f"step {rec['step']}/{total}{phase}: loss {rec['loss']:.4f}{extra}, lr {rec['lr']:.2e}, "
            f"{rec['tokens_per_sec']:.0f} tok/s, peak {rec['peak_gb']:.2f} GB")


def _progress_report(total: int, show: bool = True):
    """(context, report callback): a rich progress bar on a terminal, plain lines on stderr otherwise
    (one per report, one per validation), nothing at all when not ``show`` (the other processes)."""
    if not show:
        return contextlib.nullcontext(), None
    if not sys.stderr.isatty():
        def plain(rec: dict) -> None:
            if "loss" in rec:
                print(_plain_line(rec, total), file=sys.stderr, flush=True)
            if "val_loss" in rec:
                print(_val_line(rec), file=sys.stderr, flush=True)

        return contextlib.nullcontext(), plain
    prog = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=False, console=Console(stderr=True))
    task = prog.add_task("train", total=total, info="")
    last = {}

    def report(rec: dict) -> None:
        last.update({k: v for k, v in rec.items() if v is not None})
        info = [f"{last['phase']}" if "phase" in last else "",
                f"loss {last['loss']:.3f}" if "loss" in last else "",
                f"val {last['val_loss']:.3f}" if "val_loss" in last else "",
                f"lr {last['lr']:.2e}" if "lr" in last else "",
                f"{last['tokens_per_sec']:.0f} tok/s" if "tokens_per_sec" in last else "",
                f"peak {last['peak_gb']:.2f} GB" if "peak_gb" in last else ""]
        for k in ("val_accuracy", "val_reward_margin"):
            if k in last:
                info.append(f"{k[4:]} {last[k]:.3f}")
        prog.update(task, completed=rec["step"], info="  ".join(i for i in info if i))
        if "val_loss" in rec:
            prog.console.print(_val_line(rec))

    return prog, report


def _flag_problems(a, dpo: bool) -> list[str]:
    problems = []
    if not a.data:
        problems.append("--data is required (a folder with train.jsonl or a .jsonl file)")
    if a.dora and a.full:
        problems.append("--dora and --full exclude each other")
    if a.iters is not None and a.epochs is not None:
        problems.append("give --iters or --epochs, not both")
    if a.epochs is not None and not a.epochs > 0:
        problems.append(f"--epochs must be positive, got {a.epochs}")
    if a.max_seq_length < 2:
        problems.append(f"--max-seq-length must be at least 2, got {a.max_seq_length}")
    if dpo and not (a.beta > 0 and math.isfinite(a.beta)):
        problems.append(f"--beta must be a positive number, got {a.beta}")
    return problems


def _adapter_path_problems(a) -> list[str]:
    """--adapter-path against --force / --resume: an earlier run's files are never replaced silently."""
    out = Path(a.adapter_path)
    if out.exists() and not out.is_dir():
        return [f"--adapter-path {out} exists and is not a folder"]
    if a.force and a.resume:
        return ["--force and --resume exclude each other (--resume continues the run in --adapter-path, "
                "--force starts it again)"]
    if a.resume:
        if not (out / CHECKPOINT / "trainer_state.json").exists():
            return [f"nothing to resume in {out}: no {CHECKPOINT}/trainer_state.json"]
        return []
    earlier = [n for n in RUN_FILES if (out / n).exists()]
    if earlier and not a.force:
        return [f"--adapter-path {out} already holds {', '.join(earlier)} from an earlier run; pass --force to "
                "replace them or --resume to continue it"]
    return []


def _size_problems(n_train: int, n_val: int, batch_size: int, world: int, what: str = "example") -> list[str]:
    """Data too small for --batch-size, or a last batch of an epoch too small to share over the processes."""
    def count(n):
        return f"{n} {what}{'' if n == 1 else 's'}"

    problems = []
    if batch_size <= 0:
        return problems  # TrainArgs names it
    if n_train < batch_size:
        problems.append(f"the training set has {count(n_train)}, fewer than --batch-size {batch_size}")
    if 0 < n_val < batch_size:
        problems.append(f"the validation set has {count(n_val)}, fewer than --batch-size {batch_size} "
                        "(validation uses whole batches); add validation data or lower --batch-size")
    if world > 1:
        left = n_train % batch_size
        if batch_size < world:
            problems.append(f"--batch-size {batch_size} is smaller than the {world} processes: each needs at least "
                            "one row of every batch")
        elif 0 < left < world:
            problems.append(f"with {count(n_train)} and --batch-size {batch_size} the last batch of each epoch holds "
                            f"{left}, fewer than the {world} processes that share it (each needs a row); use a "
                            f"--batch-size that leaves 0 or at least {world} over")
    return problems


def _read_data(a, dpo: bool):
    rows = D.load_split(a.data, "train")
    fmt = D.detect_format(rows, a.data)
    want = D.PREFERENCE_FORMATS if dpo else D.SFT_FORMATS
    if fmt not in want:
        cmd = "phi3mlx lora" if dpo else "phi3mlx dpo"
        raise Phi3MLXError(f"{a.data} holds {fmt} data, which {'DPO' if dpo else 'phi3mlx lora'} cannot train on "
                           f"(use {cmd})")
    val_rows = D.load_split(a.data, "valid", required=False)
    if val_rows:
        vfmt = D.detect_format(val_rows, a.data)
        if vfmt != fmt:
            raise Phi3MLXError(f"valid.jsonl holds {vfmt} data but train.jsonl holds {fmt}")
    return rows, val_rows, fmt


def run_training(a, dpo: bool = False) -> list[dict]:
    """The body of ``phi3mlx lora`` / ``phi3mlx dpo``."""
    group = mx.distributed.init()
    world, rank = group.size(), group.rank()
    say = (lambda msg: print(msg, file=sys.stderr)) if rank == 0 else (lambda msg: None)
    # before the model loads: flags, --adapter-path, the data and its sizes, all problems at once
    problems = _flag_problems(a, dpo) + _adapter_path_problems(a)
    try:
        rows, val_rows, fmt = _read_data(a, dpo) if a.data else ([], [], None)
    except Phi3MLXError as e:
        raise Phi3MLXError.many(problems + [str(e)]) from None
    if not a.data:
        raise Phi3MLXError.many(problems)
    tune = "full" if a.full else "dora" if a.dora else "lora"
    steps_per_epoch = max(1, math.ceil(len(rows) / max(1, a.batch_size * a.grad_accum)))
    iters = a.iters if a.iters is not None else (
        max(1, math.ceil(a.epochs * steps_per_epoch)) if a.epochs is not None and a.epochs > 0 else 1000)
    warmup = a.warmup
    if iters > 0 and warmup > iters:
        warmup = iters
    args = TrainArgs(iters=iters, batch_size=a.batch_size, grad_accum=a.grad_accum, learning_rate=a.lr,
                     warmup=warmup, min_lr_ratio=a.min_lr_ratio, weight_decay=a.weight_decay,
                     val_every=a.val_every, val_batches=a.val_batches, save_every=a.save_every,
                     report_every=a.report_every, grad_checkpoint=a.grad_checkpoint, grad_clip=a.grad_clip,
                     seed=a.seed, keep_checkpoints=a.keep_checkpoints)
    problems += args.problems()
    problems += _size_problems(len(rows), len(val_rows), a.batch_size, world)
    with_images = any(r.get("images") for r in rows + val_rows)
    if with_images:
        problems += (["image rows train with phi3mlx lora (supervised), not DPO"] if dpo else
                     [f"{a.data}: images go with chat rows ('messages'), not {fmt} rows"] if fmt != "chat" else
                     D.image_problems(rows + val_rows))
        if a.pack:
            problems.append("--pack does not work with image rows (a packed window could start inside an image)")
    if problems:
        raise Phi3MLXError.many(problems)
    if warmup != a.warmup:
        say(f"phi3mlx: warning: --warmup {a.warmup} is longer than the run ({iters} steps); warming up over all "
            f"{iters} steps")

    mx.random.seed(a.seed)
    model, tok = load(a.model, cpu_layout=False)  # trained: its weights keep the usual layout
    table = None
    if with_images:  # a vision model: its frozen tower encodes every image once, adapters go on the decoder
        if not isinstance(tok, Processor):
            raise Phi3MLXError(f"{a.data} has images but {a.model} ({model.model_type}) takes no images")
        table = D.ImageTable(model, tok)
        n_images = len({str(p) for r in rows + val_rows
                        for p in D.image_paths(r, Path(getattr(r, "file", ".") or ".").parent)[0]})
        say(f"encoding {n_images} image(s) with the vision tower")
        train_ex = [D.encode_sft_images(r, tok, table) for r in rows]
        val_ex = [D.encode_sft_images(r, tok, table) for r in val_rows]
        args.compile = False  # the image rows are looked up on the host per batch
    elif dpo:
        train_ex = [D.encode_preference(r, fmt, tok) for r in rows]
        val_ex = [D.encode_preference(r, fmt, tok) for r in val_rows]
    else:
        train_ex = [D.encode_sft(r, fmt, tok, a.mask_prompt) for r in rows]
        val_ex = [D.encode_sft(r, fmt, tok, a.mask_prompt) for r in val_rows]
    if not dpo and a.pack:  # packed windows are counted only now
        problems = _size_problems(D.sequence_count(train_ex, a.max_seq_length, True),
                                  D.sequence_count(val_ex, a.max_seq_length, True) if val_ex else 0,
                                  a.batch_size, world, what="packed sequence")
        if problems:
            raise Phi3MLXError.many(problems)
    warning = D.truncation_warning(train_ex, a.max_seq_length)
    if warning:
        say(f"phi3mlx: warning: {warning}")
    cfg = lora.apply_adapters(model, {"fine_tune_type": tune, "rank": a.rank, "alpha": a.alpha, "dropout": a.dropout,
                                      "targets": a.targets, "num_layers": a.num_layers})
    local = Path(str(a.model)).expanduser()
    cfg["base_model"] = str(local.resolve()) if local.exists() else str(a.model)  # what fuse loads by default
    if dpo:
        reference = None
        if a.reference_model:
            reference, _ = load(a.reference_model)
            reference.freeze()
        loss_fn = make_dpo_loss(a.beta, a.loss, reference)
        batches = D.iterate_preference_batches(train_ex, a.batch_size, a.max_seq_length, seed=a.seed, loop=True)
        val = (lambda: D.iterate_preference_batches(val_ex, a.batch_size, a.max_seq_length, shuffle=False)) \
            if val_ex else None
    else:
        loss_fn = sft_loss if table is None else make_image_sft_loss(table.rows_for)
        batches = D.iterate_batches(train_ex, a.batch_size, a.max_seq_length, seed=a.seed, loop=True, pack=a.pack,
                                    by_length=not a.mixed_lengths)
        val = (lambda: D.iterate_batches(val_ex, a.batch_size, a.max_seq_length, shuffle=False, pack=a.pack)) \
            if val_ex else None
    if val is not None:
        val()  # its checks raise now, not after the first steps
    info = D.summarize(train_ex)
    n_train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    say(f"{tune}{' (DPO, ' + a.loss + ')' if dpo else ''}: {len(train_ex)} training examples "
        f"({info['tokens']} tokens), {len(val_ex)} validation; {iters} steps of {a.batch_size} x {a.grad_accum}"
        f"{f' over {world} processes' if world > 1 else ''}; {n_train / 1e6:.3f}M trainable parameters")
    out = Path(a.adapter_path)
    if a.force and rank == 0:
        remove_run_files(out, RUN_FILES)
    prog, report = _progress_report(iters, show=rank == 0)
    with prog:
        history = train(model, loss_fn, batches, args, out, cfg, val_batches=val, resume=a.resume, report=report)
    say(f"adapters saved to {a.adapter_path}")
    return history


def run_fuse(a) -> Path:
    """The body of ``phi3mlx fuse``; the base model defaults to the one adapter_config.json records."""
    out = Path(a.save_path)
    check_output(out, a.force)
    base = a.model
    if base is None:
        recorded = lora.read_adapter_config(Path(a.adapter_path)).get("base_model")
        if not recorded:
            raise Phi3MLXError(f"--model is not given and {Path(a.adapter_path) / lora.CONFIG_FILE} records no "
                               "base_model; pass --model")
        base = recorded
    src = resolve(base)
    model, cfg = load_model(src)
    lora.load_adapters(model, a.adapter_path)
    lora.fuse(model, dequantize=a.dequantize or a.export_hf)
    raw = dict(cfg.raw)
    if a.dequantize or a.export_hf:
        raw.pop("quantization", None)
        raw.pop("quantization_config", None)
    weights = mlx_to_folder(cfg.model_type, dict(tree_flatten(model.parameters())))
    mx.eval(list(weights.values()))
    if a.export_hf:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d) / "fused"
            tmp.mkdir()
            save_weights(tmp, weights)
            (tmp / "config.json").write_text(json.dumps(raw, indent=2))
            copy_tokenizer_files(src, tmp)
            export_hf(str(tmp), str(out), force=a.force, show_progress=False)
    else:
        with atomic_dir(out, force=a.force) as tmp:
            save_weights(tmp, weights)
            (tmp / "config.json").write_text(json.dumps(raw, indent=2))
            copy_tokenizer_files(src, tmp)
    print(f"wrote {out} (adapters from {a.adapter_path} merged{', Hugging Face layout' if a.export_hf else ''})",
          file=sys.stderr)
    return out


def _file_problems(out: Path, force: bool) -> list[str]:
    if out.is_dir():
        return [f"--out {out} is a folder"]
    if out.exists() and not force:
        return [f"{out} already exists (pass --force to replace it)"]
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        return [f"cannot create {out}: {parent} is not a folder"]
    return []


def run_corpus(a) -> dict:
    """The body of ``phi3mlx corpus``: checks everything first, writes atomically, prints one summary line."""
    out = Path(a.out)
    if a.corpus == "dialogues":
        problems = [f"--examples must be at least 1, got {a.examples}" if a.examples < 1 else None,
                    f"--valid must be 0 or more, got {a.valid}" if a.valid < 0 else None]
        if out.exists() and not out.is_dir():
            problems.append(f"--out {out} exists and is not a folder")
        elif out.exists() and not a.force:
            problems.append(f"output folder {out} already exists (pass --force to replace it)")
    else:
        problems = _file_problems(out, a.force)
        if a.corpus == "textbook" and a.docs < 1:
            problems.append(f"--docs must be at least 1, got {a.docs}")
    if any(problems):
        raise Phi3MLXError.many(problems)
    if a.corpus == "dialogues":
        rows = chat_dialogues(a.examples + a.valid, seed=a.seed, shares=_shares(a.shares))
        with atomic_dir(out, force=a.force) as tmp:
            write_jsonl(({"messages": m} for m in rows[:a.examples]), tmp / "train.jsonl")
            if a.valid:
                write_jsonl(({"messages": m} for m in rows[a.examples:]), tmp / "valid.jsonl")
        chars = sum(len(m["content"]) for r in rows for m in r)
        info = {"train": a.examples, "valid": a.valid, "chars": chars}
        print(f"wrote {out}: {a.examples} training and {a.valid} validation dialogues, {chars} characters")
        return info
    if a.corpus == "general":
        docs, counts = general_corpus()
        drops = ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("in", "split", "kept"))
        tail = f" (from {counts['in']} docstrings and topics; dropped: {drops})"
    else:
        docs, counts, tail = textbook_documents(a.docs, seed=a.seed), {}, ""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(({"text": d} for d in docs), out)
    chars = sum(map(len, docs))
    print(f"wrote {out}: {len(docs)} documents, {chars} characters{tail}")
    return dict(counts, docs=len(docs), chars=chars)
