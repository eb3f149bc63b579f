"""``phi3mlx bench --train`` (``phi3mlx.finetune.bench``): LoRA training speed and peak memory, optionally against mlx-lm's trainer.

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
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from phi3mlx.benchkit import (MLX_LM, OURS, MemoryWatch, add_ratio_row, best_and_median, engine_table, first_line,
                              fmt, params_bytes, progress_printer, ratio, ratio_line, report_console, run_alternating)
from phi3mlx.errors import Phi3MLXError
from phi3mlx.hub import resolve
from phi3mlx.loader import load_model
from phi3mlx.models import read_model_config
from phi3mlx.tiny import TINY_ID

from . import data, lora
from .losses import sft_loss
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
    times, losses = [], []

    def report(rec: dict) -> None:
        times.append(time.perf_counter())
        losses.append(rec["loss"])

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        train(engine.model, sft_loss, batches, args, Path(out), engine.adapter_config, report=report,
              optimizer=_optimizer(s))
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
                      fmt(r["first_step_s"], ".2f"), fmt(r["peak_gb"], ".3f"), fmt(r["last_loss"], ".4f"))
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
        console.print(f"{name} train {fmt(r['tokens_per_sec'])} tok/s peak {fmt(r['peak_gb'], '.3f')} GB "
                      f"loss {fmt(r['first_loss'], '.4f')} -> {fmt(r['last_loss'], '.4f')}")
    if res["gc_peak_ratio"] is not None:
        e = res["engines"]
        console.print(f"grad checkpoint phi3mlx peak {fmt(e[OURS]['peak_gb'], '.3f')} GB -> "
                      f"{fmt(e[OURS + GC]['peak_gb'], '.3f')} GB ({fmt(res['gc_peak_ratio'], '.2f', 'x')}), "
                      f"tokens/s {fmt(res['gc_tps_ratio'], '.2f', 'x')}")
    if res["ratio_tps"] is not None:
        console.print(format_ratio_line(res))
    if res["ratio_tps_gc"] is not None:
        console.print(ratio_line("train ratio with grad checkpoint", [("tokens/s", res["ratio_tps_gc"]),
                                                                      ("peak memory", res["ratio_peak_gc"])]))


# ---------------------------------------------------------------- CLI


def add_train_args(p) -> None:
    """The ``phi3mlx bench`` flags of the training benchmark (``--train``)."""
    g = p.add_argument_group("training benchmark (--train; uses --model, --repeats, --seed, --compare-mlx-lm)")
    g.add_argument("--train", action="store_true",
                   help="benchmark LoRA training (tokens/s, peak memory) instead of generation; with "
                   "--compare-mlx-lm against mlx-lm's trainer on the same batches and settings")
    g.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    g.add_argument("--seq-len", type=int, default=256, help="trained tokens per sequence")
    g.add_argument("--steps", type=int, default=10, help="steps per run (the first is not timed)")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank")
    g.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (mlx-lm's scale = alpha / rank)")
    g.add_argument("--num-layers", type=int, default=-1, help="adapt the last N layers (-1: all)")
    g.add_argument("--targets", default=None, help="comma-separated projections (default: phi3mlx lora's)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW, cosine)")
    g.add_argument("--grad-checkpoint", choices=GRAD_CHECKPOINT_MODES, default="both",
                   help="run without and with gradient checkpointing, or only one of them")


def main(args) -> None:
    """``phi3mlx bench --train``."""
    if getattr(args, "adapter_path", None):
        raise Phi3MLXError("--adapter-path does not apply to --train (the benchmark trains fresh adapters)")
    s = TrainBenchArgs(batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps, repeats=args.repeats,
                       rank=args.rank, alpha=args.alpha, num_layers=args.num_layers, targets=args.targets,
                       lr=args.lr, grad_checkpoint=args.grad_checkpoint, seed=args.seed)
    print_report(run_train_bench(args.model, s, compare_mlx_lm=args.compare_mlx_lm, progress=progress_printer()))
