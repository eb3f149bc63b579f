"""phi3mlx lora / dpo / fuse end to end on the tiny model, YAML configs, DPO learning, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from phi3mlx import load  # noqa: E402
from phi3mlx.cli import main  # noqa: E402
from phi3mlx.finetune import data as D  # noqa: E402
from phi3mlx.finetune import lora  # noqa: E402
from phi3mlx.finetune.losses import make_dpo_loss  # noqa: E402
from phi3mlx.finetune.trainer import TrainArgs, evaluate, train  # noqa: E402

from .helpers import NEXT, TOKENS  # noqa: E402

CHATS = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                       {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
         for a in range(1, 7) for b in range(1, 5)]


def cli(capsys, *args):
    code = main([str(x) for x in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in CHATS[:20]) + "\n")
    (d / "valid.jsonl").write_text("\n".join(json.dumps(r) for r in CHATS[20:]) + "\n")
    return d


def test_lora_fuse_generate_end_to_end(folders, chat_data, tmp_path, capsys):
    out = tmp_path / "ad"
    code, _, err = cli(capsys, "lora", "--model", folders["phi3"], "--data", chat_data, "--adapter-path", out,
                       "--iters", 6, "--batch-size", 2, "--lr", 1e-3, "--val-every", 3, "--save-every", 3,
                       "--report-every", 2, "--rank", 4)
    assert code == 0, err
    assert "20 training examples" in err and "val loss" in err
    # stderr is not a terminal here: one plain line per report and per validation, nothing cut short
    lines = err.splitlines()
    assert [ln.split(":")[0] for ln in lines if ln.startswith("step ")] == [
        "step 2/6", "step 3", "step 4/6", "step 6/6", "step 6"]
    assert re.search(r"^step 4/6: loss \d+\.\d{4}, lr \d\.\d\de-\d\d, \d+ tok/s, peak \d+\.\d\d GB$", err, re.M), err
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 3, 4, 6] and "val_loss" in metrics[1] and "loss" in metrics[0]
    assert (out / lora.ADAPTER_FILE).exists() and (out / "checkpoint" / "optimizer.safetensors").exists()
    cfg = json.loads((out / lora.CONFIG_FILE).read_text())
    assert cfg["rank"] == 4 and cfg["fine_tune_type"] == "lora"
    model, _ = load(folders["phi3"], adapter_path=str(out))
    ids = mx.array([[1, 22, 333, 4444, 55]])
    unfused = np.array(model(ids))
    base, _ = load(folders["phi3"])
    assert np.abs(unfused - np.array(base(ids))).max() > 1e-4  # the adapters changed something
    assert cfg["base_model"] == str(folders["phi3"].resolve())
    code, _, err = cli(capsys, "fuse", "--adapter-path", out, "--save-path", tmp_path / "fused")  # the recorded base
    assert code == 0, err
    fused, _ = load(tmp_path / "fused")
    assert np.abs(np.array(fused(ids)) - unfused).max() <= 1e-5
    code, text, err = cli(capsys, "generate", "--model", folders["phi3"], "--adapter-path", out, "--prompt", "hi",
                          "--max-tokens", 4)
    assert code == 0, err
    # --export-hf gives a transformers checkpoint with the same logits
    code, _, err = cli(capsys, "fuse", "--model", folders["phi3"], "--adapter-path", out, "--save-path",
                       tmp_path / "hf", "--export-hf")
    assert code == 0, err
    assert (tmp_path / "hf" / "config.json").exists()
    again, _ = load(tmp_path / "hf")
    assert np.abs(np.array(again(ids)) - unfused).max() <= 1e-5


def test_yaml_config_and_flags_win(folders, chat_data, tmp_path, capsys):
    y = tmp_path / "c.yaml"
    y.write_text(f"model: {folders['phi3']}\ndata: {chat_data}\niters: 2\nbatch-size: 2\nrank: 2\n"
                 f"adapter_path: {tmp_path / 'y'}\nval_every: 2\nsave_every: 2\n")
    code, _, err = cli(capsys, "lora", "--config", y, "--rank", 3)
    assert code == 0, err
    cfg = json.loads((tmp_path / "y" / lora.CONFIG_FILE).read_text())
    assert cfg["rank"] == 3  # the flag won over the file's 2
    y.write_text("iters: 2\nranks: 4\nlearning_rat: 1\n")
    code, _, err = cli(capsys, "lora", "--config", y)
    assert code == 1 and err.strip() == f"phi3mlx: error: {y}: unknown keys learning_rat, ranks"


def test_bad_training_input_is_one_line(folders, chat_data, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    code, _, err = cli(capsys, "lora", "--model", folders["phi3"], "--data", bad, "--iters", 1)
    assert code == 1 and "train.jsonl:2" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, "lora", "--model", folders["phi3"], "--data", chat_data, "--rank", 0, "--iters", 1,
                       "--adapter-path", tmp_path / "r0")
    assert code == 1 and "--rank must be a positive integer, got 0" in err
    assert not (tmp_path / "r0" / lora.ADAPTER_FILE).exists()
    code, _, err = cli(capsys, "lora", "--model", folders["phi3"], "--iters", 1)
    assert code == 1 and "--data is required" in err
    code, _, err = cli(capsys, "dpo", "--model", folders["phi3"], "--data", chat_data, "--iters", 1)
    assert code == 1 and "chat data" in err and "use phi3mlx lora" in err


def _pairs(n, seed):
    """Prompt: 8 tokens of the successor task; chosen: its true next 6; rejected: 6 wrong ones."""
    rng = np.random.default_rng(seed)
    out = []
    for s in rng.choice(TOKENS, n):
        seq = [int(s)]
        for _ in range(13):
            seq.append(NEXT[seq[-1]])
        wrong = [int(t) for t in rng.choice(TOKENS, 6)]
        out.append((seq[:8], seq[8:], wrong))
    return out


@pytest.mark.slow
def test_dpo_raises_margin_and_accuracy_on_held_out_pairs(folders, tmp_path):
    model, _ = load(folders["phi3"])
    mx.random.seed(0)
    cfg = lora.apply_adapters(model, {"rank": 8, "alpha": 16.0})
    loss_fn = make_dpo_loss(0.1, "sigmoid")
    train_set, held_out = _pairs(32, 1), _pairs(8, 2)
    val = lambda: D.iterate_preference_batches(held_out, 4, 64, shuffle=False)  # noqa: E731
    before = evaluate(model, loss_fn, val())
    assert before["reward_margin"] == 0 and before["accuracy"] == 0  # policy == reference at the start
    hist = train(model, loss_fn, D.iterate_preference_batches(train_set, 4, 64, loop=True), TrainArgs(
        iters=30, batch_size=4, learning_rate=1e-3, val_every=30, save_every=30, report_every=10), tmp_path / "d",
        cfg, val_batches=val)
    after = hist[-1]
    print(f"DPO held-out: margin {before['reward_margin']:.3f} -> {after['val_reward_margin']:.3f}, "
          f"accuracy {before['accuracy']:.2f} -> {after['val_accuracy']:.2f}, loss {before['loss']:.3f} -> "
          f"{after['val_loss']:.3f}")
    assert after["val_reward_margin"] > 0.5 and after["val_accuracy"] >= 0.9
    assert after["val_loss"] < before["loss"] - 0.2


def _no_model_load(monkeypatch):
    """Make loading a model fail loudly: what is checked before the model loads must not reach it."""
    from phi3mlx.finetune import cli as fcli

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(fcli, "load", refuse)


def _files(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_an_earlier_run_is_replaced_only_with_force(folders, chat_data, tmp_path, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "ad"
    run = ("lora", "--model", folders["phi3"], "--data", chat_data, "--adapter-path", out, "--iters", 2,
           "--batch-size", 2, "--rank", 2, "--val-every", 2, "--report-every", 1)
    code, _, err = cli(capsys, *run)
    assert code == 0, err
    before = _files(out)
    with monkeypatch.context() as m:
        _no_model_load(m)
        code, _, err = cli(capsys, *run)
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert (f"--adapter-path {out} already holds adapters.safetensors, adapter_config.json, checkpoint, "
                "metrics.jsonl from an earlier run; pass --force to replace them or --resume to continue it") in err
        assert _files(out) == before  # untouched
        code, _, err = cli(capsys, *run, "--force", "--resume")
        assert code == 1 and "--force and --resume exclude each other" in err
        code, _, err = cli(capsys, *run[:-6], "--adapter-path", tmp_path / "none", "--resume")
        assert code == 1 and "nothing to resume in" in err
    (out / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, *run, "--force", "--seed", 5)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"  # --force replaces the run's files only
    assert _files(out)[Path(lora.ADAPTER_FILE)] != before[Path(lora.ADAPTER_FILE)]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    code, _, err = cli(capsys, *run[:-6], "--iters", 3, "--resume")  # continue the run: one more step
    assert code == 0, err
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3


def test_data_too_small_fails_before_anything_loads_or_is_written(folders, tmp_path, capsys, monkeypatch):  # noqa: F811
    d = tmp_path / "small"
    d.mkdir()
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in CHATS[:5]) + "\n")
    (d / "valid.jsonl").write_text(json.dumps(CHATS[5]) + "\n")
    _no_model_load(monkeypatch)
    out = tmp_path / "ad"
    code, _, err = cli(capsys, "lora", "--data", d, "--adapter-path", out, "--iters", 2, "--batch-size", 2,
                       "--grad-clip", 0, "--lr", -1)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    for needle in ("the validation set has 1 example, fewer than --batch-size 2", "--grad-clip must be a positive",
                   "--lr must be a positive number"):
        assert needle in err, err  # every problem at once
    code, _, err = cli(capsys, "lora", "--data", d, "--adapter-path", out, "--iters", 2, "--batch-size", 6)
    assert code == 1 and "the training set has 5 examples, fewer than --batch-size 6" in err
    assert not out.exists()


def test_sizes_for_several_processes():
    from phi3mlx.finetune.cli import _size_problems

    assert _size_problems(9, 0, 3, 2) == []  # batches of 3 shared 2 + 1
    (msg,) = _size_problems(10, 0, 3, 2)
    assert msg == ("with 10 examples and --batch-size 3 the last batch of each epoch holds 1, fewer than the 2 "
                   "processes that share it (each needs a row); use a --batch-size that leaves 0 or at least 2 over")
    assert "smaller than the 4 processes" in _size_problems(8, 0, 2, 4)[0]
    assert _size_problems(10, 0, 3, 1) == []


def test_yaml_values_give_way_to_the_command_line(folders, chat_data, tmp_path, capsys):  # noqa: F811
    """examples/lora.yaml (epochs 2, warmup 20) with --iters 2: two steps, warmup shortened with a warning."""
    example = Path(__file__).resolve().parents[1] / "examples" / "lora.yaml"
    out = tmp_path / "y"
    code, _, err = cli(capsys, "lora", "--config", example, "--model", folders["phi3"], "--data", chat_data,
                       "--adapter-path", out, "--iters", 2, "--rank", 2)
    assert code == 0, err
    assert "warning: --warmup 20 is longer than the run (2 steps); warming up over all 2 steps" in err
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["args"]["warmup"] == 2 and state["args"]["grad_accum"] == 4  # the rest: YAML
    y = tmp_path / "c.yaml"
    y.write_text(f"model: {folders['phi3']}\ndata: {chat_data}\niters: 50\nbatch-size: 4\nrank: 2\n"
                 f"adapter_path: {tmp_path / 'e'}\nfull: true\n")
    code, _, err = cli(capsys, "lora", "--config", y, "--epochs", 0.4, "--dora")  # 20 examples, 5 steps an epoch
    assert code == 0, err
    state = json.loads((tmp_path / "e" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2
    assert json.loads((tmp_path / "e" / lora.CONFIG_FILE).read_text())["fine_tune_type"] == "dora"
    code, _, err = cli(capsys, "lora", "--config", y, "--epochs", 1, "--iters", 3)  # both on the command line
    assert code == 1 and "give --iters or --epochs, not both" in err


def test_fuse_without_model_needs_a_recorded_base(folders, tmp_path, capsys):  # noqa: F811
    model, _ = load(folders["phi3"])
    cfg = lora.apply_adapters(model, {"rank": 2, "alpha": 4.0})
    lora.save_adapters(tmp_path / "ad", model, cfg)  # saved through the API: no base_model recorded
    code, _, err = cli(capsys, "fuse", "--adapter-path", tmp_path / "ad", "--save-path", tmp_path / "f")
    assert code == 1
    assert err.strip() == (f"phi3mlx: error: --model is not given and {tmp_path / 'ad' / lora.CONFIG_FILE} records no "
                           "base_model; pass --model")
    assert not (tmp_path / "f").exists()
    code, _, err = cli(capsys, "fuse", "--model", folders["phi3"], "--adapter-path", tmp_path / "ad", "--save-path",
                       tmp_path / "f")
    assert code == 0, err
