"""``phi3mlx bench`` on the tiny random model: both engines' numbers, the ratio line, bad input.

Speed ratios are never asserted (they depend on the machine and its load).
"""

from __future__ import annotations

import re

import pytest

from rich.console import Console

from phi3mlx.cli import main
from phi3mlx.errors import Phi3MLXError
from phi3mlx.tiny import make_tiny

NUM = r"([0-9]+(?:\.[0-9]+)?)"


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_compare_mlx_lm(tiny_folder, capsys):
    code, out, err = cli(capsys, "bench", "--model", tiny_folder, "--prompt-tokens", "64", "--gen-tokens", "8",
                         "--repeats", "1", "--compare-mlx-lm")
    assert code == 0, err
    assert str(tiny_folder) in out
    assert "size on disk" in out
    assert "KV cache" in out  # the memory estimate lines
    for engine in ("phi3mlx", "mlx-lm"):
        m = re.search(rf"^{engine} prefill {NUM} tok/s decode {NUM} tok/s peak {NUM} GB$", out, re.M)
        assert m, f"no numbers for {engine} in:\n{out}"
        prefill, decode, peak = map(float, m.groups())
        assert prefill > 0 and decode > 0 and peak > 0
    m = re.search(rf"^ratio prefill {NUM}x decode {NUM}x$", out, re.M)
    assert m, out
    assert all(float(x) > 0 for x in m.groups())
    # The rich table is there too, with a ratio row.
    assert "prefill tok/s" in out and "ours / mlx-lm" in out


def test_run_bench_returns_numbers(tiny_folder):
    from phi3mlx.bench import run_bench

    res = run_bench(tiny_folder, prompt_tokens=16, gen_tokens=3, repeats=2)
    ours = res["engines"]["phi3mlx"]
    assert set(res["engines"]) == {"phi3mlx"}
    assert ours["prefill_tps"] > 0 and ours["decode_tps"] > 0 and ours["peak_gb"] > 0
    assert len(ours["runs"]) == 2 and len(ours["tokens"]) == 3
    assert res["ratio_prefill"] is None and res["ratio_decode"] is None


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--prompt-tokens", "0"], "--prompt-tokens must be a positive number, got 0"),
        (["--gen-tokens", "-1"], "--gen-tokens must be a positive number, got -1"),
        (["--repeats", "0"], "--repeats must be a positive number, got 0"),
        (["--prompt-tokens", "5000"], "longer than the model's context (4096 tokens)"),
        (["--prompt-tokens", "4090", "--gen-tokens", "10"], "do not fit in the model's context"),
    ],
)
def test_bench_bad_numbers(tiny_folder, capsys, flags, needle):
    code, out, err = cli(capsys, "bench", "--model", tiny_folder, *flags)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("phi3mlx: error: "), err
    assert needle in lines[0]
    assert "Traceback" not in err and out == ""


def test_bench_mlx_lm_cannot_load(tiny_folder, capsys, monkeypatch):
    import mlx_lm.utils

    def broken(*a, **k):
        raise ValueError("Model type phi3 not supported.\nmore detail")

    monkeypatch.setattr(mlx_lm.utils, "load_model", broken)
    code, out, err = cli(capsys, "bench", "--model", tiny_folder, "--prompt-tokens", "8", "--gen-tokens", "2",
                         "--repeats", "1", "--compare-mlx-lm")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0] == f"phi3mlx: error: mlx-lm cannot load {tiny_folder} (ValueError: Model type phi3 not supported.)"


def test_chat_turn_bench_reports_processed_tokens(tmp_path):
    from phi3mlx.bench import print_chat_report, run_chat_bench

    res = run_chat_bench(make_tiny(tmp_path / "m"), turns=3, words=20, answer_tokens=4)
    kept, fresh = res["kept"], res["fresh"]
    assert [r["turn"] for r in kept] == [1, 2, 3]
    assert kept[2]["prompt_tokens"] > kept[1]["prompt_tokens"] > kept[0]["prompt_tokens"]
    assert kept[2]["processed"] < kept[2]["prompt_tokens"] // 2  # only the new turn was processed
    assert fresh[2]["processed"] == fresh[2]["prompt_tokens"]  # the history processed again
    con = Console(record=True, width=120)
    print_chat_report(res, con)
    assert "turn 3 / turn 2 first-token time" in con.export_text()


def test_window_memory_bench_is_flat(tmp_path):
    from phi3mlx.bench import print_window_report, run_window_bench

    res = run_window_bench(make_tiny(tmp_path / "m", config={"sliding_window": 32}), multiples=(1, 2, 4),
                           prompt_tokens=8)
    sizes = [r["phi3mlx"]["cache_mb"] for r in res["rows"]]
    assert len(sizes) == 3 and sizes[0] == sizes[-1] > 0
    con = Console(record=True, width=120)
    print_window_report(res, con)
    assert "phi3mlx KV cache at 136 tokens / at 40: 1.00x" in con.export_text()
    with pytest.raises(Phi3MLXError, match="sliding window"):
        run_window_bench(make_tiny(tmp_path / "n", config={"sliding_window": None}))
