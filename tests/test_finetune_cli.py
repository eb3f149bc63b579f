"""phi3mlx lora / dpo / fuse end to end on the tiny model, YAML configs, DPO learning, bad input."""

from __future__ import annotations

import json

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
    assert (out / lora.ADAPTER_FILE).exists() and (out / "checkpoint" / "optimizer.safetensors").exists()
    cfg = json.loads((out / lora.CONFIG_FILE).read_text())
    assert cfg["rank"] == 4 and cfg["fine_tune_type"] == "lora"
    model, _ = load(folders["phi3"], adapter_path=str(out))
    ids = mx.array([[1, 22, 333, 4444, 55]])
    unfused = np.array(model(ids))
    base, _ = load(folders["phi3"])
    assert np.abs(unfused - np.array(base(ids))).max() > 1e-4  # the adapters changed something
    code, _, err = cli(capsys, "fuse", "--model", folders["phi3"], "--adapter-path", out, "--save-path",
                       tmp_path / "fused")
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
