"""``phi3mlx bench --pretrain`` on a toy model: both engines' numbers, MFU, equal first-step losses, the FLOPs
count, bad input.

Speed ratios are never asserted (they depend on the machine and its load).
"""

from __future__ import annotations

import re

import pytest

from phi3mlx.cli import main
from phi3mlx.finetune import bench as B
from phi3mlx.finetune.pretrain import init_model

from .helpers import assert_error

NUM = r"([0-9]+(?:\.[0-9]+)?)"
TOY = ["--width", "32", "--layers", "1", "--heads", "2", "--vocab", "64", "--seq-len", "16", "--batch-size", "2"]


def toy(**kw) -> B.PretrainBenchArgs:
    return B.PretrainBenchArgs(**{**dict(width=32, layers=1, heads=2, vocab=64, seq_len=16, batch_size=2, steps=2,
                                         repeats=1), **kw})


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_pretrain_cli(capsys):
    code, out, err = cli(capsys, "bench", "--pretrain", *TOY, "--steps", "3", "--repeats", "1")
    assert code == 0, err
    rows = {}
    for engine in (B.OURS, B.PLAIN):
        m = re.search(rf"^{re.escape(engine)} pretrain {NUM} tok/s peak {NUM} GB mfu {NUM} loss {NUM} -> {NUM}$",
                      out, re.M)
        assert m, f"no numbers for {engine} in:\n{out}"
        rows[engine] = tuple(map(float, m.groups()))
        tps, peak, mfu = rows[engine][:3]
        assert tps > 0 and peak > 0 and 0 < mfu <= 1, rows[engine]
    # the same initial weights and batches: the same first-step loss (a random model: about ln(64))
    assert rows[B.OURS][3] == pytest.approx(rows[B.PLAIN][3], abs=1e-3)
    assert 3.5 < rows[B.OURS][3] < 5
    assert "warning" not in out
    m = re.search(rf"^pretrain ratio tokens/s {NUM}x peak memory {NUM}x$", out, re.M)
    assert m and all(float(x) > 0 for x in m.groups()), out
    assert "measured matmul peak" in out and "GFLOP/s" in out
    assert "MFU" in out and "ours / plain" in out  # the table with its ratio row
    assert "0.012M in matmuls" in out  # see test_flops_per_token


def test_run_pretrain_bench_numbers():
    res = B.run_pretrain_bench(toy(repeats=2))
    assert set(res["engines"]) == {B.OURS, B.PLAIN}
    for r in res["engines"].values():
        assert len(r["runs"]) == 2 and r["tokens_per_sec"] > 0 and 0 < r["mfu"] <= 1
        assert r["peak_gb"] > r["weights_gb"] > 0
        # every run starts from the same weights on the same batches
        assert r["runs"][0]["first_loss"] == pytest.approx(r["runs"][1]["first_loss"], abs=1e-6)
    assert res["loss_diff"] <= B.LOSS_TOLERANCE and res["warnings"] == []
    assert res["peak"]["flops"] > 0 and "measured matmul peak" in res["peak"]["source"]
    assert res["ratio_tps"] > 0 and res["ratio_peak"] > 0
    assert res["tokens_per_step"] == 32 and res["settings"]["mlp"] == 64  # 2 x width


def test_flops_per_token():
    s = toy()
    c = s.config()
    raw = c.model_dict(vocab_size=s.vocab)
    model, _ = init_model(raw)
    # qkv 96x32, o 32x32, gate_up 128x32, down 32x64, lm_head 64x32; the input embedding and norms left out
    n = 96 * 32 + 32 * 32 + 128 * 32 + 32 * 64 + 64 * 32
    assert B.matmul_params(model, raw) == n
    assert B.train_flops_per_token(n, 1, 32, 16) == 6 * n + 12 * 32 * 16


def test_matmul_params_moe_and_tied():
    s = toy(model_type="phimoe", heads=2)
    c = s.config()
    raw = c.model_dict(vocab_size=s.vocab)
    model, _ = init_model(raw)
    k, e = raw["num_experts_per_tok"], raw["num_local_experts"]
    experts = 3 * e * 32 * s.mlp_size()
    n = B.matmul_params(model, raw)
    assert n == B.matmul_params(model, {**raw, "num_experts_per_tok": e}) - experts + experts * k // e
    s = toy(model_type="phi3small", heads=2)
    c = s.config()
    raw = c.model_dict(vocab_size=s.vocab)
    assert raw["tie_word_embeddings"]
    model, _ = init_model(raw)
    assert B.matmul_params(model, raw) == B.matmul_params(model, {**raw, "tie_word_embeddings": False}) + 64 * 32


def test_differing_losses_are_reported_loudly(monkeypatch):
    monkeypatch.setattr(B, "_plain_loss", lambda model, x, y: B.nn.losses.cross_entropy(model(x), y).mean() + 0.5)
    res = B.run_pretrain_bench(toy())
    assert res["loss_diff"] == pytest.approx(0.5, abs=1e-3)
    assert any("FIRST-STEP LOSSES DIFFER" in w for w in res["warnings"])


@pytest.mark.parametrize("args, needles", [
    (["--steps", "1"], ["--steps must be at least 2"]),
    (["--width", "30", "--heads", "4"], ["--width 30 is not divisible by --heads 4"]),
    (["--steps", "1", "--width", "30", "--heads", "4", "--vocab", "0"],
     ["--steps must be at least 2", "--width 30 is not divisible by --heads 4", "--vocab must be a positive"]),
    (["--seq-len", "4096"], ["--seq-len 4096 is longer than the benchmark model's 2048 positions"]),
    (["--train"], ["--train and --pretrain exclude each other"]),
    (["--compare-mlx-lm"], ["--compare-mlx-lm does not apply to --pretrain"]),
    (["--model-type", "llama"], ["bench: argument --model-type: invalid choice"]),
])
def test_bad_input_is_one_line(capsys, args, needles):
    assert_error(*cli(capsys, "bench", "--pretrain", *args)[::2], *needles)
