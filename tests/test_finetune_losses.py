"""phi3mlx.finetune.losses against independent torch computations of the same formulas."""

from __future__ import annotations

import types
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from phi3mlx import load
from phi3mlx.errors import Phi3MLXError
from phi3mlx.finetune.losses import (
    dpo_loss,
    make_dpo_loss,
    sequence_logps,
    sft_loss,
    token_logps,
)
from phi3mlx.tiny import make_tiny

try:  # the independent reference computations; the tests that need them skip without torch
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = F = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is needed for the reference computations")

KINDS = ("sigmoid", "ipo", "hinge")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Two one-layer tiny Phi-3 models with different random weights: (policy, reference)."""
    models = []
    for seed in (0, 1):
        folder = make_tiny(tmp_path_factory.mktemp(f"tiny{seed}") / "m", seed=seed, config={"num_hidden_layers": 1})
        models.append(load(str(folder))[0])
    return tuple(models)


def random_tokens(rng: np.random.Generator, rows: int, length: int, vocab: int = 32000) -> tuple:
    """(inputs, targets) (rows, length) int32 with targets = inputs shifted by one."""
    seq = rng.integers(0, vocab, size=(rows, length + 1))
    return mx.array(seq[:, :-1], dtype=mx.int32), mx.array(seq[:, 1:], dtype=mx.int32)


def response_mask(rows: int, length: int, starts: list) -> mx.array:
    """(rows, length) float32 mask with 1 from each row's response start on."""
    m = np.zeros((rows, length), np.float32)
    for i, s in enumerate(starts):
        m[i, s:] = 1.0
    return mx.array(m)


def torch_token_logps(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    lp = F.log_softmax(torch.tensor(logits, dtype=torch.float64), dim=-1)
    return lp.gather(-1, torch.tensor(targets, dtype=torch.int64)[..., None]).squeeze(-1).numpy()


# token_logps


@needs_torch
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_token_logps_matches_torch(scale):
    rng = np.random.default_rng(0)
    logits = (scale * rng.standard_normal((2, 5, 11))).astype(np.float32)
    targets = rng.integers(0, 11, size=(2, 5)).astype(np.int32)
    got = token_logps(mx.array(logits), mx.array(targets))
    assert got.shape == (2, 5) and got.dtype == mx.float32
    got = np.array(got)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, torch_token_logps(logits, targets), rtol=1e-6, atol=1e-5)


@needs_torch
def test_token_logps_upcasts_bfloat16():
    rng = np.random.default_rng(1)
    logits = mx.array(8 * rng.standard_normal((3, 4, 300)).astype(np.float32)).astype(mx.bfloat16)
    targets = rng.integers(0, 300, size=(3, 4)).astype(np.int32)
    got = token_logps(logits, mx.array(targets))
    assert got.dtype == mx.float32
    exact = torch_token_logps(np.array(logits.astype(mx.float32)), targets)
    np.testing.assert_allclose(np.array(got), exact, rtol=1e-6, atol=1e-5)


# sft_loss


@needs_torch
def test_sft_loss_matches_torch_on_tiny_model(tiny_models):
    model = tiny_models[0]
    rng = np.random.default_rng(2)
    inputs, targets = random_tokens(rng, 2, 6)
    mask = mx.array(np.array([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]], np.float32))
    loss, ntokens = sft_loss(model, (inputs, targets, mask))
    assert ntokens.item() == 7 and ntokens.shape == ()

    logits = torch.tensor(np.array(model(inputs)), dtype=torch.float64)
    ce = F.cross_entropy(logits.flatten(0, 1), torch.tensor(np.array(targets)).long().flatten(), reduction="none")
    m = torch.tensor(np.array(mask)).flatten().double()
    expected = (ce * m).sum() / m.sum()
    assert abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item())
    # An unmasked mean would differ: the mask must matter.
    assert abs(ce.mean().item() - expected.item()) > 1e-3


def test_sft_loss_empty_mask_is_zero(tiny_models):
    inputs, targets = random_tokens(np.random.default_rng(3), 1, 4)
    loss, ntokens = sft_loss(tiny_models[0], (inputs, targets, mx.zeros((1, 4))))
    assert loss.item() == 0.0 and ntokens.item() == 0


