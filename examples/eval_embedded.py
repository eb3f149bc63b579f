"""Score a chat model on the held-out questions of the synthetic data (additions, the valley, unknowns).

    python examples/eval_embedded.py [--model PATH] [--limit N] [--json]

The default model is the command line's default (phi3mlx:tiny). Answers are greedy, at most 24 tokens.
"""

from __future__ import annotations

import argparse
import json
import sys

from phi3mlx.cli import DEFAULT_MODEL
from phi3mlx.errors import Phi3MLXError
from phi3mlx.finetune.evals import SETS, evaluate_chat
from phi3mlx.finetune.synthetic import eval_sets
from phi3mlx.loader import load

SHOW_FAILURES = 3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder or hub id (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="ask only the first N questions of each set")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    a = p.parse_args(argv)
    try:
        model, tok = load(a.model)
    except Phi3MLXError as e:
        print(f"eval_embedded: error: {e}", file=sys.stderr)
        return 1

    def progress(name: str, done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{name}: {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    res = evaluate_chat(model, tok, eval_sets(), limit=a.limit, progress=progress)
    if a.json:
        print(json.dumps({k: res[k] for k in SETS} | {"n": res["n"]}))
        return 0
    for name in SETS:
        print(f"{name:9s} {100 * res[name]:5.1f}%  ({res['n'][name]} questions)")
        for f in res["failures"][name][:SHOW_FAILURES]:
            print(f"    Q: {f['question']}\n    A: {f['reply']!r}  (expected {f['expected']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
