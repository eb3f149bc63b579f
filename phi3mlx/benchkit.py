"""What ``phi3mlx bench`` (inference, ``phi3mlx.bench``) and ``phi3mlx bench --train`` (training,
``phi3mlx.finetune.bench``) share: engine names, best-of-N timed runs with the engines alternating,
memory measurement, ratios and the report's pieces (rich table, plain grep-friendly lines).

Memory: a run's peak = the engine's own weights + the largest extra memory MLX held during the run
(``mx.get_peak_memory()`` after ``mx.reset_peak_memory()`` minus ``mx.get_active_memory()`` taken just
before, buffer cache cleared). Both engines live in one process, so the raw process peak would also
count the other engine's weights; it is kept as ``process_peak_gb``.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from typing import Callable, Iterable, Iterator, Optional, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten
from rich import box
from rich.console import Console
from rich.table import Table

OURS = "phi3mlx"
MLX_LM = "mlx-lm"


def first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (a library's error quoted in one line)."""
    text = str(e).strip()
    line = text.splitlines()[0].strip() if text else ""
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def params_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """a / b, or None when either is missing (or b is 0)."""
    return a / b if a is not None and b else None


def fmt(x: Optional[float], spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def fmt_gb(x: Optional[float]) -> str:
    """A memory size in GB: 3 decimals, or 3 significant digits below 0.1 GB, so a toy model's few KB never
    print as 0.000."""
    if x is None:
        return "n/a"
    if x >= 0.1 or x <= 0:
        return f"{x:.3f}"
    return f"{x:.{2 - math.floor(math.log10(x))}f}"


def best_and_median(values: Iterable[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    """(max, median) of the values that are not None; (None, None) when there are none."""
    vals = [v for v in values if v is not None]
    return (max(vals), statistics.median(vals)) if vals else (None, None)


class MemoryWatch:
    """``with MemoryWatch(sync) as m: run()`` then ``m.peak_gb(weights_bytes)`` and ``m.process_peak_gb``.

    On entry: ``sync()`` (the device and any extra streams), optionally ``gc.collect()``, MLX's buffer
    cache cleared, active memory noted, peak reset. On exit (also on error): ``sync()``, peak read.
    """

    def __init__(self, sync: Callable[[], None] = mx.synchronize, collect: bool = False):
        self.sync = sync
        self.collect = collect
        self.active0 = 0
        self.process_peak = 0

    def __enter__(self) -> "MemoryWatch":
        if self.collect:
            gc.collect()
        self.sync()
        mx.clear_cache()
        self.active0 = mx.get_active_memory()
        mx.reset_peak_memory()
        return self

    def __exit__(self, *exc) -> None:
        self.sync()
        self.process_peak = mx.get_peak_memory()

    @property
    def process_peak_gb(self) -> float:
        return self.process_peak / 1e9

    def peak_gb(self, weights_bytes: int) -> float:
        return (weights_bytes + max(0, self.process_peak - self.active0)) / 1e9


def time_stream(it: Iterator[int], n: int) -> tuple[list, float, Optional[float], float]:
    """Consume at most ``n`` tokens of a token iterator (closed afterwards): (tokens, start, time of the
    first token or None, end), times from ``time.perf_counter``."""
    tokens: list = []
    t_first = None
    t0 = time.perf_counter()
    try:
        for tok in it:
            tokens.append(tok)
            if t_first is None:
                t_first = time.perf_counter()
            if len(tokens) >= n:
                break
        t_end = time.perf_counter()
    finally:
        it.close()
    return tokens, t0, t_first, t_end


def run_alternating(engines: Sequence, repeats: int, run: Callable, say: Callable[[str], None]) -> None:
    """``repeats`` timed runs per engine, appended to each ``engine.runs``; the order alternates between
    repeats (A, B, B, A, ...) so that drift (thermals, other load) hits every engine alike."""
    for i in range(repeats):
        order = engines if i % 2 == 0 else engines[::-1]
        for e in order:
            say(f"run {i + 1}/{repeats}: {e.name}")
            e.runs.append(run(e))


def report_console() -> Console:
    """Where reports go: stdout, no highlighting, long lines kept whole."""
    return Console(highlight=False, soft_wrap=True)


def progress_printer() -> Optional[Callable[[str], None]]:
    """Dim progress messages on stderr when it is a terminal, else None (nothing printed)."""
    err = Console(stderr=True, highlight=False)
    return (lambda msg: err.print(f"[dim]{msg}…[/dim]")) if sys.stderr.isatty() else None


def engine_table(columns: Sequence[str]) -> Table:
    """The report table: the first column (engine names) left-aligned, the numbers right-aligned."""
    table = Table(box=box.SIMPLE_HEAD)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
    return table


def add_ratio_row(table: Table, label: str, *cells: str) -> None:
    table.add_row(label, *cells, style="bold")


def ratio_line(label: str, pairs: Sequence[tuple[str, Optional[float]]]) -> str:
    """``label name1 1.23x name2 0.98x``: the grep-friendly ratio line."""
    return " ".join([label] + [f"{name} {fmt(value, '.2f', 'x')}" for name, value in pairs])