class TinyLM(nn.Module):
    """Embedding -> linear head: logits (B, L, V) for inputs (B, L)."""

    def __init__(self, vocab: int = 13, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def __call__(self, x: mx.array) -> mx.array:
        return self.head(mx.tanh(self.embed(x)))


@needs_torch
def test_sft_loss_gradient_matches_torch_autograd():
    mx.random.seed(4)
    model = TinyLM()
    rng = np.random.default_rng(4)
    inputs, targets = random_tokens(rng, 3, 5, vocab=13)
    mask = mx.array((rng.random((3, 5)) < 0.6).astype(np.float32))
    (loss, ntokens), grads = nn.value_and_grad(model, sft_loss)(model, (inputs, targets, mask))

    params = tree_flatten(model.parameters())
    p = {k: torch.tensor(np.array(v), dtype=torch.float64, requires_grad=True) for k, v in params}
    h = torch.tanh(p["embed.weight"][torch.tensor(np.array(inputs)).long()])
    logits = h @ p["head.weight"].T + p["head.bias"]
    m = torch.tensor(np.array(mask), dtype=torch.float64)
    ce = F.cross_entropy(logits.flatten(0, 1), torch.tensor(np.array(targets)).long().flatten(), reduction="none")
    expected = (ce * m.flatten()).sum() / m.sum()
    expected.backward()

    assert ntokens.item() == int(m.sum().item())
    assert abs(loss.item() - expected.item()) < 1e-5
    got = dict(tree_flatten(grads))
    assert set(got) == set(p)
    for k, t in p.items():
        assert np.abs(t.grad.numpy()).max() > 1e-4, k
        np.testing.assert_allclose(np.array(got[k]), t.grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=k)


# dpo_loss


def torch_dpo(pc, pr, rc, rr, beta, kind, eps):
    """The published formulas, in float64 torch: (loss, metrics)."""
    pc, pr, rc, rr = (torch.tensor(a, dtype=torch.float64) for a in (pc, pr, rc, rr))
    z = (pc - pr) - (rc - rr)
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * z) * (1 - eps) - F.logsigmoid(-beta * z) * eps
    elif kind == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * z)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    metrics = {
        "chosen_reward": chosen.mean(),
        "rejected_reward": rejected.mean(),
        "reward_margin": (chosen - rejected).mean(),
        "accuracy": (chosen > rejected).double().mean(),
    }
    return losses.mean().item(), {k: v.item() for k, v in metrics.items()}


@needs_torch
@pytest.mark.parametrize(
    "kind,beta,eps",
    [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("sigmoid", 0.1, 0.2), ("ipo", 0.1, 0.0), ("ipo", 0.8, 0.0),
     ("hinge", 0.1, 0.0), ("hinge", 0.05, 0.0)],
)
def test_dpo_loss_matches_torch(kind, beta, eps):
    rng = np.random.default_rng(5)
    logps = [(-rng.uniform(5, 40, size=16)).astype(np.float32) for _ in range(4)]
    loss, metrics = dpo_loss(*(mx.array(a) for a in logps), beta=beta, kind=kind, label_smoothing=eps)
    expected, expected_metrics = torch_dpo(*logps, beta, kind, eps)
    assert loss.shape == () and loss.dtype == mx.float32
    assert abs(loss.item() - expected) <= 1e-6 * max(1.0, abs(expected))
    assert set(metrics) == set(expected_metrics)
    for k, v in expected_metrics.items():
        assert metrics[k].shape == ()
        assert abs(metrics[k].item() - v) <= 1e-6 * max(1.0, abs(v)), k
    assert 0.0 < expected_metrics["accuracy"] < 1.0  # both outcomes occur in the sample


def test_dpo_sigmoid_gradient_is_beta_times_sigmoid():
    # d/dpc of -logsigmoid(beta z) = -beta * sigmoid(-beta z) / B
    pc, pr, rc, rr = mx.array([-3.0, -7.0]), mx.array([-5.0, -2.0]), mx.array([-4.0, -4.0]), mx.array([-4.5, -3.0])
    beta = 0.3
    grad = mx.grad(lambda x: dpo_loss(x, pr, rc, rr, beta=beta)[0])(pc)
    z = np.array((pc - pr) - (rc - rr))
    expected = -beta / (1 + np.exp(beta * z)) / 2
    np.testing.assert_allclose(np.array(grad), expected, rtol=1e-6)


