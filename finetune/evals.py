"""The held-out chat evaluation of ``synthetic.eval_sets``: a model answers each question greedily.

Each question is rendered alone (one user message) with the tokenizer's chat template; the reply is at
most ``MAX_REPLY_TOKENS`` tokens and stops at the tokenizer's end tokens. Scores:

* ``addition``: the reply's first number is the sum (``synthetic.addition_correct``);
* ``world``: the reply holds the expected text and does not refuse (``synthetic.world_correct``);
* ``unknown``: the reply says "I do not know" (``synthetic.says_unknown``).
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx

from phi3mlx.generate import generate

from .synthetic import addition_correct, says_unknown, world_correct

MAX_REPLY_TOKENS = 24
SETS = ("addition", "world", "unknown")


def ask(model, tokenizer, question: str, max_tokens: int = MAX_REPLY_TOKENS) -> str:
    """The model's greedy reply to one user message."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return generate(model, tokenizer, prompt, max_tokens=max_tokens, temperature=0.0).strip()


def _items(name: str, rows) -> list[tuple[str, object, Callable[[str], bool]]]:
    """(question, expected, check) for every row of one set."""
    if name == "addition":
        return [(q, s, lambda r, s=s: addition_correct(r, s)) for q, _, _, s in rows]
    if name == "world":
        return [(q, e, lambda r, e=e: world_correct(r, e)) for q, e in rows]
    return [(q, "I do not know", says_unknown) for q in rows]


def evaluate_chat(model, tokenizer, sets: dict, limit: Optional[int] = None,
                  progress: Optional[Callable[[str, int, int], None]] = None) -> dict:
    """Accuracy on each set of ``sets`` (``eval_sets()``'s layout), the first ``limit`` questions of each.

    Returns ``{"addition": float, "world": float, "unknown": float}`` (fractions in [0, 1], only the sets
    given) plus ``"n"`` (questions asked per set) and ``"failures"`` (per set, a list of
    ``{"question", "reply", "expected"}``). ``progress(set_name, done, total)`` is called after each
    question."""
    out: dict = {"n": {}, "failures": {}}
    for name in SETS:
        if name not in sets:
            continue
        items = _items(name, sets[name])[:limit]
        right, failures = 0, []
        for i, (question, expected, check) in enumerate(items, start=1):
            reply = ask(model, tokenizer, question)
            if check(reply):
                right += 1
            else:
                failures.append({"question": question, "reply": reply, "expected": expected})
            if progress is not None:
                progress(name, i, len(items))
        out[name] = right / len(items) if items else 0.0
        out["n"][name] = len(items)
        out["failures"][name] = failures
    return out


def teacher_forced(model, tokenizer, pairs: list[tuple[str, str]]) -> dict:
    """How well the model predicts each answer after its prompt, token by token (no sampling).

    ``pairs``: (prompt text, answer text); the answer's tokens are those of ``prompt + answer`` past the
    prompt's. Returns ``{"exact": fraction of answers whose every token is the argmax, "token_accuracy":
    fraction of answer tokens that are, "logprob": mean log-probability of an answer token}``."""
    exact = right = total = 0
    logprob = 0.0
    for prompt, answer in pairs:
        p = tokenizer.encode(prompt, add_special_tokens=False)
        ids = tokenizer.encode(prompt + answer, add_special_tokens=False)
        shared = next((i for i, (a, b) in enumerate(zip(p, ids)) if a != b), min(len(p), len(ids)))
        n = len(ids) - shared  # a token merged across the boundary counts as the answer's
        if n <= 0:
            continue
        logits = model(mx.array([ids[:-1]]))[0, -n:].astype(mx.float32)
        target = mx.array(ids[-n:])
        hits = (mx.argmax(logits, axis=-1) == target)
        lp = logits[mx.arange(n), target] - mx.logsumexp(logits, axis=-1)
        k = int(hits.sum())
        right += k
        total += n
        exact += int(k == n)
        logprob += float(lp.sum())
    return {"exact": exact / max(1, len(pairs)), "token_accuracy": right / max(1, total),
            "logprob": logprob / max(1, total)}
