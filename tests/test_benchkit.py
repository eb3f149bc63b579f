"""phi3mlx.benchkit: the timing and reporting pieces both benchmarks share."""

from __future__ import annotations

import io

import pytest

mx = pytest.importorskip("mlx.core")

from rich.console import Console  # noqa: E402

from phi3mlx import benchkit  # noqa: E402


class Eng:
    def __init__(self, name):
        self.name, self.runs = name, []


def test_runs_alternate_and_each_engine_gets_its_own():
    engines, calls, said = [Eng("a"), Eng("b"), Eng("c")], [], []

    def run(e):
        calls.append(e.name)
        return len(calls)

    benchkit.run_alternating(engines, 3, run, said.append)
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert said[:4] == ["run 1/3: a", "run 1/3: b", "run 1/3: c", "run 2/3: c"]
    assert [e.runs for e in engines] == [[1, 6, 7], [2, 5, 8], [3, 4, 9]]


def test_ratios_lines_and_best_of():
    assert benchkit.ratio(3.0, 2.0) == 1.5 and benchkit.ratio(None, 2.0) is None and benchkit.ratio(1.0, 0) is None
    assert benchkit.ratio_line("ratio", [("prefill", 1.234), ("decode", None)]) == "ratio prefill 1.23x decode n/a"
    assert benchkit.best_and_median([3.0, None, 1.0, 2.0]) == (3.0, 2.0)
    assert benchkit.best_and_median([None]) == (None, None)
    assert benchkit.first_line(ValueError("bad thing\nmore")) == "ValueError: bad thing"
    assert benchkit.first_line(KeyError()) == "KeyError"


def test_table_aligns_names_left_and_numbers_right():
    t = benchkit.engine_table(("engine", "tok/s"))
    t.add_row("phi3mlx", "12.0")
    benchkit.add_ratio_row(t, "ours / mlx-lm", "1.00x")
    buf = io.StringIO()
    Console(file=buf, width=60, highlight=False).print(t)
    lines = [ln for ln in buf.getvalue().splitlines() if "phi3mlx" in ln or "ours" in ln]
    assert lines[0].lstrip().startswith("phi3mlx") and lines[0].rstrip().endswith("12.0")
    assert lines[1].rstrip().endswith("1.00x")


def test_memory_watch_counts_what_the_run_holds_beyond_the_start():
    keep = mx.zeros((1 << 20,), mx.float32)  # 4 MB alive before: not counted as the run's
    mx.eval(keep)
    with benchkit.MemoryWatch(collect=True) as mem:
        x = mx.ones((1 << 22,), mx.float32)  # 16 MB during the run
        mx.eval(x)
        del x
    extra = mem.peak_gb(0) * 1e9
    assert 16e6 <= extra < 16e6 + 4e6
    assert mem.peak_gb(1_000_000_000) == pytest.approx(1.0 + extra / 1e9)
    assert mem.process_peak_gb * 1e9 >= extra + keep.nbytes


def test_memory_in_gb_keeps_three_significant_digits_when_small():
    # a toy model's peak is a few KB: "0.000" would read as "nothing measured"
    assert benchkit.fmt_gb(12.3456) == "12.346" and benchkit.fmt_gb(0.1) == "0.100"
    assert benchkit.fmt_gb(0.0123456) == "0.0123" and benchkit.fmt_gb(0.0000561) == "0.0000561"
    assert benchkit.fmt_gb(0.0) == "0.000" and benchkit.fmt_gb(None) == "n/a"