# errors


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(kind="kto"), "'kto'"),
        (dict(kind="SIGMOID"), "'SIGMOID'"),
        (dict(beta=0.0), "beta must be > 0, got 0.0"),
        (dict(beta=-1.0), "beta must be > 0, got -1.0"),
        (dict(beta=float("nan")), "beta must be > 0"),
        (dict(label_smoothing=0.7), "label_smoothing"),
        (dict(kind="ipo", label_smoothing=0.1), "label_smoothing"),
    ],
)
def test_dpo_bad_settings(kwargs, needle):
    args = dict(beta=0.1, kind="sigmoid")
    args.update(kwargs)
    x = mx.zeros((2,))
    for call in (lambda: dpo_loss(x, x, x, x, **args), lambda: make_dpo_loss(**args)):
        with pytest.raises(Phi3MLXError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and needle in msg
        assert "sigmoid, ipo, hinge" in msg


def test_dpo_bad_kind_and_beta_reported_together():
    with pytest.raises(Phi3MLXError, match=r"unknown DPO loss kind 'x'; DPO beta must be > 0, got 0"):
        make_dpo_loss(0, "x")


def test_dpo_loss_shape_mismatch():
    with pytest.raises(Phi3MLXError, match="same shape"):
        dpo_loss(mx.zeros((2,)), mx.zeros((3,)), mx.zeros((2,)), mx.zeros((2,)))


# make_dpo_loss


def pair_batch(rng: np.random.Generator, rows: int, chosen_len: int, rejected_len: int, vocab: int = 32000) -> dict:
    """A DPO batch of two rows; responses start at tokens 2, 3 (chosen) and 1, 2 (rejected)."""
    chosen = random_tokens(rng, rows, chosen_len, vocab)
    rejected = random_tokens(rng, rows, rejected_len, vocab)
    return {
        "chosen": (*chosen, response_mask(rows, chosen_len, [2, 3])),
        "rejected": (*rejected, response_mask(rows, rejected_len, [1, 2])),
    }


@pytest.mark.parametrize("kind", KINDS)
def test_make_dpo_loss_reference_model_matches_separate_passes(tiny_models, kind, monkeypatch):
    policy, reference = tiny_models
    batch = pair_batch(np.random.default_rng(6), 2, 7, 4)
    calls = []
    model_call = type(policy).__call__

    def recording_call(self, inputs, *args, **kwargs):
        calls.append((self is policy, tuple(inputs.shape)))
        return model_call(self, inputs, *args, **kwargs)

    monkeypatch.setattr(type(policy), "__call__", recording_call)
    loss, ntokens, metrics = make_dpo_loss(0.2, kind, reference=reference)(policy, batch)
    # One policy pass over chosen+rejected, padded to the longer length; one reference pass likewise.
    assert calls == [(True, (4, 7)), (False, (4, 7))]
    monkeypatch.undo()

    separate = [sequence_logps(m, *batch[side]) for m in (policy, reference) for side in ("chosen", "rejected")]
    expected, expected_metrics = dpo_loss(*separate, beta=0.2, kind=kind)
    assert ntokens.item() == 5 + 4 + 3 + 2
    assert abs(loss.item() - expected.item()) <= 1e-5 * max(1.0, abs(expected.item()))
    for k, v in expected_metrics.items():
        assert abs(metrics[k].item() - v.item()) <= 1e-5 * max(1.0, abs(v.item())), k
    assert abs(expected_metrics["reward_margin"].item()) > 1e-3  # policy and reference do differ


class AdapterLM(nn.Module):
    """TinyLM plus an additive adapter head that a stand-in ``adapters_disabled`` switches off."""

    def __init__(self, calls: list, vocab: int = 17, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.adapter = nn.Linear(dim, vocab, bias=False)
        self.adapters_on = True
        self.recorder = types.SimpleNamespace(calls=calls)

    def __call__(self, x: mx.array) -> mx.array:
        self.recorder.calls.append((tuple(x.shape), self.adapters_on))
        h = mx.tanh(self.embed(x))
        out = self.head(h)
        return out + self.adapter(h) if self.adapters_on else out


@pytest.fixture
def stand_in_lora(monkeypatch):
    """Replace the adapters_disabled that phi3mlx.finetune.losses uses (phi3mlx.adapters') by one that flips
    ``adapters_on``."""

    @contextmanager
    def adapters_disabled(model):
        model.adapters_on = False
        try:
            yield model
        finally:
            model.adapters_on = True

    from phi3mlx.finetune import losses

    monkeypatch.setattr(losses, "adapters_disabled", adapters_disabled)
    return adapters_disabled


def test_make_dpo_loss_reference_is_model_without_adapters(stand_in_lora):
    calls = []
    mx.random.seed(7)
    model = AdapterLM(calls)
    rng = np.random.default_rng(7)
    batch = pair_batch(rng, 2, 6, 5, vocab=17)
    beta = 0.5

    with stand_in_lora(model):
        ref = [mx.stop_gradient(sequence_logps(model, *batch[s])) for s in ("chosen", "rejected")]
    mx.eval(ref)

    def expected_loss(m, b):
        policy = [sequence_logps(m, *b[s]) for s in ("chosen", "rejected")]
        return dpo_loss(*policy, *ref, beta=beta)[0]

    def leaky_loss(m, b):  # the reference pass without stop_gradient: must give other gradients
        policy = [sequence_logps(m, *b[s]) for s in ("chosen", "rejected")]
        with stand_in_lora(m):
            leaked = [sequence_logps(m, *b[s]) for s in ("chosen", "rejected")]
        return dpo_loss(*policy, *leaked, beta=beta)[0]

    calls.clear()
    (loss, ntokens, metrics), grads = nn.value_and_grad(model, make_dpo_loss(beta, "sigmoid"))(model, batch)
    assert calls == [((4, 6), True), ((4, 6), False)]
    assert model.adapters_on  # switched back on afterwards
    assert ntokens.item() == 4 + 3 + 4 + 3

    want, want_grads = nn.value_and_grad(model, expected_loss)(model, batch)
    _, leaky_grads = nn.value_and_grad(model, leaky_loss)(model, batch)
    assert abs(loss.item() - want.item()) < 1e-6
    got, want_grads, leaky_grads = (dict(tree_flatten(g)) for g in (grads, want_grads, leaky_grads))
    for k in want_grads:
        np.testing.assert_allclose(np.array(got[k]), np.array(want_grads[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    assert np.abs(np.array(leaky_grads["head.weight"] - want_grads["head.weight"])).max() > 1e-4
    assert abs(metrics["reward_margin"].item()) > 1e-4
