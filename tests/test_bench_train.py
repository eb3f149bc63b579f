"""``phi3mlx bench --train`` on a small random Phi-3 folder: both trainers' numbers, the ratio line, the
memory saved by gradient checkpointing, the same losses, bad input.

Speed ratios are never asserted (they depend on the machine and its load).
"""

from __future__ import annotations

import re

import pytest

from phi3mlx.cli import main

NUM = r"([0-9]+(?:\.[0-9]+)?)"

# Deep and narrow with a small vocabulary: the decoder layers' activations dominate the peak, so
# recomputing them (gradient checkpointing) must save memory.
DEEP = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 6,
        "num_attention_heads": 2, "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def deep_folder(tmp_path_factory):
    from phi3mlx.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("bench_train") / "deep", config=DEEP)


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_train_compare_mlx_lm(deep_folder, capsys):
    code, out, err = cli(capsys, "bench", "--train", "--model", deep_folder, "--compare-mlx-lm", "--steps", "2",
                         "--repeats", "1", "--batch-size", "2", "--seq-len", "256")
    assert code == 0, err
    assert str(deep_folder) in out
    assert "mlx-lm scale 2" in out  # alpha 16 / rank 8
    rows = {}
    for engine in ("phi3mlx", "mlx-lm", "phi3mlx +gc", "mlx-lm +gc"):
        m = re.search(rf"^{re.escape(engine)} train {NUM} tok/s peak {NUM} GB loss {NUM} -> {NUM}$", out, re.M)
        assert m, f"no numbers for {engine} in:\n{out}"
        rows[engine] = tuple(map(float, m.groups()))
        assert rows[engine][0] > 0 and rows[engine][1] > 0
    # Same starting adapters, same batches, same settings: the same losses (printed to 4 decimals).
    first = {r[2] for r in rows.values()}
    last = {r[3] for r in rows.values()}
    assert len(first) == 1 and len(last) == 1, rows
    # Gradient checkpointing saves memory here (6 layers x 512 tokens of activations).
    assert rows["phi3mlx +gc"][1] < 0.8 * rows["phi3mlx"][1], out
    m = re.search(rf"^grad checkpoint phi3mlx peak {NUM} GB -> {NUM} GB \({NUM}x\), tokens/s {NUM}x$", out, re.M)
    assert m and float(m.group(3)) < 0.8, out
    m = re.search(rf"^train ratio tokens/s {NUM}x peak memory {NUM}x$", out, re.M)
    assert m, out
    assert all(float(x) > 0 for x in m.groups())
    assert "ours / mlx-lm" in out and "tok/s" in out  # the table with its ratio rows


def test_run_train_bench_ours_only(deep_folder):
    from phi3mlx.finetune.bench import TrainBenchArgs, run_train_bench

    res = run_train_bench(deep_folder, TrainBenchArgs(batch_size=1, seq_len=32, steps=3, repeats=2,
                                                      grad_checkpoint="off", num_layers=2, targets="qkv_proj"))
    assert set(res["engines"]) == {"phi3mlx"}
    ours = res["engines"]["phi3mlx"]
    assert ours["tokens_per_sec"] > 0 and ours["peak_gb"] > ours["weights_gb"] > 0
    assert len(ours["runs"]) == 2
    # each run starts from the same adapters on the same batches
    assert ours["runs"][0]["first_loss"] == pytest.approx(ours["runs"][1]["first_loss"], rel=1e-5)
    assert res["adapted_layers"] == 2 and res["mlx_lm_keys"] == ["self_attn.qkv_proj"]
    assert res["ratio_tps"] is None and res["ratio_peak"] is None
    assert res["tokens_per_step"] == 32


def test_grad_checkpoint_leaves_no_trace(deep_folder):
    """Ours checkpoints through the model instance's flag (no class patch); mlx-lm's class patch is undone."""
    from mlx_lm.models.phi3 import TransformerBlock

    from phi3mlx.finetune.bench import TrainBenchArgs, run_train_bench
    from phi3mlx.models.decoder import DecoderLayer

    before = DecoderLayer.__dict__["__call__"]
    theirs = TransformerBlock.__dict__["__call__"]
    run_train_bench(deep_folder, TrainBenchArgs(batch_size=1, seq_len=16, steps=2, repeats=1, grad_checkpoint="on"),
                    compare_mlx_lm=True)
    assert DecoderLayer.__dict__["__call__"] is before
    assert TransformerBlock.__dict__["__call__"] is theirs


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--steps", "1"], "--steps must be at least 2"),
        (["--batch-size", "0"], "--batch-size must be a positive number, got 0"),
        (["--seq-len", "5000"], "longer than the model's context (4096 tokens)"),
        (["--lr", "0"], "--lr must be a positive number"),
        (["--adapter-path", "x"], "--adapter-path does not apply to --train"),
    ],
)
def test_bench_train_bad_input(deep_folder, capsys, flags, needle):
    code, out, err = cli(capsys, "bench", "--train", "--model", deep_folder, *flags)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("phi3mlx: error: "), err
    assert needle in lines[0]
    assert "Traceback" not in err and out == ""
