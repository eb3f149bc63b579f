"""Training losses: supervised fine-tuning (masked cross-entropy) and DPO-style preference losses.

Models are called as ``model(inputs)`` with inputs (B, L) int32 and return logits (B, L, V).
An SFT batch is ``(inputs, targets, loss_mask)``: inputs/targets (B, L) int32 (targets are the inputs
shifted by one), loss_mask (B, L) float32 with 1 where the target token counts. A DPO batch is
``{"chosen": (inputs, targets, mask), "rejected": (inputs, targets, mask)}`` whose masks cover only the
response tokens. All log-probabilities are computed in float32 whatever the logits' dtype.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from phi3mlx.adapters import adapters_disabled
from phi3mlx.errors import Phi3MLXError

Batch = Tuple[mx.array, mx.array, mx.array]
DPO_KINDS = ("sigmoid", "ipo", "hinge")


def token_logps(logits: mx.array, targets: mx.array) -> mx.array:
    """Log-probability of each target token: log_softmax(logits)[..., target], in float32.

    logits (B, L, V) any float dtype, targets (B, L) int -> (B, L) float32.
    """
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None].astype(mx.int32), axis=-1).squeeze(-1)
    return picked - mx.logsumexp(logits, axis=-1)


def sft_loss(model: nn.Module, batch: Batch) -> Tuple[mx.array, mx.array]:
    """Mean cross-entropy over the masked target tokens, and how many tokens that is.

    batch: inputs (B, L) int32, targets (B, L) int32, loss_mask (B, L) float32.
    Returns (loss, ntokens): a float32 scalar (0 when nothing is masked in) and an int32 scalar.
    Differentiable with respect to the model's parameters (for ``nn.value_and_grad``).
    """
    inputs, targets, mask = batch
    mask = mask.astype(mx.float32)
    logps = token_logps(model(inputs), targets)  # (B, L)
    count = mask.sum()
    loss = -(logps * mask).sum() / mx.maximum(count, 1.0)
    return loss, count.astype(mx.int32)


def make_image_sft_loss(rows_for: Callable) -> Callable:
    """``sft_loss`` for batches with image positions (negative ids): ``rows_for(inputs)`` gives their
    rows (a frozen vision tower's output, ``data.ImageTable.rows_for``). Runs uncompiled (the rows are
    looked up on the host)."""

    def loss(model: nn.Module, batch: Batch) -> Tuple[mx.array, mx.array]:
        inputs, targets, mask = batch
        rows = rows_for(np.array(inputs))
        mask = mask.astype(mx.float32)
        logps = token_logps(model(inputs, image_rows=rows), mx.maximum(targets, 0))  # image targets are masked out
        count = mask.sum()
        return -(logps * mask).sum() / mx.maximum(count, 1.0), count.astype(mx.int32)

    return loss


def sequence_logps(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """Sum of the masked target-token log-probabilities of each sequence.

    inputs/targets (B, L) int32, mask (B, L) -> (B,) float32.
    """
    return (token_logps(model(inputs), targets) * mask.astype(mx.float32)).sum(axis=-1)


def check_dpo_settings(beta: float, kind: str, label_smoothing: float = 0.0) -> None:
    """Raise Phi3MLXError for settings dpo_loss cannot use: one line, problems joined by "; ", kinds named."""
    problems = []
    if kind not in DPO_KINDS:
        problems.append(f"unknown DPO loss kind {kind!r}")
    if not beta > 0:
        problems.append(f"DPO beta must be > 0, got {beta!r}")
    if not 0.0 <= label_smoothing <= 0.5:
        problems.append(f"DPO label_smoothing must be in [0, 0.5], got {label_smoothing!r}")
    elif label_smoothing > 0 and kind in DPO_KINDS and kind != "sigmoid":
        problems.append(f"DPO label_smoothing applies to kind 'sigmoid' only, not {kind!r}")
    if problems:
        raise Phi3MLXError("; ".join(problems) + f" (accepted kinds: {', '.join(DPO_KINDS)})")


def dpo_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    ref_chosen: mx.array,
    ref_rejected: mx.array,
    beta: float = 0.1,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> Tuple[mx.array, Dict[str, mx.array]]:
    """Preference loss from summed sequence log-probabilities, each (B,); mean over the batch.

    With z = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected) per pair:
      sigmoid: -(1 - eps) * logsigmoid(beta * z) - eps * logsigmoid(-beta * z)   (eps = label_smoothing)
      ipo:     (z - 1 / (2 * beta)) ** 2
      hinge:   relu(1 - beta * z)
    Returns (loss, metrics) with float32 scalars: chosen_reward = mean beta * (policy_chosen - ref_chosen),
    rejected_reward = mean beta * (policy_rejected - ref_rejected), reward_margin = mean of their
    difference, accuracy = fraction of pairs whose chosen reward beats the rejected one.
    """
    check_dpo_settings(beta, kind, label_smoothing)
    shapes = {a.shape for a in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise Phi3MLXError(f"DPO log-probs must all have the same shape (B,), got {sorted(shapes)}")
    pc, pr, rc, rr = (a.astype(mx.float32) for a in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    z = (pc - pr) - (rc - rr)  # (B,)
    if kind == "sigmoid":
        losses = -(1.0 - label_smoothing) * nn.log_sigmoid(beta * z) - label_smoothing * nn.log_sigmoid(-beta * z)
    elif kind == "ipo":
        losses = (z - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
        losses = nn.relu(1.0 - beta * z)
    chosen = mx.stop_gradient(beta * (pc - rc))
    rejected = mx.stop_gradient(beta * (pr - rr))
    metrics = {
        "chosen_reward": chosen.mean(),
        "rejected_reward": rejected.mean(),
        "reward_margin": (chosen - rejected).mean(),
        "accuracy": (chosen > rejected).astype(mx.float32).mean(),
    }
    return losses.mean(), metrics


def pad_to(x: mx.array, length: int) -> mx.array:
    """Right-pad a (B, L) array with zeros to (B, length)."""
    return mx.pad(x, [(0, 0), (0, length - x.shape[1])]) if x.shape[1] < length else x


def concat_pairs(chosen: Batch, rejected: Batch) -> Batch:
    """Stack chosen over rejected along the batch axis, right-padding both to the longer length.

    Each side is (inputs, targets, mask), all (B, Lc) resp. (B, Lr) -> three (2B, max(Lc, Lr)) arrays.
    Padded positions get mask 0; with causal attention they do not change the logits before them.
    """
    if chosen[0].shape[0] != rejected[0].shape[0]:
        rows = (chosen[0].shape[0], rejected[0].shape[0])
        raise Phi3MLXError(f"DPO batch: chosen and rejected need the same number of rows, got {rows[0]} and {rows[1]}")
    length = max(chosen[0].shape[1], rejected[0].shape[1])
    return tuple(mx.concatenate([pad_to(c, length), pad_to(r, length)], axis=0) for c, r in zip(chosen, rejected))


def reference_logps(model: nn.Module, reference: Optional[nn.Module], inputs: mx.array, targets: mx.array,
                    mask: mx.array) -> mx.array:
    """Stop-gradient'ed (N,) sequence log-probs from ``reference``, else from ``model`` with adapters off."""
    if reference is not None:
        return mx.stop_gradient(sequence_logps(reference, inputs, targets, mask))
    with adapters_disabled(model):
        logps = mx.stop_gradient(sequence_logps(model, inputs, targets, mask))
    return logps


