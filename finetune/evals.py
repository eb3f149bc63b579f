"""The held-out chat evaluation of ``synthetic.eval_sets``: a model answers each question greedily.

Each question is rendered alone (one user message) with the tokenizer's chat template; the reply is at
most ``MAX_REPLY_TOKENS`` tokens and stops at the tokenizer's end tokens. Scores:

* ``addition``: the reply's first number is the sum (``synthetic.addition_correct``);
* ``world``: the reply holds the expected text and does not refuse (``synthetic.world_correct``);
* ``unknown``: the reply says "I do not know" (``synthetic.says_unknown``).
"""

from __future__ import annotations

from typing import Callable, Optional

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
