"""Learning-rate transfer across widths: muP against the standard parametrisation (SP).

For each width (64, 128, 256 by default) and each learning rate of a grid (powers of two), train a small
Phi-3 from scratch with ``phi3mlx pretrain``'s own code (the same data, steps and seed everywhere) and
record the validation loss. Under muP (base width = the smallest width) the best learning rate stays put
as the model widens and a wider model is never worse; under SP the best rate drifts down with width.

    python examples/mup_transfer.py                      # widths 64 128 256, ~10 min on a 2-core CPU
    python examples/mup_transfer.py --widths 64 128 256 512 --steps 200 --png transfer.png
    python examples/mup_transfer.py --steps 300 --seeds 0 1 --lrs -10 -9 -8 -7 -6   # less noise

Data: the project's own textbook lessons and standard-library documentation (nothing downloaded).
Prints the table of validation losses (best per row marked) and saves a PNG of loss against learning rate.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from phi3mlx.finetune import pretrain as P


def run_one(width: int, log2_lr: float, mup: bool, a, work: Path, seed: int) -> float:
    heads = max(1, width // a.head_dim)
    cfg = P.PretrainConfig(
        out=str(work / f"w{width}-lr{log2_lr}-{'mup' if mup else 'sp'}"),
        model={"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": a.layers,
               "num_attention_heads": heads, "max_position_embeddings": 256,
               "original_max_position_embeddings": 256},
        tokenizer={"vocab_size": a.vocab},
        sources={"general": {"builtin": "general"}, "textbook": {"builtin": "textbook", "docs": 5000, "seed": 7}},
        phases=[{"name": "mix", "tokens": a.steps * a.batch_size * a.seq_len,
                 "mix": {"general": 0.5, "textbook": 0.5}}],
        seq_len=a.seq_len, batch_size=a.batch_size, lr=2.0 ** log2_lr, schedule="cosine", warmup=a.steps // 10,
        min_lr_ratio=0.1, weight_decay=0.0, grad_clip=None, mup=mup, base_width=min(a.widths) if mup else None,
        val_every=a.steps, val_batches=a.val_batches, save_every=a.steps, report_every=a.steps,
        seed=seed, cache_dir=a.cache_dir)
    prep = P.prepare(cfg, force=True)
    hist = P.run(prep)
    loss = hist[-1].get("val_loss", float("nan"))
    return loss if math.isfinite(loss) else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--lrs", type=float, nargs="+", default=[-12, -11, -10, -9, -8, -7, -6, -5],
                    help="log2 of the learning rates")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="seeds (initialisation and data order); each cell is the mean over them")
    ap.add_argument("--cache-dir", default=None, help="token caches (default ~/.cache/phi3mlx/pretrain)")
    ap.add_argument("--params", nargs="+", choices=["mup", "sp"], default=["mup", "sp"],
                    help="the parametrisations to sweep")
    ap.add_argument("--png", default="mup_transfer.png")
    ap.add_argument("--json", default=None, help="also write the table as JSON here")
    a = ap.parse_args()

    results: dict = {}
    per_seed: dict = {}
    with tempfile.TemporaryDirectory() as d:
        for mup in [p == "mup" for p in a.params]:
            for w in a.widths:
                for lr in a.lrs:
                    runs = [run_one(w, lr, mup, a, Path(d), seed) for seed in a.seeds]
                    loss = sum(runs) / len(runs)
                    results[("mup" if mup else "sp", w, lr)] = loss
                    per_seed[("mup" if mup else "sp", w, lr)] = runs
                    print(f"{'muP' if mup else 'SP '} width {w:4d} lr 2^{lr:g}: val loss {loss:.4f}", flush=True)

    print()
    header = "param  width " + " ".join(f"{'2^' + format(lr, 'g'):>8}" for lr in a.lrs) + "   best"
    print(header)
    best: dict = {}
    for p in a.params:
        for w in a.widths:
            row = [results[(p, w, lr)] for lr in a.lrs]
            i = min(range(len(row)), key=row.__getitem__)
            best[(p, w)] = (a.lrs[i], row[i])
            cells = " ".join(f"{v:8.4f}{'*' if j == i else ' '}"[:9] if math.isfinite(v) else f"{'diverged':>8} "
                             for j, v in enumerate(row))
            print(f"{'muP' if p == 'mup' else 'SP':5s} {w:5d} {cells}  2^{a.lrs[i]:g}")
    for p in a.params:
        lrs = [best[(p, w)][0] for w in a.widths]
        losses = [best[(p, w)][1] for w in a.widths]
        shift = max(lrs) - min(lrs)
        print(f"{'muP' if p == 'mup' else 'SP'}: best log2 lr by width {lrs} (spread {shift:g} grid steps); "
              f"best loss by width {[round(x, 4) for x in losses]} "
              f"({'wider never worse' if all(b <= a_ + 1e-3 for a_, b in zip(losses, losses[1:])) else 'wider is worse somewhere'})")
    if a.json:
        Path(a.json).write_text(json.dumps([{"param": p, "width": w, "log2_lr": lr, "val_loss": v,
                                             "seeds": dict(zip(a.seeds, per_seed[(p, w, lr)]))}
                                            for (p, w, lr), v in results.items()], indent=1))

    import matplotlib  # imported here: only this plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [p for p in ("sp", "mup") if p in a.params]
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, p in zip(axes, shown):
        for w in a.widths:
            xs = [lr for lr in a.lrs if math.isfinite(results[(p, w, lr)])]
            ax.plot(xs, [results[(p, w, lr)] for lr in xs], marker="o", label=f"width {w}")
        ax.set_title("standard parametrisation" if p == "sp" else f"muP (base width {min(a.widths)})")
        ax.set_xlabel("log2 learning rate")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(a.png, dpi=100)
    print(f"saved {a.png}")


if __name__ == "__main__":
    main()
