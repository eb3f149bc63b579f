#!/usr/bin/env bash
# Rebuild the built-in model (phi3mlx:embedded) from scratch: pretrain, eight chat-tuning stages (the last two
# anneal, each one's best kept checkpoint chosen on questions that are not the held-out ones), evaluate.
# Run from the repository root. Resumable: rerun a step with --resume after an interruption.
set -euo pipefail
OUT="${1:-phi3mlx/assets/embedded}"
phi3mlx pretrain --config examples/embedded.yaml --force                        # 1. pretrain (two phases)
phi3mlx corpus dialogues --out runs/embedded-chat-data --examples 20000 --valid 500 --seed 11 --force  # 2. chats
phi3mlx lora --config examples/embedded-chat.yaml --force                       # 3. chat-tune, stage 1
phi3mlx fuse --model runs/embedded-base --adapter-path runs/embedded-chat --save-path runs/embedded-stage1 --force
phi3mlx corpus dialogues --out runs/embedded-chat2-data --examples 60000 --valid 300 --seed 11 --shares addition=0.75,world=0.2,unknown=0.05 --force  # 4.
phi3mlx lora --config examples/embedded-chat2.yaml --force                      # 5. stage 2
phi3mlx fuse --model runs/embedded-stage1 --adapter-path runs/embedded-chat2 --save-path runs/embedded-stage2 --force
phi3mlx corpus dialogues --out runs/embedded-chat3-data --examples 100000 --valid 300 --seed 12 --shares addition=0.85,world=0.12,unknown=0.03 --force  # 6.
phi3mlx lora --config examples/embedded-chat3.yaml --force                      # 7. stage 3
phi3mlx fuse --model runs/embedded-stage2 --adapter-path runs/embedded-chat3 --save-path runs/embedded-stage3 --force
phi3mlx corpus dialogues --out runs/embedded-chat4-data --examples 150000 --valid 300 --seed 13 --shares addition=0.9,world=0.08,unknown=0.02 --force  # 8.
phi3mlx lora --config examples/embedded-chat4.yaml --force                      # 9. stage 4
phi3mlx fuse --model runs/embedded-stage3 --adapter-path runs/embedded-chat4 --save-path runs/embedded-stage4 --force
phi3mlx corpus dialogues --out runs/embedded-chat5-data --examples 250000 --valid 300 --seed 14 --shares addition=0.9,world=0.08,unknown=0.02 --force  # 10.
phi3mlx lora --config examples/embedded-chat5.yaml --force                      # 11. stage 5
phi3mlx fuse --model runs/embedded-stage4 --adapter-path runs/embedded-chat5 --save-path runs/embedded-stage5 --force
phi3mlx corpus dialogues --out runs/embedded-chat6-data --examples 130000 --valid 300 --seed 15 --shares addition=0.85,world=0.12,unknown=0.03 --force  # 12.
phi3mlx lora --config examples/embedded-chat6.yaml --force                      # 13. stage 6 (mixed batches)
phi3mlx fuse --model runs/embedded-stage5 --adapter-path runs/embedded-chat6 --save-path runs/embedded-stage6 --force
phi3mlx corpus dialogues --out runs/embedded-chat7-data --examples 100000 --valid 300 --seed 16 --shares addition=0.85,world=0.12,unknown=0.03 --force  # 14.
phi3mlx lora --config examples/embedded-chat7.yaml --force                      # 15. stage 7 (annealing, every checkpoint kept)
BEST=$(python examples/select_embedded.py --adapters runs/embedded-chat7)       # 16. its best step (selection questions)
phi3mlx fuse --model runs/embedded-stage6 --adapter-path "$BEST" --save-path runs/embedded-stage7 --force
phi3mlx corpus dialogues --out runs/embedded-chat8-data --examples 100000 --valid 300 --seed 17 --shares addition=0.85,world=0.12,unknown=0.03 --force  # 17.
phi3mlx lora --config examples/embedded-chat8.yaml --force                      # 18. stage 8 (annealing again)
BEST=$(python examples/select_embedded.py --adapters runs/embedded-chat8)       # 19. its best step
phi3mlx fuse --model runs/embedded-stage7 --adapter-path "$BEST" --save-path "$OUT" --force  # 20. fuse
python - "$OUT" <<'PY'                                                         # 21. record the recipe
import json, re, sys, yaml
from pathlib import Path
out = Path(sys.argv[1])
script = Path("examples/build_embedded.sh").read_text()
stages = []
for n, (run, data) in enumerate([(f"embedded-chat{k}", f"embedded-chat{k}-data") for k in ("", 2, 3, 4, 5, 6, 7, 8)],
                                start=1):
    m = re.search(rf"--out runs/{data} --examples (\d+) --valid (\d+) --seed (\d+)(?: --shares (\S+))?", script)
    state = json.loads(Path(f"runs/{run}/checkpoint/trainer_state.json").read_text())
    adapters = json.loads(Path(f"runs/{run}/adapter_config.json").read_text())
    adapters.pop("base_model", None)
    chat = yaml.safe_load(Path(f"examples/{run}.yaml").read_text())
    stages.append({"data": {"examples": int(m[1]), "valid": int(m[2]), "seed": int(m[3]), "shares": m[4]},
                   "args": state["args"], "adapters": adapters, "mixed_lengths": chat.get("mixed_lengths", False)})
    if chat.get("keep_checkpoints"):  # the step select_embedded.py chose, and the scores it chose by
        sel = json.loads(Path(f"runs/{run}/selection.json").read_text())
        stages[-1]["selected"] = {"step": sel["best"]["step"],
                                  "scores": {r["step"]: {k: r[k] for k in ("addition", "world", "unknown")}
                                             for r in sel["rows"]}}
recipe = {"pretrain": yaml.safe_load(Path("runs/embedded-base/pretrain.yaml").read_text()), "chat_stages": stages}
(out / "recipe.json").write_text(json.dumps(recipe, indent=1))
PY
python examples/eval_embedded.py --model "$OUT"                                 # 22. evaluate
