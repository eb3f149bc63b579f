"""One trainer for LoRA/DoRA/full fine-tuning, DPO and pretraining: the loss and the batches are arguments.

``train(model, loss_fn, batches, args, out_dir, ...)`` runs ``args.iters`` optimizer steps. Each step
takes ``args.grad_accum`` micro-batches from ``batches``; ``loss_fn(model, batch)`` returns
``(loss, ntokens)`` or ``(loss, ntokens, metrics)`` with ``loss`` the mean over the batch's ``ntokens``
tokens. The accumulated update equals one step on the union of the micro-batches: gradients and
losses are weighted by their token counts and divided by the total.

Learning rate: linear warmup over ``args.warmup`` steps, then cosine decay to
``args.learning_rate * args.min_lr_ratio`` at ``args.iters``. AdamW (``args.weight_decay``). With
``args.grad_clip`` the accumulated gradient is scaled down to that global norm before the update.

Compiled (``args.compile``, the default): each micro-batch's forward and backward pass, the token
weighting and, on a step's last micro-batch, the update itself (gradient sum, clipping, optimizer)
run as one ``mx.compile``d function whose state (the model's arrays, the optimizer's state and the
random state) is its implicit input and output, as mlx-lm's trainer does. A loss with Python side
effects (counters, prints) needs ``compile=False``, which runs the same function uncompiled.

Gradient checkpointing (``args.grad_checkpoint``) sets the model's ``checkpoint_layers`` flag for the
run (each decoder layer's activations are recomputed in the backward pass) and restores it after.

Data parallel: launched as several processes (``mlx.launch -n N ...``, or across Macs), each process
takes its share of every micro-batch's rows (as even as possible: a batch of 5 on 2 processes gives 3
and 2), and gradients, losses and token counts are summed over the processes before the update, so N
processes train exactly as one process with the same global batch (for a loss that is a mean over
tokens, as SFT's). A micro-batch needs at least one row per process. Only the first process writes
checkpoints, metrics and reports.

Checkpoints (every ``args.save_every`` steps, at the end, and on Ctrl-C) hold the trained arrays,
the optimizer state, the step and the number of micro-batches consumed, written to a temporary
folder and renamed. With ``keep_checkpoints`` each one is also published to ``out_dir/steps/NNNNNNN``
and kept, so a run's best step can be chosen afterwards (accuracy on a task can move up and down
between checkpoints while the loss falls). ``resume=True`` restores them and skips the consumed batches, and the random
state is reseeded per step (``args.seed + step``: dropout, MoE routing), so a resumed run reproduces
an uninterrupted one. Ctrl-C in the middle of a step saves the state before that step (its
micro-batches are given back); a Ctrl-C that arrives while the update is applied takes effect once
the step is complete, so the checkpoint never holds an update its step count does not. A loss that
becomes NaN or infinite stops training with the last good checkpoint kept.

Every report (and validation) is also appended as one JSON object a line to ``out_dir/metrics.jsonl``;
a resumed run first rewrites it from the checkpoint's history, so it never holds steps twice. Nothing
is written into ``out_dir`` before the first report or checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from phi3mlx.errors import Phi3MLXError

from . import lora

CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"
STEPS = "steps"  # out_dir/steps/NNNNNNN: what every checkpoint published, with keep_checkpoints


@dataclass
class TrainArgs:
    iters: int = 200
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 1e-4
    warmup: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    val_every: int = 50
    val_batches: int = 25  # -1: the whole validation set
    save_every: int = 100
    report_every: int = 10
    grad_checkpoint: bool = False
    grad_clip: Optional[float] = None  # clip the step's gradient to this global norm (None: no clipping)
    seed: int = 0
    compile: bool = True  # compile the whole step, update included (mx.compile; traced once per batch shape)
    keep_checkpoints: bool = False  # also publish every checkpoint's arrays to out_dir/steps/NNNNNNN (kept)
    val_at: tuple = ()  # steps validated besides every val_every (pretraining: the end of each phase)

    def saves_at(self, step: int) -> bool:
        """Whether a checkpoint is due after ``step``: every ``save_every`` steps and at the end."""
        return step % self.save_every == 0 or step == self.iters

    def check(self) -> None:
        problems = self.problems()
        if problems:
            raise Phi3MLXError.many(problems)

    def problems(self) -> list[str]:
        """Every bad setting, named by its flag."""
        problems = []
        for name in ("iters", "batch_size", "grad_accum", "val_every", "save_every", "report_every"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            problems.append(f"--lr must be a positive number, got {self.learning_rate}")
        if self.warmup < 0 or self.warmup > self.iters:
            problems.append(f"--warmup must be between 0 and --iters ({self.iters}), got {self.warmup}")
        if not (0.0 <= self.min_lr_ratio <= 1.0):
            problems.append(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and not (self.grad_clip > 0 and math.isfinite(self.grad_clip)):
            problems.append(f"--grad-clip must be a positive number, got {self.grad_clip}")
        return problems


def lr_schedule(args: TrainArgs) -> Callable:
    peak, floor = args.learning_rate, args.learning_rate * args.min_lr_ratio
    decay = optim.cosine_decay(peak, max(1, args.iters - args.warmup), floor)
    if args.warmup <= 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(peak / args.warmup, peak, args.warmup - 1), decay],
                                [args.warmup])


def _shard(batch, rank: int, world: int):
    """This process's rows of a micro-batch (arrays, tuples or dicts of them, batch axis first): rows
    ``rank * n // world`` up to ``(rank + 1) * n // world``, so the shares differ by one row at most."""
    def cut(x):
        n = x.shape[0]
        if n < world:
            raise Phi3MLXError(f"a micro-batch of {n} rows cannot be shared by {world} processes (each needs at "
                               "least one row); with several processes the last, smaller batch of an epoch must "
                               f"still hold {world} examples: change --batch-size or the number of examples")
        return x[rank * n // world:(rank + 1) * n // world]

    return tree_map(cut, batch)


@contextlib.contextmanager
def _interrupts_deferred():
    """Ctrl-C inside the block takes effect when it ends: the update of a step is applied whole or not at all.

    Only the main thread can handle signals; elsewhere the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        if callable(previous):
            previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt


class _MetricsLog:
    """out_dir/metrics.jsonl: one JSON object per report; created at the first record, not before."""

    def __init__(self, path: Path, earlier: list):
        self.path = path
        self.fresh = True  # the first write replaces the file: with ``earlier`` (a resumed run's history)
        self.earlier = earlier

    def write(self, rec: dict) -> None:
        lines = [json.dumps(r) for r in (self.earlier if self.fresh else [])] + [json.dumps(rec)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w" if self.fresh else "a") as f:
            f.write("\n".join(lines) + "\n")
        self.fresh = False


def _unpack(out):
    loss, ntok = out[0], out[1]
    metrics = out[2] if len(out) > 2 else {}
    return loss, ntok, metrics


def make_step(model, loss_fn: Callable, optimizer: optim.Optimizer, grad_clip: Optional[float] = None,
              group=None) -> Callable:
    """The training step as one function ``step(batch, sums, last) -> sums`` (what ``train`` compiles).

    Each call runs one micro-batch's forward and backward pass and adds its token-weighted gradient,
    loss and metrics to ``sums`` (None for a step's first micro-batch): ``{"grads", "loss", "tokens",
    "metrics"}``, each loss-like value multiplied by the micro-batch's token count. With ``last`` the
    sums are also summed over the processes of ``group``, the gradient is divided by the total token
    count (the update of one big batch), clipped to the global norm ``grad_clip`` if given, and
    applied by ``optimizer``; the gradient is then left out of the returned sums.
    """
    value_and_grad = nn.value_and_grad(model, loss_fn)

    def step(batch, sums: Optional[dict], last: bool) -> dict:
        out, grads = value_and_grad(model, batch)
        loss, ntok, metrics = _unpack(out)
        weight = ntok.astype(mx.float32)
        new = {"grads": tree_map(lambda g: g * weight, grads), "loss": loss * weight, "tokens": ntok,
               "metrics": {k: v * weight for k, v in metrics.items()}}
        if sums is not None:
            new = tree_map(mx.add, sums, new)
        if not last:
            return new
        if group is not None:  # sums over the processes: the update of one process holding the global batch
            new = tree_map(lambda x: mx.distributed.all_sum(x, group=group), new)
        grads = new.pop("grads")
        denom = new["tokens"].astype(mx.float32)
        grads = tree_map(lambda g: g / denom, grads)
        if grad_clip is not None:
            grads, _ = optim.clip_grad_norm(grads, grad_clip)
        optimizer.update(model, grads)
        return new

    return step


def evaluate(model, loss_fn, batches: Iterator, limit: int = -1) -> dict:
    """Token-weighted mean loss (and metrics) over ``limit`` batches (-1: all), in eval mode."""
    was_training = model.training
    model.eval()
    total, ntok, sums, n = 0.0, 0, {}, 0
    for batch in batches:
        if 0 <= limit <= n:
            break
        loss, t, metrics = _unpack(loss_fn(model, batch))
        mx.eval(loss, t, metrics)
        t = int(t)
        total += float(loss) * t
        ntok += t
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * t
        n += 1
    model.train(was_training)
    if ntok == 0:
        return {"loss": float("nan")}
    return {"loss": total / ntok, **{k: v / ntok for k, v in sums.items()}}


class AdapterStore:
    """What a fine-tuning checkpoint holds: the trained adapter arrays (``lora.save_adapters``), also
    published at the top of ``out_dir`` (adapters.safetensors + adapter_config.json, what a user loads)."""

    def __init__(self, adapter_config: dict):
        self.adapter_config = adapter_config

    def save(self, folder: Path, model) -> None:
        lora.save_adapters(folder, model, self.adapter_config)

    def restore(self, folder: Path, model) -> None:
        weights = mx.load(str(folder / lora.ADAPTER_FILE))
        model.load_weights(list(weights.items()), strict=False)

    def publish(self, out_dir: Path, model) -> None:
        lora.save_adapters(out_dir, model, self.adapter_config)


def remove_run_files(out_dir: Path, names) -> None:
    """Delete an earlier run's files and folders ``names`` from ``out_dir`` (what --force replaces)."""
    for name in names:
        p = Path(out_dir) / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _checkpoint_folder(out_dir: Path) -> Path:
    """The checkpoint to resume: out_dir/checkpoint, or checkpoint.old when a save stopped between its renames."""
    out_dir = Path(out_dir)
    final, old = out_dir / CHECKPOINT, out_dir / (CHECKPOINT + ".old")
    if not (final / "trainer_state.json").exists() and (old / "trainer_state.json").exists():
        return old
    return final


def read_trainer_state(out_dir: Path) -> Optional[dict]:
    """The trainer state of the checkpoint in out_dir (step, consumed, history, args, meta), or None."""
    f = _checkpoint_folder(out_dir) / "trainer_state.json"
    return json.loads(f.read_text()) if f.exists() else None


def keep_step(out_dir: Path, model, store, step: int, args: TrainArgs) -> None:
    """With ``args.keep_checkpoints``: publish the arrays of ``step`` to out_dir/steps/NNNNNNN (kept),
    through a temporary folder renamed into place, so a kept step is whole or absent."""
    if not args.keep_checkpoints or step <= 0:
        return
    final = Path(out_dir) / STEPS / f"{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    try:
        for d in (tmp, final):
            if d.exists():
                shutil.rmtree(d)
        store.publish(tmp, model)
        tmp.replace(final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise Phi3MLXError(f"could not keep step {step} in {final}: {e.strerror or e}") from None


def save_checkpoint(out_dir: Path, model, optimizer, store, state: dict) -> None:
    """out_dir/checkpoint: the trained arrays, optimizer state and trainer state, replaced atomically;
    then ``store.publish`` (what a user loads). A failed save (a full disk) removes its partial files and
    keeps the last good checkpoint."""
    out_dir = Path(out_dir)
    tmp = out_dir / (CHECKPOINT + ".tmp")
    final = out_dir / CHECKPOINT
    old = out_dir / (CHECKPOINT + ".old")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        store.save(tmp, model)
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            final.replace(old)
        tmp.replace(final)
        if old.exists():
            shutil.rmtree(old)
        store.publish(out_dir, model)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = _checkpoint_folder(out_dir)
        last = (f"the last good checkpoint ({kept}, step {read_trainer_state(out_dir)['step']}) is kept"
                if (kept / "trainer_state.json").exists() else "no earlier checkpoint exists")
        raise Phi3MLXError(f"cannot save the checkpoint at step {state['step']} in {out_dir}: "
                           f"{e.strerror or e}; {last}") from None


def load_checkpoint(out_dir: Path, model, optimizer, store) -> dict:
    ck = _checkpoint_folder(out_dir)
    if not (ck / "trainer_state.json").exists():
        raise Phi3MLXError(f"nothing to resume in {out_dir}: no {CHECKPOINT}/trainer_state.json")
    store.restore(ck, model)
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(list(mx.load(str(ck / "optimizer.safetensors")).items()))
    mx.eval(model.parameters(), optimizer.state)
    return json.loads((ck / "trainer_state.json").read_text())


def train(
    model,
    loss_fn: Callable,
    batches: Iterator,
    args: TrainArgs,
    out_dir: Path,
    adapter_config: dict,
    *,
    val_batches: Optional[Callable[[], Iterator]] = None,
    resume: bool = False,
    report: Optional[Callable[[dict], None]] = None,
    optimizer: Optional[optim.Optimizer] = None,
    store=None,
    annotate: Optional[Callable[[int], dict]] = None,
    meta: Optional[dict] = None,
) -> list[dict]:
    """Train; return the reports (step, loss, val_loss, lr, tokens_per_sec, peak_gb, metrics...).

    ``optimizer`` defaults to AdamW with the warmup + cosine schedule of ``args``. ``store`` says what a
    checkpoint holds and what is published in ``out_dir`` (default: the adapters, ``AdapterStore``).
    ``val_batches`` is a callable giving a validation iterator, or a dict of them by name (each report
    gets ``val_<name>_loss``, and ``val_loss`` is that of the set ``annotate`` names as "phase", else the
    first). ``annotate(step)`` adds fields to each report (the pretraining phase). ``meta`` is kept in
    the checkpoint's trainer state (what a resumed run must match). A ``batches`` iterator with a
    ``seek(n)`` method is positioned after ``n`` micro-batches on resume instead of being read through."""
    args.check()
    group = mx.distributed.init()
    world, rank = group.size(), group.rank()
    if args.batch_size < world:
        raise Phi3MLXError(f"--batch-size {args.batch_size} is smaller than the {world} processes: each needs at "
                           "least one row of every batch")
    out_dir = Path(out_dir)
    if rank != 0:
        report = None
    if optimizer is None:
        optimizer = optim.AdamW(learning_rate=lr_schedule(args), weight_decay=args.weight_decay)
    if store is None:
        store = AdapterStore(adapter_config)
    val_sets = val_batches if isinstance(val_batches, dict) or val_batches is None else {"": val_batches}
    step, consumed, history = 0, 0, []
    if resume:
        state = load_checkpoint(out_dir, model, optimizer, store)
        step, consumed, history = state["step"], state["consumed"], state["history"]
        if hasattr(batches, "seek"):
            batches.seek(consumed)
        else:
            for _ in range(consumed):
                next(batches)
    metrics = _MetricsLog(out_dir / METRICS, list(history)) if rank == 0 else None
    if not resume:
        optimizer.init(model.trainable_parameters())  # the compiled step's state holds it from the start
    if args.grad_checkpoint and not hasattr(model, "checkpoint_layers"):
        raise Phi3MLXError(f"{type(model).__name__} has no checkpoint_layers flag: it cannot use --grad-checkpoint")
    checkpointing = getattr(model, "checkpoint_layers", False)
    if args.grad_checkpoint:
        model.checkpoint_layers = True
    model.train()
    step_fn = make_step(model, loss_fn, optimizer, args.grad_clip, group if world > 1 else None)
    if args.compile:
        state = [model.state, optimizer.state, mx.random.state]
        step_fn = mx.compile(step_fn, inputs=state, outputs=state)

    done = consumed  # micro-batches of the completed steps (a checkpoint's position in the data)

    def state_now():
        return {"step": step, "consumed": done, "history": history, "args": asdict(args), "meta": meta or {}}

    window_tokens, window_loss, window_t0 = 0, 0.0, time.perf_counter()
    window_metrics: dict = {}
    mx.reset_peak_memory()
    try:
        while step < args.iters:
            mx.random.seed(args.seed + step)
            sums, rec = None, None
            for i in range(args.grad_accum):
                try:
                    batch = next(batches)
                except StopIteration:
                    raise Phi3MLXError("the training data ran out; use more data or fewer --iters") from None
                consumed += 1
                if world > 1:
                    batch = _shard(batch, rank, world)
                if i < args.grad_accum - 1:
                    sums = step_fn(batch, sums, False)
                    mx.eval(sums)  # one micro-batch's activations at a time
                    continue
                # the update and its bookkeeping: a Ctrl-C arriving in here takes effect at the end
                with _interrupts_deferred():
                    sums = step_fn(batch, sums, True)
                    mx.eval(sums, model.state, optimizer.state)
                    step, done = step + 1, consumed
                    total_tok = int(sums["tokens"])
                    step_loss = float(sums["loss"]) / max(total_tok, 1)
                    if not math.isfinite(step_loss):
                        where = out_dir / CHECKPOINT
                        kept = (f"the last good checkpoint is {where}" if where.exists()
                                else "no checkpoint was saved yet")
                        raise Phi3MLXError(f"the loss became {step_loss} at step {step}; stopped, {kept} "
                                           "(try a lower --lr)")
                    window_tokens += total_tok
                    window_loss += step_loss * total_tok
                    for k, v in sums["metrics"].items():
                        window_metrics[k] = window_metrics.get(k, 0.0) + float(v)
                    if step % args.report_every == 0 or step == args.iters:
                        dt = time.perf_counter() - window_t0
                        rec = {"step": step, **(annotate(step) if annotate else {}),
                               "loss": window_loss / max(1, window_tokens),
                               "lr": float(optimizer.learning_rate), "tokens_per_sec": window_tokens / max(dt, 1e-9),
                               "peak_gb": mx.get_peak_memory() / 1e9,
                               **{k: v / max(1, window_tokens) for k, v in window_metrics.items()}}
                        window_tokens, window_loss, window_metrics, window_t0 = 0, 0.0, {}, time.perf_counter()
                        history.append(rec)
            if val_sets and (step % args.val_every == 0 or step == args.iters or step in args.val_at):
                if rec is None:
                    rec = {"step": step, **(annotate(step) if annotate else {})}
                    history.append(rec)
                for name, make in val_sets.items():
                    val = evaluate(model, loss_fn, make(), args.val_batches)
                    if name:
                        rec.update({f"val_{name}_{k}": v for k, v in val.items()})
                    if not name or "val_loss" not in rec or rec.get("phase") == name:
                        rec.update({f"val_{k}": v for k, v in val.items()})
                window_t0 = time.perf_counter()
            if rec is not None:
                if metrics:
                    metrics.write(rec)
                if report:
                    report(rec)
            if rank == 0 and args.saves_at(step):
                keep_step(out_dir, model, store, step, args)  # first: a checkpoint at a step implies its copy
                save_checkpoint(out_dir, model, optimizer, store, state_now())
    except KeyboardInterrupt:
        if rank == 0:
            if args.saves_at(step):  # stopped between the update and its save
                keep_step(out_dir, model, store, step, args)
            save_checkpoint(out_dir, model, optimizer, store, state_now())
        raise Phi3MLXError(f"interrupted at step {step}; saved a checkpoint in {out_dir}, continue with --resume") from None
    finally:
        model.checkpoint_layers = checkpointing
    return history
