"""The trainer: gradient accumulation equals a bigger batch, resume reproduces, training learns, NaN stops."""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from mlx.utils import tree_flatten  # noqa: E402

from phi3mlx import load  # noqa: E402
from phi3mlx.errors import Phi3MLXError  # noqa: E402
from phi3mlx.finetune import lora  # noqa: E402
from phi3mlx.finetune.losses import sft_loss  # noqa: E402
from phi3mlx.finetune.trainer import TrainArgs, train  # noqa: E402

from .helpers import NEXT, TOKENS  # noqa: E402

# folders (conftest.py): the tiny random phi3 and phimoe models trained here.


def task(n, seed, length=24):
    """A learnable task: sequences over 40 tokens where each token has one fixed successor."""
    rng = np.random.default_rng(seed)
    out = []
    for s in rng.choice(TOKENS, n):
        seq = [int(s)]
        for _ in range(length):
            seq.append(NEXT[seq[-1]])
        out.append(np.array(seq, np.int32))
    return out


def batches(seqs, batch_size, loop=True, mask_from=0):
    while True:
        for i in range(0, len(seqs) - batch_size + 1, batch_size):
            x = np.stack(seqs[i:i + batch_size])
            m = np.ones((batch_size, x.shape[1] - 1), np.float32)
            m[:, :mask_from] = 0
            yield mx.array(x[:, :-1]), mx.array(x[:, 1:]), mx.array(m)
        if not loop:
            return


def trained(folder, tmp, **kw):
    model, _ = load(folder)
    mx.random.seed(0)
    cfg = lora.apply_adapters(model, {"rank": 4, "alpha": 8.0})
    return model, cfg


