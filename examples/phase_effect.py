"""The Phi-3 report's two phases at toy scale: phase 1 alone against phase 1 + phase 2, same total tokens.

Two models of the same shape are pretrained from scratch with ``phi3mlx pretrain``'s code and the same
seed on the same number of tokens:

* **phase 1 only**: all tokens are general text (the Python standard library's documentation);
* **phase 1 + 2**: the first half general text, the second half the report's kind of phase 2: a little
  general text mixed with synthetic textbook lessons and chats.

Both are then scored, without any fine-tuning, on questions no training text holds
(``synthetic.HELDOUT_ADDITION``), teacher-forced (``evals.teacher_forced``): the sum after
``"<chat prompt>The answer is "`` and after ``"So A + B ="`` (the textbook form), plus greedy
exact-match on the chat questions; and on the validation loss of general text (what phase 2 costs).

    python examples/phase_effect.py                    # ~8 min on a 2-core CPU
    python examples/phase_effect.py --tokens 1200000 --width 256 --json phases.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from phi3mlx.finetune import evals
from phi3mlx.finetune import pretrain as P
from phi3mlx.finetune import pretrain_data as PD
from phi3mlx.finetune.losses import sft_loss
from phi3mlx.finetune.trainer import evaluate
from phi3mlx.finetune.synthetic import HELDOUT_ADDITION, eval_sets


def config(a, out: Path, two_phases: bool) -> P.PretrainConfig:
    half = a.tokens // 2
    phases = ([{"name": "general", "tokens": half, "mix": {"general": 1}},
               {"name": "textbook", "tokens": a.tokens - half, "mix": {"general": 0.1, "textbook": 0.3, "chat": 0.6}}]
              if two_phases else [{"name": "general", "tokens": a.tokens, "mix": {"general": 1}}])
    return P.PretrainConfig(
        out=str(out), model={"hidden_size": a.width, "intermediate_size": 2 * a.width, "num_hidden_layers": a.layers,
                             "num_attention_heads": a.width // 64, "max_position_embeddings": 512,
                             "original_max_position_embeddings": 512},
        tokenizer={"vocab_size": 1024, "sources": ["general", "textbook", "chat"]},
        sources={"general": {"builtin": "general"}, "textbook": {"builtin": "textbook", "docs": 30000, "seed": 1},
                 "chat": {"builtin": "dialogues", "docs": 60000, "seed": 2}},
        phases=phases, seq_len=128, batch_size=32, lr=3e-3, schedule="wsd", warmup=50, seed=a.seed,
        val_every=10**9, save_every=10**9, report_every=50, cache_dir=a.cache_dir)


def score(prep: P.Prepared) -> dict:
    tok, model = prep.tokenizer, prep.model
    model.eval()
    chat = [(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
             + "The answer is ", str(s)) for q, _, _, s in eval_sets()["addition"]]
    book = [(f"So {x} + {y} =", f" {x + y}.") for x, y in HELDOUT_ADDITION]
    out = {"chat_sum": evals.teacher_forced(model, tok, chat), "textbook_sum": evals.teacher_forced(model, tok, book)}
    greedy = evals.evaluate_chat(model, tok, {"addition": eval_sets()["addition"]}, limit=60)
    out["chat_greedy_exact"] = greedy["addition"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=600_000, help="total training tokens of each model")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    a = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        for name, two in (("phase 1 only", False), ("phase 1 + 2", True)):
            prep = P.prepare(config(a, Path(d) / name.replace(" ", ""), two), force=True)
            hist = P.run(prep)
            val = PD.validation_batches(prep.windows, PD.Phase("general", 1, {"general": 1}), 32, 8)
            rows[name] = {**score(prep), "general_val_loss": evaluate(prep.model, sft_loss, val())["loss"],
                          "train_loss": hist[-1]["loss"]}
            print(name, json.dumps(rows[name]), flush=True)
    print(f"\n{a.tokens:,} tokens each, width {a.width}, {a.layers} layers; held-out additions (200)")
    print(f"{'':14s} {'chat sum exact':>15s} {'chat digit acc':>15s} {'book sum exact':>15s} "
          f"{'book digit acc':>15s} {'greedy exact':>13s} {'general val loss':>17s}")
    for name, r in rows.items():
        print(f"{name:14s} {r['chat_sum']['exact']:15.3f} {r['chat_sum']['token_accuracy']:15.3f} "
              f"{r['textbook_sum']['exact']:15.3f} {r['textbook_sum']['token_accuracy']:15.3f} "
              f"{r['chat_greedy_exact']:13.3f} {r['general_val_loss']:17.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