def make_dpo_loss(
    beta: float,
    kind: str = "sigmoid",
    reference: Optional[nn.Module] = None,
    label_smoothing: float = 0.0,
) -> Callable[[nn.Module, Dict[str, Batch]], Tuple[mx.array, mx.array, Dict[str, mx.array]]]:
    """A DPO loss function ``fn(model, batch) -> (loss, ntokens, metrics)`` for ``nn.value_and_grad``.

    batch: {"chosen": (inputs, targets, mask), "rejected": (inputs, targets, mask)}, each (B, L*) with
    its own length. The policy sees chosen and rejected in one forward pass of shape (2B, max L). The
    reference log-probs come from ``reference`` if given, else from ``model`` itself inside
    ``phi3mlx.adapters.adapters_disabled(model)``; either way without gradient. ntokens (int32
    scalar) counts the masked response tokens of chosen and rejected together.
    Settings are checked here, so a bad kind or beta fails before training starts.
    """
    check_dpo_settings(beta, kind, label_smoothing)

    def loss_fn(model: nn.Module, batch: Dict[str, Batch]) -> Tuple[mx.array, mx.array, Dict[str, mx.array]]:
        inputs, targets, mask = concat_pairs(batch["chosen"], batch["rejected"])
        rows = batch["chosen"][0].shape[0]
        policy = sequence_logps(model, inputs, targets, mask)  # (2B,)
        ref = reference_logps(model, reference, inputs, targets, mask)  # (2B,)
        loss, metrics = dpo_loss(policy[:rows], policy[rows:], ref[:rows], ref[rows:], beta, kind, label_smoothing)
        ntokens = mask.astype(mx.float32).sum().astype(mx.int32)
        return loss, ntokens, metrics

    return loss_fn