def ragged(seqs, batch_size):
    """Micro-batches with different numbers of trained tokens (masks of varying length)."""
    for i in range(0, len(seqs), batch_size):
        x = np.stack(seqs[i:i + batch_size])
        m = np.ones((len(x), x.shape[1] - 1), np.float32)
        m[:, : 3 + 4 * (i // batch_size)] = 0
        yield mx.array(x[:, :-1]), mx.array(x[:, 1:]), mx.array(m)


def test_grad_accumulation_equals_one_bigger_batch(folders, tmp_path):
    """4 micro-batches of 2 (with different token counts) give the same update as one batch of 8."""
    import mlx.optimizers as optim

    seqs = task(8, 0)
    big = list(ragged(seqs, 2))
    big = [(mx.concatenate([b[0] for b in big]), mx.concatenate([b[1] for b in big]),
            mx.concatenate([b[2] for b in big]))]
    a, cfg = trained(folders["phi3"], tmp_path)
    train(a, sft_loss, iter(list(ragged(seqs, 2)) * 2), TrainArgs(iters=2, batch_size=2, grad_accum=4,
          save_every=100, report_every=1), tmp_path / "a", cfg, optimizer=optim.SGD(learning_rate=0.5))
    b, cfg = trained(folders["phi3"], tmp_path)
    train(b, sft_loss, iter(big * 2), TrainArgs(iters=2, batch_size=8, grad_accum=1, save_every=100,
          report_every=1), tmp_path / "b", cfg, optimizer=optim.SGD(learning_rate=0.5))
    pa, pb = dict(tree_flatten(a.trainable_parameters())), dict(tree_flatten(b.trainable_parameters()))
    assert max(float(mx.abs(pa[k] - pb[k]).max()) for k in pa) <= 1e-5
    moved = max(float(mx.abs(pa[k]).max()) for k in pa if k.endswith("lora_b"))
    assert moved > 1e-3  # and the update was not nothing
    # an unweighted mean of the micro-batch losses would differ: the check can fail
    c, cfg = trained(folders["phi3"], tmp_path)
    train(c, lambda m, bt: (sft_loss(m, bt)[0], mx.array(1)), iter(list(ragged(seqs, 2)) * 2),
          TrainArgs(iters=2, batch_size=2, grad_accum=4, save_every=100, report_every=1), tmp_path / "c", cfg,
          optimizer=optim.SGD(learning_rate=0.5))
    pc = dict(tree_flatten(c.trainable_parameters()))
    assert max(float(mx.abs(pc[k] - pb[k]).max()) for k in pc) > 1e-4


def test_resume_reproduces_an_uninterrupted_run(folders, tmp_path):
    seqs = task(12, 1)
    args = dict(batch_size=2, grad_accum=2, learning_rate=5e-3, warmup=2, save_every=3, report_every=1, seed=7)
    full, cfg = trained(folders["phi3"], tmp_path)
    whole = train(full, sft_loss, batches(seqs, 2), TrainArgs(iters=6, **args), tmp_path / "whole", cfg)
    part, cfg = trained(folders["phi3"], tmp_path)
    train(part, sft_loss, batches(seqs, 2), TrainArgs(iters=3, **args), tmp_path / "part", cfg)
    state = json.loads((tmp_path / "part" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["consumed"] == 6
    again, cfg = trained(folders["phi3"], tmp_path)  # a fresh process would start from the base too
    rest = train(again, sft_loss, batches(seqs, 2), TrainArgs(iters=6, **args), tmp_path / "part", cfg, resume=True)
    assert [r["step"] for r in rest] == [1, 2, 3, 4, 5, 6]
    assert np.allclose([r["loss"] for r in rest], [r["loss"] for r in whole], atol=1e-5, rtol=0)
    pw, pr = dict(tree_flatten(full.trainable_parameters())), dict(tree_flatten(again.trainable_parameters()))
    assert max(float(mx.abs(pw[k] - pr[k]).max()) for k in pw) <= 1e-5


def accuracy(model, seqs):
    model.eval()
    right = total = 0
    for x, y, _ in batches(seqs, 4, loop=False):
        p = np.array(mx.argmax(model(x), axis=-1))
        right += int((p == np.array(y)).sum())
        total += p.size
    return right / total


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["phi3", "phimoe"])
def test_training_lowers_validation_loss(folders, tmp_path, kind):
    """LoRA learns the successor task on held-out sequences: loss near ln(vocab) drops by > 1.5 nats (the
    random tiny model's final norm caps its logits near 4, so the floor is about 6.5) and next-token
    accuracy goes from 0 to at least 90%."""
    from phi3mlx.finetune.trainer import evaluate

    train_set, val_set = task(48, 2), task(8, 3)
    base, _ = load(folders[kind])
    before = evaluate(base, sft_loss, batches(val_set, 4, loop=False))["loss"]
    assert accuracy(base, val_set) < 0.05
    model, cfg = trained(folders[kind], tmp_path)
    hist = train(model, sft_loss, batches(train_set, 4), TrainArgs(iters=60, batch_size=4, learning_rate=1e-3,
                 warmup=4, val_every=60, save_every=60, report_every=10), tmp_path / kind, cfg,
                 val_batches=lambda: batches(val_set, 4, loop=False))
    after = hist[-1]["val_loss"]
    print(f"{kind}: validation loss {before:.2f} -> {after:.2f}, accuracy -> {accuracy(model, val_set):.2f}")
    assert before - after > 1.5, (before, after)  # measured 2.9 (phi3) and 2.0 (phimoe)
    assert accuracy(model, val_set) >= 0.9
    assert (tmp_path / kind / lora.ADAPTER_FILE).exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(folders, tmp_path):
    seqs = task(8, 4)
    model, cfg = trained(folders["phi3"], tmp_path)
    calls = {"n": 0}

    def loss(m, b):
        calls["n"] += 1
        l, n = sft_loss(m, b)
        return (l * float("nan") if calls["n"] > 3 else l), n

    with pytest.raises(Phi3MLXError, match=r"the loss became nan at step 4; stopped, the last good checkpoint is"):
        train(model, loss, batches(seqs, 2), TrainArgs(iters=10, batch_size=2, save_every=2, report_every=1,
              compile=False), tmp_path / "n", cfg)  # the loss counts its calls: not traceable
    state = json.loads((tmp_path / "n" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2
    w = mx.load(str(tmp_path / "n" / lora.ADAPTER_FILE))
    assert all(bool(mx.isfinite(v).all()) for v in w.values())


def test_bad_training_arguments(folders, tmp_path):
    model, cfg = trained(folders["phi3"], tmp_path)
    with pytest.raises(Phi3MLXError) as e:
        train(model, sft_loss, batches(task(4, 5), 2), TrainArgs(iters=0, batch_size=-1, learning_rate=0.0),
              tmp_path / "x", cfg)
    assert "--iters" in str(e.value) and "--batch-size" in str(e.value) and "--lr" in str(e.value)
    with pytest.raises(Phi3MLXError, match="nothing to resume"):
        train(model, sft_loss, batches(task(4, 5), 2), TrainArgs(iters=2, batch_size=2), tmp_path / "y", cfg,
              resume=True)


def test_ctrl_c_saves_a_resumable_checkpoint(folders, tmp_path):
    seqs = task(8, 6)
    model, cfg = trained(folders["phi3"], tmp_path)
    calls = {"n": 0}

    def loss(m, b):
        calls["n"] += 1
        if calls["n"] == 4:  # during step 4 (1 micro-batch a step)
            raise KeyboardInterrupt
        return sft_loss(m, b)

    with pytest.raises(Phi3MLXError, match=r"interrupted at step 3; saved a checkpoint in .*--resume"):
        train(model, loss, batches(seqs, 2), TrainArgs(iters=10, batch_size=2, save_every=100, report_every=1,
              compile=False), tmp_path / "i", cfg)
    state = json.loads((tmp_path / "i" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3 and (tmp_path / "i" / lora.ADAPTER_FILE).exists()
    again, cfg = trained(folders["phi3"], tmp_path)
    hist = train(again, sft_loss, batches(seqs, 2), TrainArgs(iters=5, batch_size=2, save_every=100, report_every=1),
                 tmp_path / "i", cfg, resume=True)
    assert [h["step"] for h in hist][-2:] == [4, 5]


def test_grad_checkpoint_gives_the_same_gradients(folders):
    """model.checkpoint_layers (what --grad-checkpoint sets) recomputes the layers: the same gradients."""
    import mlx.nn as nn

    from phi3mlx.models.decoder import DecoderLayer

    seqs = task(4, 7)
    batch = next(batches(seqs, 4))
    plain_call = DecoderLayer.__dict__["__call__"]
    grads = []
    for ckpt in (False, True):
        model, _ = trained(folders["phi3"], None)
        assert model.checkpoint_layers is False  # off unless asked for
        model.update(tree_map_add(model.trainable_parameters()))
        model.checkpoint_layers = ckpt
        _, g = nn.value_and_grad(model, lambda m, b: sft_loss(m, b)[0])(model, batch)
        grads.append(dict(tree_flatten(g)))
    assert DecoderLayer.__dict__["__call__"] is plain_call  # a flag on the instance, not a patched class
    assert max(float(mx.abs(grads[0][k] - grads[1][k]).max()) for k in grads[0]) <= 1e-6
    assert max(float(mx.abs(v).max()) for v in grads[0].values()) > 1e-4


def test_grad_checkpoint_flag_is_set_for_the_run_only(folders, tmp_path, monkeypatch):
    """train(grad_checkpoint=True) runs the layers under mx.checkpoint and restores the flag afterwards."""
    import phi3mlx.models.decoder as decoder

    calls = {"n": 0}
    real = decoder._checkpointed

    def counting(*a):
        calls["n"] += 1
        return real(*a)

    monkeypatch.setattr(decoder, "_checkpointed", counting)
    model, cfg = trained(folders["phi3"], tmp_path)
    train(model, sft_loss, batches(task(4, 8), 2), TrainArgs(iters=2, batch_size=2, save_every=100, report_every=1,
          grad_checkpoint=True, compile=False), tmp_path / "gc", cfg)
    assert calls["n"] == 2 * len(model.model.layers)  # every layer of both steps
    assert model.checkpoint_layers is False
    model(mx.array([[1, 2, 3]]))
    assert calls["n"] == 2 * len(model.model.layers)  # inference afterwards: plain layers


def tree_map_add(params):
    from mlx.utils import tree_map
    mx.random.seed(1)
    return tree_map(lambda p: p + 0.05 * mx.random.normal(p.shape), params)


def _params(model):
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def test_grad_clip_bounds_the_update_to_the_hand_computed_one(folders, tmp_path):
    """SGD with a huge lr: the clipped update is -lr * g * clip / ||g|| exactly, with ||g|| the global norm."""
    import mlx.nn as nn
    import mlx.optimizers as optim

    seqs = task(2, 10)
    batch = next(batches(seqs, 2))
    model, cfg = trained(folders["phi3"], tmp_path)
    model.update(tree_map_add(model.trainable_parameters()))  # lora_b != 0: every array gets a gradient
    before = _params(model)
    model.train()
    _, g = nn.value_and_grad(model, lambda m, b: sft_loss(m, b)[0])(model, batch)
    g = {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(g)}
    norm = np.sqrt(sum((v ** 2).sum() for v in g.values()))
    lr, clip = 1000.0, 0.1
    assert norm > 4 * clip  # clipping is active: unclipped, the update would be > 4x longer
    train(model, sft_loss, iter([batch]), TrainArgs(iters=1, batch_size=2, grad_clip=clip, save_every=100,
          report_every=1), tmp_path / "clip", cfg, optimizer=optim.SGD(learning_rate=lr))
    after = _params(model)
    step = {k: after[k].astype(np.float64) - before[k] for k in before}
    assert abs(np.sqrt(sum((v ** 2).sum() for v in step.values())) - lr * clip) <= 1e-3 * lr * clip
    for k in before:
        want = -lr * g[k] * clip / (norm + 1e-6)
        assert np.abs(step[k] - want).max() <= 1e-4 * lr * clip, k


def test_bad_grad_clip_is_named(folders, tmp_path):
    model, cfg = trained(folders["phi3"], tmp_path)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(Phi3MLXError, match=f"--grad-clip must be a positive number, got {bad}"):
            train(model, sft_loss, batches(task(4, 5), 2), TrainArgs(iters=1, batch_size=2, grad_clip=bad),
                  tmp_path / "x", cfg)


def test_the_compiled_step_holds_the_update_and_equals_the_plain_one(folders, tmp_path):
    """compile=True traces the optimizer update into the step (it runs in Python once per trace, not once
    per step) and trains exactly as the uncompiled step: AdamW, clipping and accumulation included."""
    import mlx.optimizers as optim

    class CountingAdamW(optim.AdamW):
        def apply_gradients(self, gradients, parameters):
            self.calls = getattr(self, "calls", 0) + 1
            return super().apply_gradients(gradients, parameters)

    seqs = task(8, 11)
    out = {}
    for compiled in (True, False):
        model, cfg = trained(folders["phi3"], tmp_path)
        opt = CountingAdamW(learning_rate=1e-2)
        hist = train(model, sft_loss, batches(seqs, 2), TrainArgs(iters=4, batch_size=2, grad_accum=2, grad_clip=1.0,
                     save_every=100, report_every=1, compile=compiled), tmp_path / f"c{compiled}", cfg, optimizer=opt)
        out[compiled] = (_params(model), [h["loss"] for h in hist], opt.calls, int(opt.step))
    (pc, lc, calls_c, steps_c), (pp, lp, calls_p, steps_p) = out[True], out[False]
    assert steps_c == steps_p == 4
    assert calls_p == 4 and calls_c == 1  # traced once: the update lives in the compiled step
    assert np.allclose(lc, lp, atol=1e-5, rtol=0)
    assert max(np.abs(pc[k] - pp[k]).max() for k in pc) <= 1e-5


def _interrupted_then_resumed(folders, tmp_path, name, interrupt, **kw):
    """Train 6 steps uninterrupted, and again with ``interrupt`` stopping it, then --resume: both results."""
    import mlx.optimizers as optim

    class SGD(optim.SGD):  # plain SGD that can fire ``interrupt`` from inside the update
        def apply_gradients(self, gradients, parameters):
            interrupt("update")
            return super().apply_gradients(gradients, parameters)

    seqs = task(16, 12)
    args = dict(batch_size=2, grad_accum=2, save_every=100, report_every=1, compile=False, seed=3)
    whole, cfg = trained(folders["phi3"], tmp_path)
    want = train(whole, sft_loss, batches(seqs, 2), TrainArgs(iters=6, **args), tmp_path / f"{name}-whole", cfg,
                 optimizer=optim.SGD(learning_rate=0.5))
    part, cfg = trained(folders["phi3"], tmp_path)

    def loss(m, b):
        interrupt("loss")
        return sft_loss(m, b)

    with pytest.raises(Phi3MLXError, match="interrupted at step") as e:
        train(part, loss, batches(seqs, 2), TrainArgs(iters=6, **args), tmp_path / name, cfg,
              optimizer=SGD(learning_rate=0.5))
    state = json.loads((tmp_path / name / "checkpoint" / "trainer_state.json").read_text())
    again, cfg = trained(folders["phi3"], tmp_path)
    got = train(again, sft_loss, batches(seqs, 2), TrainArgs(iters=6, **args), tmp_path / name, cfg, resume=True,
                optimizer=optim.SGD(learning_rate=0.5))
    return str(e.value), state, (whole, want), (again, got)


def _same_training(a, b):
    (ma, ha), (mb, hb) = a, b
    assert [h["step"] for h in ha] == [h["step"] for h in hb] == [1, 2, 3, 4, 5, 6]
    assert np.allclose([h["loss"] for h in ha], [h["loss"] for h in hb], atol=1e-6, rtol=0)
    pa, pb = _params(ma), _params(mb)
    assert max(np.abs(pa[k] - pb[k]).max() for k in pa) <= 1e-6


def test_ctrl_c_in_the_middle_of_a_step_gives_its_micro_batches_back(folders, tmp_path):
    """Interrupted in the second micro-batch of step 4: the checkpoint is step 3 at micro-batch 6, and the
    resumed run equals the uninterrupted one (before the fix it said 7 and skipped a batch)."""
    calls = {"loss": 0}

    def interrupt(where):
        if where == "loss":
            calls["loss"] += 1
            if calls["loss"] == 8:  # step 4, micro-batch 2
                raise KeyboardInterrupt

    msg, state, whole, resumed = _interrupted_then_resumed(folders, tmp_path, "mid", interrupt)
    assert "interrupted at step 3;" in msg
    assert (state["step"], state["consumed"]) == (3, 6)
    _same_training(whole, resumed)


@pytest.fixture
def sigint_default():
    """Python's own SIGINT handler for the test: a suite started as a background job inherits SIGINT ignored."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_during_the_update_counts_the_applied_step(folders, tmp_path, sigint_default):
    """A real SIGINT while step 4's update is applied: the step completes and is counted (step 4), so
    --resume does not apply it twice (before the fix: step 3 saved with 4 updates in the weights)."""
    import signal

    calls = {"update": 0}

    def interrupt(where):
        if where == "update":
            calls["update"] += 1
            if calls["update"] == 4:
                signal.raise_signal(signal.SIGINT)  # in this thread: delivered at once, even under load
                for _ in range(1000):  # Python runs the handler at the next check: give it many chances
                    pass

    msg, state, whole, resumed = _interrupted_then_resumed(folders, tmp_path, "upd", interrupt)
    assert "interrupted at step 4;" in msg
    assert (state["step"], state["consumed"]) == (4, 8)
    assert [h["step"] for h in state["history"]] == [1, 2, 3, 4]  # its report is kept too
    _same_training(whole, resumed)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_metrics_jsonl_has_one_line_per_report_across_a_resume(folders, tmp_path):
    calls = {"loss": 0}

    def interrupt(where):
        if where == "loss":
            calls["loss"] += 1
            if calls["loss"] == 7:  # step 4, micro-batch 1
                raise KeyboardInterrupt

    _, _, (_, want), (_, got) = _interrupted_then_resumed(folders, tmp_path, "met", interrupt)
    lines = [json.loads(x) for x in (tmp_path / "met" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert np.allclose([r["loss"] for r in lines], [h["loss"] for h in want], atol=1e-6, rtol=0)
    assert set(lines[0]) >= {"step", "loss", "lr", "tokens_per_sec", "peak_gb"}


def test_nothing_is_written_before_the_first_report(folders, tmp_path):
    model, cfg = trained(folders["phi3"], tmp_path)

    def broken(m, b):
        raise ValueError("shape trouble")

    with pytest.raises(ValueError):
        train(model, broken, batches(task(4, 5), 2), TrainArgs(iters=2, batch_size=2, compile=False), tmp_path / "no", cfg)
    assert not (tmp_path / "no").exists()


def test_kept_checkpoints_hold_each_saved_steps_adapters(folders, tmp_path):
    seqs = task(12, 3)
    args = dict(batch_size=2, learning_rate=5e-3, min_lr_ratio=1.0, save_every=2, report_every=1, seed=3)  # constant lr
    model, cfg = trained(folders["phi3"], tmp_path)
    train(model, sft_loss, batches(seqs, 2), TrainArgs(iters=5, keep_checkpoints=True, **args), tmp_path / "k", cfg)
    kept = sorted(p.name for p in (tmp_path / "k" / "steps").iterdir())
    assert kept == ["0000002", "0000004", "0000005"]  # every save_every and the end
    last = mx.load(str(tmp_path / "k" / "steps" / "0000005" / lora.ADAPTER_FILE))
    published = mx.load(str(tmp_path / "k" / lora.ADAPTER_FILE))
    assert all(bool(mx.array_equal(last[k], published[k])) for k in published)
    early = mx.load(str(tmp_path / "k" / "steps" / "0000002" / lora.ADAPTER_FILE))
    assert max(float(mx.abs(early[k] - last[k]).max()) for k in last) > 0  # a real earlier state, not a copy
    # a kept step loads on the base like any adapter folder, and equals the run at that step
    again, cfg2 = trained(folders["phi3"], tmp_path)
    train(again, sft_loss, batches(seqs, 2), TrainArgs(iters=2, **args), tmp_path / "two", cfg2)
    loaded, _ = load(folders["phi3"], adapter_path=str(tmp_path / "k" / "steps" / "0000002"))
    x = mx.array(seqs[0][None, :-1])
    again.eval()
    assert float(mx.abs(loaded(x) - again(x)).max()) <= 1e-5
    # Ctrl-C after step 4's update, before its save (in its report): the checkpoint and the kept copy of
    # step 4 are both written, and the resumed run keeps the rest
    def stop_at_4(rec):
        if rec["step"] == 4:
            raise KeyboardInterrupt

    cut, cfg4 = trained(folders["phi3"], tmp_path)
    with pytest.raises(Phi3MLXError, match="interrupted at step 4"):
        train(cut, sft_loss, batches(seqs, 2), TrainArgs(iters=5, keep_checkpoints=True, **args), tmp_path / "c", cfg4,
              report=stop_at_4)
    assert sorted(p.name for p in (tmp_path / "c" / "steps").iterdir()) == ["0000002", "0000004"]
    cut, cfg4 = trained(folders["phi3"], tmp_path)
    train(cut, sft_loss, batches(seqs, 2), TrainArgs(iters=5, keep_checkpoints=True, **args), tmp_path / "c", cfg4,
          resume=True)
    assert sorted(p.name for p in (tmp_path / "c" / "steps").iterdir()) == kept
    for step in kept:
        a = mx.load(str(tmp_path / "c" / "steps" / step / lora.ADAPTER_FILE))
        b = mx.load(str(tmp_path / "k" / "steps" / step / lora.ADAPTER_FILE))
        assert max(float(mx.abs(a[k] - b[k]).max()) for k in a) <= 1e-5, step
    # without the option nothing is kept
    plain, cfg3 = trained(folders["phi3"], tmp_path)
    train(plain, sft_loss, batches(seqs, 2), TrainArgs(iters=2, **args), tmp_path / "p", cfg3)
    assert not (tmp_path / "p" / "steps").exists()
