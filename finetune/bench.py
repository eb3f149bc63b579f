"""``phi3mlx bench --train`` (``phi3mlx.finetune.bench``): LoRA training speed and peak memory, optionally against mlx-lm's trainer.

``phi3mlx bench --pretrain`` (``run_pretrain_bench``; see the comment block above ``PretrainBenchArgs``): pretraining's
step against a plain MLX loop, with the model FLOPs utilisation.

What runs (the same for both engines, in one process):

* **ours**: ``phi3mlx.finetune`` as ``phi3mlx lora`` uses it: ``lora.apply_adapters``, ``losses.sft_loss``,
  ``data.iterate_batches`` and ``trainer.train``.
* **mlx-lm**: ``mlx_lm.tuner.utils.linear_to_lora_layers`` and ``mlx_lm.tuner.trainer.train`` with its
  ``default_loss``, on the model ``mlx_lm.utils.load_model`` reads from the same folder.

Same settings: rank; mlx-lm's ``scale`` (used as is) = our ``alpha / rank``; the same projections
(our targets, as paths inside a decoder layer, become mlx-lm's ``keys``; the number of adapted layers
is checked to agree); the same last ``num_layers`` layers; dropout 0. Both engines start every run
from the *same* adapter arrays (ours, copied into mlx-lm's model: the parameter names agree), so their
losses must agree step by step; the last step's loss of each is reported. Optimizer: the one our trainer
makes by default (AdamW, weight decay 0, ``trainer.lr_schedule``: cosine decay from ``lr``), a fresh one
for each run of each engine.

Data: ``steps`` batches of ``batch_size`` random sequences of ``seq_len + 1`` token ids from
``numpy.random.default_rng(seed)``. Ours gets them through ``data.iterate_batches`` (every token a
target, no shuffling: inputs ``ids[:, :-1]``, targets ``ids[:, 1:]``); mlx-lm through an
``iterate_batches`` callable yielding ``(ids, lengths)`` with lengths ``(0, seq_len + 1)``, so that its
``default_loss`` masks nothing out. Each step trains ``batch_size * seq_len`` tokens in both.

How the numbers are taken:

* Each run trains ``steps`` steps (``steps >= 2``) from the initial adapters. A timestamp is taken at the
  end of every step (ours: the trainer's ``report`` callback, called every step; mlx-lm: its
  ``TrainingCallback.on_train_loss_report`` with ``steps_per_report=1``), both after the step's
  ``mx.eval``. tokens/s = ``(steps - 1) * batch_size * seq_len`` / (last timestamp - first): the
  steady state, the first step (graph building, mlx-lm's ``mx.compile`` tracing) left out; its time is
  reported as "first step".
* ``repeats`` runs per engine, the order alternating between repeats (A, B, B, A, ...); the best
  tokens/s is reported (the median too).
* peak memory = the engine's own model weights (frozen base + adapters, counted once) + the largest
  extra memory MLX held during the run (activations, gradients, optimizer state), i.e.
  ``mx.get_peak_memory()`` after ``mx.reset_peak_memory()`` minus ``mx.get_active_memory()`` taken just
  before the run (buffer cache cleared, garbage collected). Both models live in one process, so the raw
  process peak would also count the other engine's weights; it is kept as ``process_peak_gb``.
* Gradient checkpointing (``grad_checkpoint`` "both", the default): each engine also runs with its own
  ``--grad-checkpoint``. Ours sets the model instance's ``checkpoint_layers`` flag for the run only.
  mlx-lm's trainer patches its decoder layer *class* (again on every call, nesting); that patch is
  undone after each of its runs, so its runs without checkpointing (and its later runs) are unaffected.
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from phi3mlx.benchkit import (MLX_LM, OURS, MemoryWatch, add_ratio_row, best_and_median, engine_table, first_line,
                              fmt, fmt_gb, params_bytes, progress_printer, ratio, ratio_line, report_console, run_alternating)
from phi3mlx.errors import Phi3MLXError
from phi3mlx.hub import resolve
from phi3mlx.loader import load_model
from phi3mlx.models import parse_config, read_model_config
from phi3mlx.tiny import TINY_ID

from . import data, lora
from .losses import sft_loss
from .pretrain import (MODEL_DEFAULTS, PretrainConfig, init_model, make_pretrain_optimizer,
                       make_schedule, train_args)
from .trainer import TrainArgs, lr_schedule, train

GC = " +gc"  # engine-name suffix of the gradient-checkpointed runs
GRAD_CHECKPOINT_MODES = ("both", "off", "on")


@dataclass
class TrainBenchArgs:
    batch_size: int = 4
    seq_len: int = 256
    steps: int = 10
    repeats: int = 3
    rank: int = 8
    alpha: float = 16.0
    num_layers: int = -1
    targets: Optional[str] = None
    lr: float = 1e-4
    grad_checkpoint: str = "both"
    seed: int = 0

    def check(self) -> None:
        problems = []
        for name in ("batch_size", "seq_len", "repeats", "rank"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be a positive number, got {getattr(self, name)}")
        if self.steps < 2:
            problems.append(f"--steps must be at least 2 (the first step is not timed), got {self.steps}")
        if not self.alpha > 0:
            problems.append(f"--alpha must be a positive number, got {self.alpha}")
        if not self.lr > 0:
            problems.append(f"--lr must be a positive number, got {self.lr}")
        if self.grad_checkpoint not in GRAD_CHECKPOINT_MODES:
            problems.append(f"--grad-checkpoint must be one of {', '.join(GRAD_CHECKPOINT_MODES)}, "
                            f"got {self.grad_checkpoint!r}")
        if problems:
            raise Phi3MLXError.many(problems)


def random_batches(steps: int, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0):
    """(steps, batch_size, seq_len + 1) int32 numpy token ids from ``default_rng(seed)``."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=(steps, batch_size, seq_len + 1),
                                                dtype=np.int32)


