"""Pick the best kept checkpoint of a chat-tuning run (``phi3mlx lora --keep-checkpoints``).

    python examples/select_embedded.py --adapters runs/embedded-chat7 [--model BASE] [--limit N]

Every ``ADAPTERS/steps/NNNNNNN`` is loaded on the base model (default: the base_model its
adapter_config.json records) and scored on ``synthetic.selection_sets()``: additions drawn like the
training pairs, each world fact in another phrasing, unknowns about training-pool names. The held-out
questions of ``examples/eval_embedded.py`` are never used here, so the final score stays unbiased.

The score of a checkpoint is the mean of its three accuracies; the highest wins (ties: the later step).
The table goes to stderr and into ADAPTERS/selection.json; the chosen folder is printed on stdout, so a
script can fuse it: ``phi3mlx fuse --adapter-path "$(python examples/select_embedded.py ...)" ...``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from phi3mlx.errors import Phi3MLXError
from phi3mlx.finetune.evals import SETS, evaluate_chat
from phi3mlx.finetune.lora import read_adapter_config
from phi3mlx.finetune.synthetic import selection_sets
from phi3mlx.finetune.trainer import STEPS
from phi3mlx.loader import load


def score(res: dict) -> float:
    return sum(res[k] for k in SETS) / len(SETS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", required=True, help="the run's --adapter-path (holds steps/NNNNNNN)")
    p.add_argument("--model", default=None, help="the base model (default: the one adapter_config.json records)")
    p.add_argument("--limit", type=int, default=None, help="ask only the first N questions of each set")
    a = p.parse_args(argv)
    run = Path(a.adapters)
    steps = sorted(d for d in (run / STEPS).iterdir() if d.is_dir() and re.fullmatch(r"\d{7}", d.name)) \
        if (run / STEPS).is_dir() else []
    if not steps:
        print(f"select_embedded: error: {run / STEPS} holds no kept checkpoints (train with --keep-checkpoints)",
              file=sys.stderr)
        return 1
    try:
        base = a.model or read_adapter_config(steps[-1]).get("base_model")
        if not base:
            raise Phi3MLXError(f"{steps[-1]} records no base_model; pass --model")
        sets = selection_sets()
        rows = []
        for d in steps:
            model, tok = load(base, adapter_path=str(d))
            res = evaluate_chat(model, tok, sets, limit=a.limit)
            row = {"step": int(d.name), "path": str(d), **{k: res[k] for k in SETS}, "score": score(res)}
            rows.append(row)
            print(f"step {row['step']:6d}  " + "  ".join(f"{k} {100 * row[k]:5.1f}%" for k in SETS)
                  + f"  score {100 * row['score']:5.1f}", file=sys.stderr, flush=True)
    except Phi3MLXError as e:
        print(f"select_embedded: error: {e}", file=sys.stderr)
        return 1
    best = max(rows, key=lambda r: (r["score"], r["step"]))
    (run / "selection.json").write_text(json.dumps({"base": str(base), "rows": rows, "best": best}, indent=1))
    print(f"best: step {best['step']} ({100 * best['score']:.1f})", file=sys.stderr)
    print(best["path"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