@contextlib.contextmanager
def _mlx_lm_class_restored(cls):
    """Undo mlx-lm's grad-checkpoint patch of its layer class's ``__call__`` on exit (its trainer patches the
    class on every call with ``grad_checkpoint``; left alone, later runs would nest checkpoints)."""
    saved = cls.__dict__.get("__call__")
    try:
        yield
    finally:
        if saved is not None:
            cls.__call__ = saved
        elif "__call__" in cls.__dict__:
            del cls.__call__


# ---------------------------------------------------------------- engines


@dataclass
class _Engine:
    name: str
    model: object
    grad_checkpoint: bool
    train_fn: Callable  # (engine, np batches, settings) -> (step end timestamps, step losses, t0)
    initial: list  # the trainable arrays every run starts from
    weights_bytes: int = 0
    adapter_config: dict = field(default_factory=dict)
    runs: List[dict] = field(default_factory=list)

    def reset(self) -> None:
        self.model.update(tree_unflatten(self.initial))
        mx.eval(self.model.parameters())


def _optimizer(s: TrainBenchArgs):
    """What ``trainer.train`` makes by default: AdamW with the warmup + cosine schedule, weight decay 0."""
    return optim.AdamW(learning_rate=lr_schedule(TrainArgs(iters=s.steps, learning_rate=s.lr)), weight_decay=0.0)


def _train_ours(engine: _Engine, ids, s: TrainBenchArgs):
    examples = [(row.tolist(), [1] * len(row)) for batch in ids for row in batch]
    batches = data.iterate_batches(examples, s.batch_size, s.seq_len, shuffle=False)
    args = TrainArgs(iters=s.steps, batch_size=s.batch_size, learning_rate=s.lr, val_every=s.steps,
                     save_every=s.steps, report_every=1, grad_checkpoint=engine.grad_checkpoint, seed=s.seed)
    return _timed_train(lambda out, report: train(engine.model, sft_loss, batches, args, out, engine.adapter_config,
                                                  report=report, optimizer=_optimizer(s)))


def _timed_train(run: Callable) -> tuple[list, list, float]:
    """``run(out_dir, report)`` (our trainer, reporting every step) timed: (step end times, losses, start)."""
    times, losses = [], []

    def report(rec: dict) -> None:
        times.append(time.perf_counter())
        losses.append(rec["loss"])

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        run(Path(out), report)
    return times, losses, t0


def _train_mlx_lm(engine: _Engine, ids, s: TrainBenchArgs):
    # lazy: only --compare-mlx-lm needs mlx-lm, whose import takes seconds (it pulls in transformers)
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs
    from mlx_lm.tuner.trainer import train as mlx_lm_train

    times, losses = [], []
    n_rows, width = ids.shape[1], ids.shape[2]

    class Callback(TrainingCallback):
        def on_train_loss_report(self, info):
            times.append(time.perf_counter())
            losses.append(float(info["train_loss"]))

    def iterate_batches(dataset=None, batch_size=None, max_seq_length=None, loop=False, seed=None, comm_group=None):
        lengths = mx.array([[0, width]] * n_rows)  # offset 0, full length: every target counts
        for batch in ids:
            yield mx.array(batch), lengths

    cls = type(engine.model.layers[0])
    with tempfile.TemporaryDirectory() as out, _mlx_lm_class_restored(cls), \
            contextlib.redirect_stdout(io.StringIO()):  # its progress table
        args = TrainingArgs(batch_size=s.batch_size, iters=s.steps, val_batches=0, steps_per_report=1,
                            steps_per_eval=s.steps + 1, steps_per_save=s.steps + 1, max_seq_length=width,
                            adapter_file=str(Path(out) / "adapters.safetensors"),
                            grad_checkpoint=engine.grad_checkpoint)
        t0 = time.perf_counter()
        try:
            mlx_lm_train(model=engine.model, optimizer=_optimizer(s), train_dataset=list(range(len(ids) * n_rows)),
                  val_dataset=None, args=args, iterate_batches=iterate_batches, training_callback=Callback())
        except Exception as e:
            raise Phi3MLXError(f"mlx-lm failed while training ({first_line(e)})") from None
    return times, losses, t0


def _load_ours(path: Path, s: TrainBenchArgs):
    model, cfg = load_model(path)
    mx.random.seed(s.seed)
    acfg = lora.apply_adapters(model, {"fine_tune_type": "lora", "rank": s.rank, "alpha": s.alpha, "dropout": 0.0,
                                       "targets": s.targets, "num_layers": s.num_layers})
    mx.eval(model.parameters())
    return model, cfg, acfg


def _adapted_keys(model) -> tuple[list[str], int]:
    """Paths of our adapters inside a decoder layer (mlx-lm's ``keys``) and how many adapters there are."""
    keys, n = set(), 0
    for path, m in model.named_modules():
        if isinstance(m, lora.ADAPTER_CLASSES):
            parts = path.split(".")  # model.layers.{i}.rest
            keys.add(".".join(parts[3:]))
            n += 1
    return sorted(keys), n


def _load_mlx_lm(path: Path, s: TrainBenchArgs, keys: list[str], n_ours: int, n_layers: int):
    try:  # lazy, as in _train_mlx_lm
        import mlx_lm.utils
        from mlx_lm.tuner.utils import linear_to_lora_layers
    except Exception as e:
        raise Phi3MLXError(f"--compare-mlx-lm needs mlx-lm, which cannot be imported ({first_line(e)})") from None
    try:
        model, _ = mlx_lm.utils.load_model(Path(path))
    except Exception as e:
        raise Phi3MLXError(f"mlx-lm cannot load {path} ({first_line(e)})") from None
    model.freeze()
    num_layers = n_layers if s.num_layers in (None, -1) else s.num_layers
    try:
        linear_to_lora_layers(model, num_layers, {"rank": s.rank, "scale": s.alpha / s.rank, "dropout": 0.0,
                                                  "keys": keys})
    except Exception as e:
        raise Phi3MLXError(f"mlx-lm cannot add LoRA layers ({first_line(e)})") from None
    n = sum(1 for _, m in model.named_modules() if hasattr(m, "lora_a"))
    if n != n_ours:
        raise Phi3MLXError(f"mlx-lm adapted {n} layers with keys {', '.join(keys)}, phi3mlx {n_ours}: the settings "
                           "would not be the same")
    return model


def _timed_run(engine: _Engine, ids, s: TrainBenchArgs) -> dict:
    engine.reset()
    with MemoryWatch(collect=True) as mem:
        times, losses, t0 = engine.train_fn(engine, ids, s)
    if len(times) != s.steps:
        raise Phi3MLXError(f"{engine.name} reported {len(times)} of {s.steps} steps")
    steady = times[-1] - times[0]
    tokens = (s.steps - 1) * s.batch_size * s.seq_len
    return {
        "tokens_per_sec": tokens / max(steady, 1e-9),
        "step_s": steady / (s.steps - 1),
        "first_step_s": times[0] - t0,
        "peak_gb": mem.peak_gb(engine.weights_bytes),
        "process_peak_gb": mem.process_peak_gb,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def _summary(engine: _Engine) -> dict:
    runs = engine.runs
    best, median = best_and_median(r["tokens_per_sec"] for r in runs)
    return {
        "tokens_per_sec": best,
        "tokens_per_sec_median": median,
        "step_s": min(r["step_s"] for r in runs),
        "first_step_s": min(r["first_step_s"] for r in runs),
        "peak_gb": max(r["peak_gb"] for r in runs),
        "process_peak_gb": max(r["process_peak_gb"] for r in runs),
        "weights_gb": engine.weights_bytes / 1e9,
        "grad_checkpoint": engine.grad_checkpoint,
        "first_loss": runs[0]["first_loss"],
        "last_loss": runs[0]["last_loss"],
        "runs": runs,
    }


# ---------------------------------------------------------------- public API


def run_train_bench(model_path, settings: Optional[TrainBenchArgs] = None, compare_mlx_lm: bool = False, *,
                    progress: Optional[Callable[[str], None]] = None) -> dict:
    """Benchmark LoRA training on a model folder (or hub id / ``phi3mlx:tiny``); return the numbers.

    Result keys: ``path``, ``device``, ``settings`` (a dict of ``TrainBenchArgs``), ``tokens_per_step``,
    ``trainable_params``, ``mlx_lm_keys``, ``engines`` (name -> ``tokens_per_sec`` (best),
    ``tokens_per_sec_median``, ``step_s``, ``first_step_s``, ``peak_gb``, ``process_peak_gb``,
    ``weights_gb``, ``grad_checkpoint``, ``first_loss``, ``last_loss``, ``runs``; names "phi3mlx",
    "mlx-lm" and with " +gc" the gradient-checkpointed runs), ``ratio_tps`` / ``ratio_peak`` (ours /
    mlx-lm without checkpointing; None without ``compare_mlx_lm``), ``ratio_tps_gc`` / ``ratio_peak_gc``
    (the same with it), ``gc_peak_ratio`` (ours with / without checkpointing) and ``warnings``.
    """
    s = settings or TrainBenchArgs()
    s.check()
    say = progress or (lambda msg: None)
    path = resolve(model_path)
    cfg = read_model_config(path)
    warnings = []
    if str(model_path) == TINY_ID:
        warnings.append(f"{TINY_ID} is a 2-layer toy: its numbers say little about real training; pass --model FOLDER")
    if s.seq_len + 1 > cfg.context_length:
        raise Phi3MLXError(f"--seq-len {s.seq_len} (+1) is longer than the model's context "
                           f"({cfg.context_length} tokens)")
    window = getattr(cfg, "sliding_window", None)
    if compare_mlx_lm and window and s.seq_len > window:
        warnings.append(f"--seq-len {s.seq_len} exceeds the sliding window ({window}), which phi3mlx applies "
                        "and mlx-lm's phi3 does not: the engines compute different attention")

    say(f"loading {path} (phi3mlx)")
    model, _cfg, acfg = _load_ours(path, s)
    n_layers = len(model.model.layers)
    keys, n_adapters = _adapted_keys(model)
    initial = tree_flatten(model.trainable_parameters())
    trainable = sum(v.size for _, v in initial)
    modes = {"both": (False, True), "off": (False,), "on": (True,)}[s.grad_checkpoint]
    engines = [_Engine(OURS + (GC if g else ""), model, g, _train_ours, initial, params_bytes(model), acfg)
               for g in modes]
    loss_note = None
    if compare_mlx_lm:
        say(f"loading {path} (mlx-lm)")
        ref = _load_mlx_lm(path, s, keys, n_adapters, n_layers)
        theirs = dict(tree_flatten(ref.trainable_parameters()))
        ours_shapes = {k: tuple(v.shape) for k, v in initial}
        if {k: tuple(v.shape) for k, v in theirs.items()} == ours_shapes:
            ref_initial = initial  # the same starting adapters: the losses must agree
        else:
            ref_initial = list(theirs.items())
            loss_note = "mlx-lm's adapter arrays differ in name or shape from ours: started from its own"
            warnings.append(loss_note)
        for g in modes:
            engines.append(_Engine(MLX_LM + (GC if g else ""), ref, g, _train_mlx_lm, ref_initial, params_bytes(ref)))
        # order: ours, mlx-lm, ours +gc, mlx-lm +gc
        engines.sort(key=lambda e: (e.grad_checkpoint, e.name.startswith(MLX_LM)))

    ids = random_batches(s.steps, s.batch_size, s.seq_len, cfg.vocab_size, s.seed)
    run_alternating(engines, s.repeats, lambda e: _timed_run(e, ids, s), say)
    for e in engines:
        e.reset()

    res = {e.name: _summary(e) for e in engines}

    def engines_ratio(key, a, b):
        return ratio(res[a][key], res[b][key]) if a in res and b in res else None

    return {
        "path": str(path),
        "device": str(mx.default_device()),
        "settings": dict(vars(s)),
        "tokens_per_step": s.batch_size * s.seq_len,
        "trainable_params": trainable,
        "adapted_layers": n_adapters,
        "mlx_lm_keys": keys,
        "mlx_lm_scale": s.alpha / s.rank,
        "engines": res,
        "ratio_tps": engines_ratio("tokens_per_sec", OURS, MLX_LM),
        "ratio_peak": engines_ratio("peak_gb", OURS, MLX_LM),
        "ratio_tps_gc": engines_ratio("tokens_per_sec", OURS + GC, MLX_LM + GC),
        "ratio_peak_gc": engines_ratio("peak_gb", OURS + GC, MLX_LM + GC),
        "gc_peak_ratio": engines_ratio("peak_gb", OURS + GC, OURS),
        "gc_tps_ratio": engines_ratio("tokens_per_sec", OURS + GC, OURS),
        "loss_note": loss_note,
        "warnings": warnings,
    }


def format_ratio_line(res: dict) -> str:
    return ratio_line("train ratio", [("tokens/s", res["ratio_tps"]), ("peak memory", res["ratio_peak"])])


def print_report(res: dict, console=None) -> None:
    console = console or report_console()
    s = res["settings"]
    console.print(f"model: {res['path']}")
    console.print(f"device: {res['device']}")
    console.print(f"LoRA rank {s['rank']}, alpha {s['alpha']:g} (mlx-lm scale {res['mlx_lm_scale']:g}), "
                  f"{res['adapted_layers']} adapted projections ({', '.join(res['mlx_lm_keys'])}), "
                  f"{res['trainable_params'] / 1e6:.3f}M trainable parameters")
    console.print(f"training: {s['steps']} steps of {s['batch_size']} x {s['seq_len']} random tokens (seed {s['seed']}), "
                  f"AdamW lr {s['lr']:g} cosine; tokens/s over steps 2..{s['steps']}; best of {s['repeats']} run(s) "
                  "per engine, engines alternating")
    for w in res["warnings"]:
        console.print(f"warning: {w}")

    table = engine_table(("engine", "tok/s", "median", "step s", "1st step s", "peak GB", "loss"))
    for name, r in res["engines"].items():
        table.add_row(name, fmt(r["tokens_per_sec"]), fmt(r["tokens_per_sec_median"]), fmt(r["step_s"], ".3f"),
                      fmt(r["first_step_s"], ".2f"), fmt_gb(r["peak_gb"]), fmt(r["last_loss"], ".4f"))
    for label, tps, peak in (("ours / mlx-lm", res["ratio_tps"], res["ratio_peak"]),
                             ("ours/mlx-lm +gc", res["ratio_tps_gc"], res["ratio_peak_gc"]),
                             ("ours +gc / ours", res["gc_tps_ratio"], res["gc_peak_ratio"])):
        if tps is not None:
            add_ratio_row(table, label, fmt(tps, ".2f", "x"), "", "", "", fmt(peak, ".2f", "x"), "")
    console.print(table)
    console.print("+gc: with gradient checkpointing; tok/s: best run, median: median run; step s: mean steady step of "
                  "the best run; 1st step s: graph building / compile included")
    # Plain, grep-friendly lines.
    for name, r in res["engines"].items():
        console.print(f"{name} train {fmt(r['tokens_per_sec'])} tok/s peak {fmt_gb(r['peak_gb'])} GB "
                      f"loss {fmt(r['first_loss'], '.4f')} -> {fmt(r['last_loss'], '.4f')}")
    if res["gc_peak_ratio"] is not None:
        e = res["engines"]
        console.print(f"grad checkpoint phi3mlx peak {fmt_gb(e[OURS]['peak_gb'])} GB -> "
                      f"{fmt_gb(e[OURS + GC]['peak_gb'])} GB ({fmt(res['gc_peak_ratio'], '.2f', 'x')}), "
                      f"tokens/s {fmt(res['gc_tps_ratio'], '.2f', 'x')}")
    if res["ratio_tps"] is not None:
        console.print(format_ratio_line(res))
    if res["ratio_tps_gc"] is not None:
        console.print(ratio_line("train ratio with grad checkpoint", [("tokens/s", res["ratio_tps_gc"]),
                                                                      ("peak memory", res["ratio_peak_gc"])]))


# ---------------------------------------------------------------- CLI


def add_train_args(p) -> None:
    """The ``phi3mlx bench`` flags of the training benchmark (``--train``)."""
    g = p.add_argument_group("training benchmark (--train; uses --model, --repeats, --seed, --compare-mlx-lm; "
                             "--batch-size, --seq-len, --steps and --lr apply to --pretrain too)")
    g.add_argument("--train", action="store_true",
                   help="benchmark LoRA training (tokens/s, peak memory) instead of generation; with "
                   "--compare-mlx-lm against mlx-lm's trainer on the same batches and settings")
    g.add_argument("--batch-size", type=int, default=None,
                   help="sequences per step (default: 4; 16 with --pretrain)")
    g.add_argument("--seq-len", type=int, default=None,
                   help="trained tokens per sequence (default: 256; 128 with --pretrain)")
    g.add_argument("--steps", type=int, default=10, help="steps per run (the first is not timed)")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank")
    g.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (mlx-lm's scale = alpha / rank)")
    g.add_argument("--num-layers", type=int, default=-1, help="adapt the last N layers (-1: all)")
    g.add_argument("--targets", default=None, help="comma-separated projections (default: phi3mlx lora's)")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 1e-4, AdamW, cosine; with --pretrain 3e-3, pretrain's)")
    g.add_argument("--grad-checkpoint", choices=GRAD_CHECKPOINT_MODES, default="both",
                   help="run without and with gradient checkpointing, or only one of them")


def main(args) -> None:
    """``phi3mlx bench --train``."""
    if getattr(args, "adapter_path", None):
        raise Phi3MLXError("--adapter-path does not apply to --train (the benchmark trains fresh adapters)")
    d = TrainBenchArgs()
    s = TrainBenchArgs(batch_size=d.batch_size if args.batch_size is None else args.batch_size,
                       seq_len=d.seq_len if args.seq_len is None else args.seq_len, steps=args.steps,
                       repeats=args.repeats, rank=args.rank, alpha=args.alpha, num_layers=args.num_layers,
                       targets=args.targets, lr=d.lr if args.lr is None else args.lr,
                       grad_checkpoint=args.grad_checkpoint, seed=args.seed)
    print_report(run_train_bench(args.model, s, compare_mlx_lm=args.compare_mlx_lm, progress=progress_printer()))


# ================================================================ phi3mlx bench --pretrain
#
# Our pretraining step against a plain MLX training loop on the same model, weights and batches.
#
# * **phi3mlx**: what ``phi3mlx pretrain`` runs, minus the data pipeline: the model built and initialised
#   by ``pretrain.init_model`` (``parse_config``, ``build_model``, ``mup.init_params``), the
#   optimizer of ``pretrain.make_pretrain_optimizer`` (``mup.make_optimizer``: AdamW in decay groups, the
#   run's warmup + wsd schedule), the settings of ``pretrain.train_args`` (gradient clipping to 1.0, no
#   accumulation) and ``trainer.train`` itself with ``losses.sft_loss`` (its compiled step, a report every
#   step, which also appends a line to metrics.jsonl: counted, ~0.5 ms a step; the checkpoint at the end goes
#   to a temporary folder and is not timed).
# * **plain mlx**: the textbook MLX loop: ``nn.value_and_grad`` of a mean cross-entropy, a step function
#   compiled with the model's and optimizer's state as implicit inputs and outputs that computes the
#   gradient and applies it, one ``optim.AdamW`` (the same learning-rate schedule and weight decay, decay
#   on every parameter, no clipping), ``mx.eval`` of the state after every step. Its optimizer state is
#   initialised before the step is compiled (as our trainer does): otherwise the second call would trace
#   again, its state tree having grown, and the timed steps would hold a compile.
#
# Both start each run from the same initial arrays (copied into each engine's own model instance) on the
# same batches, so their first-step losses must agree. tokens/s, peak memory, best/median over alternating
# repeats: as ``--train`` (``_timed_run`` / ``_summary``, ``benchkit``).
#
# MFU (model FLOPs utilisation) = tokens/s x training FLOPs per token / peak FLOP/s, with FLOPs per token =
# 6 x matmul parameters (every matrix except the input embedding; stacked MoE experts counted at
# top-k / experts; a tied output layer counted once more) + 12 x layers x width x seq_len (attention
# scores and values, PaLM's appendix B). The peak is measured in this process: a square float32 matmul,
# doubled in size from 256 until one takes 50 ms (at most 2048), best of 3 timed runs.

PLAIN = "plain mlx"
PRETRAIN_MODEL_TYPES = ("phi3", "phimoe", "phi3small")
LOSS_TOLERANCE = 1e-3  # first-step losses of the two engines must agree within this
PEAK_MATMUL_MAX = 2048
_BASE_WIDTH = 256  # the width of pretrain's architecture defaults; the MLP size scales from there
_MLP_KEY = {"phi3": "intermediate_size", "phimoe": "intermediate_size", "phi3small": "ff_intermediate_size"}


@dataclass
class PretrainBenchArgs:
    model_type: str = "phi3"
    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp: Optional[int] = None  # None: the architecture's ratio to the width (phi3: 2 x width = 512)
    vocab: int = 1024
    batch_size: int = 16
    seq_len: int = 128
    steps: int = 10
    repeats: int = 3
    lr: float = 3e-3
    seed: int = 0

    def mlp_size(self) -> int:
        if self.mlp is not None:
            return self.mlp
        key = _MLP_KEY.get(self.model_type, "intermediate_size")
        default = MODEL_DEFAULTS.get(self.model_type, {}).get(key, 2 * _BASE_WIDTH)
        return max(1, round(default * self.width / _BASE_WIDTH))

    def problems(self) -> list[str]:
        problems = []
        if self.model_type not in PRETRAIN_MODEL_TYPES:
            problems.append(f"--model-type must be one of {', '.join(PRETRAIN_MODEL_TYPES)}, got {self.model_type!r}")
        for name in ("width", "layers", "heads", "vocab", "batch_size", "seq_len", "repeats"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be a positive number, got {getattr(self, name)}")
        if self.mlp is not None and self.mlp <= 0:
            problems.append(f"--mlp must be a positive number, got {self.mlp}")
        if self.steps < 2:
            problems.append(f"--steps must be at least 2 (the first step is not timed), got {self.steps}")
        if self.width > 0 and self.heads > 0 and self.width % self.heads:
            problems.append(f"--width {self.width} is not divisible by --heads {self.heads}")
        positions = MODEL_DEFAULTS.get(self.model_type, {}).get("max_position_embeddings", 2048)
        if self.seq_len > positions:
            problems.append(f"--seq-len {self.seq_len} is longer than the benchmark model's {positions} positions")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"--lr must be a positive number, got {self.lr}")
        return problems

    def config(self) -> PretrainConfig:
        """The pretraining config of this benchmark: pretrain's defaults (lr schedule, weight decay, gradient
        clipping, init) with the sizes given."""
        model = {"model_type": self.model_type, "hidden_size": self.width, "num_hidden_layers": self.layers,
                 "num_attention_heads": self.heads, _MLP_KEY[self.model_type]: self.mlp_size(),
                 "vocab_size": self.vocab}
        return PretrainConfig(out="", model=model, seq_len=self.seq_len, batch_size=self.batch_size, grad_accum=1,
                              lr=self.lr, seed=self.seed)


def matmul_params(model, raw: dict) -> int:
    """Parameters that take part in a matmul per token: every matrix except the input embedding (stacked
    experts at top-k / experts; a tied output layer, which is the embedding, counted once more)."""
    n = 0
    for path, v in tree_flatten(model.parameters()):
        if v.ndim < 2 or path.startswith("model.embed_tokens."):
            continue
        if v.ndim == 3:  # (experts, out, in): each token goes through top-k of them
            n += v.size * int(raw.get("num_experts_per_tok", v.shape[0])) // v.shape[0]
        else:
            n += v.size
    if raw.get("tie_word_embeddings"):
        n += int(raw["vocab_size"]) * int(raw["hidden_size"])
    return n


def train_flops_per_token(n_matmul: int, layers: int, width: int, seq_len: int) -> int:
    """6 N + 12 L W S: forward and backward of the matmuls and of attention (PaLM, appendix B)."""
    return 6 * n_matmul + 12 * layers * width * seq_len


def measure_matmul_peak(max_n: int = PEAK_MATMUL_MAX, min_s: float = 0.05, runs: int = 3) -> dict:
    """The measured matmul peak: FLOP/s of a square float32 matmul (best of ``runs``), its size doubled
    from 256 until one matmul takes ``min_s`` seconds or the size reaches ``max_n``."""
    n, best = 256, None
    while True:
        key_a, key_b = mx.random.split(mx.random.key(0))
        a, b = mx.random.normal((n, n), key=key_a), mx.random.normal((n, n), key=key_b)
        mx.eval(a, b)
        mx.eval(a @ b)  # warm-up
        best = None
        for _ in range(runs):
            t = time.perf_counter()
            mx.eval(a @ b)
            dt = time.perf_counter() - t
            best = dt if best is None else min(best, dt)
        del a, b
        if best >= min_s or n >= max_n:
            break
        n *= 2
    return {"flops": 2 * n ** 3 / max(best, 1e-9), "size": n, "seconds": best, "runs": runs}


def _copy(arrays: list) -> list:
    out = [(k, mx.array(v)) for k, v in arrays]
    mx.eval([v for _, v in out])
    return out


class _NoStore:
    """The benchmark's checkpoints hold nothing (the optimizer state the trainer writes goes to a temporary folder)."""

    def save(self, folder, model) -> None:
        pass

    def restore(self, folder, model) -> None:
        pass

    def publish(self, out_dir, model) -> None:
        pass


def _pretrain_ours(c: PretrainConfig, steps: int):
    def run(engine: _Engine, batches: list, s: PretrainBenchArgs):
        args = train_args(c, [steps])
        args.val_every = args.save_every = steps
        args.report_every = 1
        optimizer = make_pretrain_optimizer(c, steps, None)
        return _timed_train(lambda out, report: train(engine.model, sft_loss, iter(batches), args, out, {},
                                                      report=report, optimizer=optimizer, store=_NoStore()))

    return run


def _plain_loss(model, inputs, targets):
    return nn.losses.cross_entropy(model(inputs), targets, reduction="mean")


def _pretrain_plain(c: PretrainConfig, steps: int):
    def run(engine: _Engine, batches: list, s: PretrainBenchArgs):
        model = engine.model
        model.train()
        optimizer = optim.AdamW(learning_rate=make_schedule(c, steps), weight_decay=c.weight_decay)
        loss_and_grad = nn.value_and_grad(model, _plain_loss)
        optimizer.init(model.trainable_parameters())  # else the second call would trace again (new state arrays)
        state = [model.state, optimizer.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(inputs, targets):
            loss, grads = loss_and_grad(model, inputs, targets)
            optimizer.update(model, grads)
            return loss

        times, losses = [], []
        t0 = time.perf_counter()
        for inputs, targets, _mask in batches:
            loss = step(inputs, targets)
            mx.eval(state)
            losses.append(loss.item())
            times.append(time.perf_counter())
        return times, losses, t0

    return run


def run_pretrain_bench(settings: Optional[PretrainBenchArgs] = None, *,
                       progress: Optional[Callable[[str], None]] = None) -> dict:
    """Benchmark our pretraining step against a plain MLX loop; return the numbers.

    Result keys: ``device``, ``settings`` (a dict of ``PretrainBenchArgs``), ``model`` (config.json of the
    model), ``params``, ``matmul_params``, ``flops_per_token``, ``tokens_per_step``, ``peak`` (``flops``,
    ``size``, ``seconds``, ``runs``, ``source``), ``engines`` (name -> the ``--train`` summary plus
    ``mfu``; names "phi3mlx" and "plain mlx"), ``ratio_tps`` / ``ratio_peak`` (ours / plain),
    ``loss_diff`` (first-step losses) and ``warnings``.
    """
    s = settings or PretrainBenchArgs()
    problems = s.problems()
    if problems:
        raise Phi3MLXError.many(problems)
    c = s.config()
    raw = c.model_dict(vocab_size=s.vocab)
    parse_config(raw, f"the {s.model_type} model of --width/--layers/--heads/--mlp/--vocab")  # its own checks
    say = progress or (lambda msg: None)

    say(f"building a {s.model_type} model ({s.layers} layers, width {s.width})")
    ours_model, _ = init_model(raw, c.base_width if c.mup else None, c.init_std, c.seed)
    initial = tree_flatten(ours_model.parameters())
    # its own instance; its weights are replaced below
    plain_model, _ = init_model(raw, c.base_width if c.mup else None, c.init_std, c.seed)
    n_params = sum(v.size for _, v in initial)
    n_matmul = matmul_params(ours_model, raw)
    flops_tok = train_flops_per_token(n_matmul, s.layers, s.width, s.seq_len)
    engines = [_Engine(OURS, ours_model, False, _pretrain_ours(c, s.steps), _copy(initial), params_bytes(ours_model)),
               _Engine(PLAIN, plain_model, False, _pretrain_plain(c, s.steps), _copy(initial),
                       params_bytes(plain_model))]
    del initial

    ids = random_batches(s.steps, s.batch_size, s.seq_len, s.vocab, s.seed)
    batches = [(mx.array(b[:, :-1]), mx.array(b[:, 1:]), mx.ones((s.batch_size, s.seq_len), dtype=mx.float32))
               for b in ids]
    mx.eval(batches)
    run_alternating(engines, s.repeats, lambda e: _timed_run(e, batches, s), say)
    for e in engines:
        e.reset()

    say("measuring the matmul peak")
    peak = measure_matmul_peak()
    peak["source"] = (f"measured matmul peak ({peak['size']}x{peak['size']} float32 matmul, best of "
                      f"{peak['runs']} in this process)")
    res = {e.name: _summary(e) for e in engines}
    for r in res.values():
        r.pop("grad_checkpoint", None)
        r["mfu"] = r["tokens_per_sec"] * flops_tok / peak["flops"] if r["tokens_per_sec"] else None
        r["achieved_gflops"] = r["tokens_per_sec"] * flops_tok / 1e9 if r["tokens_per_sec"] else None
    warnings = []
    diff = abs(res[OURS]["first_loss"] - res[PLAIN]["first_loss"])
    if not diff <= LOSS_TOLERANCE:
        warnings.append(f"THE FIRST-STEP LOSSES DIFFER: phi3mlx {res[OURS]['first_loss']:.6f}, plain "
                        f"{res[PLAIN]['first_loss']:.6f} (|difference| {diff:.2e} > {LOSS_TOLERANCE:g}): the engines "
                        "do not train the same model on the same batches")
    return {
        "device": str(mx.default_device()),
        "settings": dict(vars(s), mlp=s.mlp_size()),
        "model": raw,
        "params": n_params,
        "matmul_params": n_matmul,
        "flops_per_token": flops_tok,
        "tokens_per_step": s.batch_size * s.seq_len,
        "train": {"lr": c.lr, "schedule": c.schedule, "warmup": min(c.warmup, s.steps), "weight_decay": c.weight_decay,
                  "grad_clip": c.grad_clip},
        "peak": peak,
        "engines": res,
        "ratio_tps": ratio(res[OURS]["tokens_per_sec"], res[PLAIN]["tokens_per_sec"]),
        "ratio_peak": ratio(res[OURS]["peak_gb"], res[PLAIN]["peak_gb"]),
        "loss_diff": diff,
        "warnings": warnings,
    }


def print_pretrain_report(res: dict, console=None) -> None:
    console = console or report_console()
    s, t, peak = res["settings"], res["train"], res["peak"]
    console.print(f"device: {res['device']}")
    console.print(f"model: {s['model_type']}, {s['layers']} layers, width {s['width']}, {s['heads']} heads, MLP "
                  f"{s['mlp']}, vocab {s['vocab']}: {res['params'] / 1e6:.3f}M parameters, "
                  f"{res['matmul_params'] / 1e6:.3f}M in matmuls; {res['flops_per_token'] / 1e6:.2f} MFLOP "
                  f"per trained token (6 N + 12 L W S)")
    console.print(f"training: {s['steps']} steps of {s['batch_size']} x {s['seq_len']} random tokens (seed {s['seed']}), "
                  f"lr {t['lr']:g} ({t['schedule']}, warmup {t['warmup']}), weight decay {t['weight_decay']:g}; "
                  f"phi3mlx: pretrain's optimizer groups and grad clip {t['grad_clip']:g}; plain: one AdamW, no clip; "
                  f"tokens/s over steps 2..{s['steps']}; best of {s['repeats']} run(s) per engine, engines alternating")
    console.print(f"peak: {peak['source']}: {peak['flops'] / 1e9:.1f} GFLOP/s")
    for w in res["warnings"]:
        console.print(f"warning: {w}")

    table = engine_table(("engine", "tok/s", "median", "step s", "1st s", "peak GB", "MFU", "loss 1"))
    for name, r in res["engines"].items():
        table.add_row(name, fmt(r["tokens_per_sec"]), fmt(r["tokens_per_sec_median"]), fmt(r["step_s"], ".3f"),
                      fmt(r["first_step_s"], ".2f"), fmt_gb(r["peak_gb"]),
                      fmt(None if r["mfu"] is None else 100 * r["mfu"], ".1f", "%"), fmt(r["first_loss"], ".4f"))
    add_ratio_row(table, "ours / plain", fmt(res["ratio_tps"], ".2f", "x"), "", "", "",
                  fmt(res["ratio_peak"], ".2f", "x"), "", "")
    console.print(table)
    console.print("tok/s: best run, median: median run; step s: mean steady step of the best run; 1st s: the first "
                  "step, compile included; MFU: best tok/s x FLOPs per token / the measured matmul peak; loss 1: "
                  "the first step's loss")
    # Plain, grep-friendly lines.
    for name, r in res["engines"].items():
        console.print(f"{name} pretrain {fmt(r['tokens_per_sec'])} tok/s peak {fmt_gb(r['peak_gb'])} GB "
                      f"mfu {fmt(r['mfu'], '.4f')} loss {fmt(r['first_loss'], '.6f')} -> {fmt(r['last_loss'], '.6f')}")
    console.print(ratio_line("pretrain ratio", [("tokens/s", res["ratio_tps"]), ("peak memory", res["ratio_peak"])]))


def add_pretrain_args(p) -> None:
    """The ``phi3mlx bench`` flags of the pretraining benchmark (``--pretrain``)."""
    g = p.add_argument_group("pretraining benchmark (--pretrain; uses --batch-size, --seq-len, --steps, --lr, "
                             "--repeats, --seed)")
    g.add_argument("--pretrain", action="store_true",
                   help="benchmark phi3mlx pretrain's training step (tokens/s, peak memory, MFU) against a plain "
                   "MLX training loop on the same model and batches")
    g.add_argument("--model-type", choices=PRETRAIN_MODEL_TYPES, default="phi3", help="architecture")
    g.add_argument("--width", type=int, default=256, help="hidden size")
    g.add_argument("--layers", type=int, default=4, help="decoder layers")
    g.add_argument("--heads", type=int, default=4, help="attention heads")
    g.add_argument("--mlp", type=int, default=None,
                   help="MLP hidden size (default: pretrain's ratio to the width; phi3: 2 x width)")
    g.add_argument("--vocab", type=int, default=1024, help="vocabulary size")


def main_pretrain(args) -> None:
    """``phi3mlx bench --pretrain``."""
    problems = []
    if getattr(args, "train", False):
        problems.append("--train and --pretrain exclude each other")
    for flag in ("compare_mlx_lm", "adapter_path"):
        if getattr(args, flag, None):
            problems.append(f"--{flag.replace('_', '-')} does not apply to --pretrain (it compares against a plain "
                            "MLX loop on a model built from --width, --layers, ...)")
    if problems:
        raise Phi3MLXError.many(problems)
    d = PretrainBenchArgs()
    s = PretrainBenchArgs(model_type=args.model_type, width=args.width, layers=args.layers, heads=args.heads,
                          mlp=args.mlp, vocab=args.vocab, steps=args.steps, repeats=args.repeats, seed=args.seed,
                          batch_size=d.batch_size if args.batch_size is None else args.batch_size,
                          seq_len=d.seq_len if args.seq_len is None else args.seq_len,
                          lr=d.lr if args.lr is None else args.lr)
    print_pretrain_report(run_pretrain_bench(s, progress=progress_printer()))
