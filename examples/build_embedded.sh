#!/usr/bin/env bash
# Rebuild the built-in model (phi3mlx:embedded) from scratch: pretrain, chat-tune, fuse, evaluate.
# Run from the repository root. Resumable: rerun a step with --resume after an interruption.
set -euo pipefail
OUT="${1:-phi3mlx/assets/embedded}"
phi3mlx pretrain --config examples/embedded.yaml --force                        # 1. pretrain (two phases)
phi3mlx corpus dialogues --out runs/embedded-chat-data --examples 20000 --valid 500 --seed 11 --force  # 2. chats
phi3mlx lora --config examples/embedded-chat.yaml --force                       # 3. chat-tune
phi3mlx fuse --model runs/embedded-base --adapter-path runs/embedded-chat --save-path "$OUT" --force  # 4. fuse
python - "$OUT" <<'PY'                                                         # 5. record the recipe
import json, sys, yaml
from pathlib import Path
out = Path(sys.argv[1])
state = json.loads(Path("runs/embedded-chat/checkpoint/trainer_state.json").read_text())
recipe = {"pretrain": yaml.safe_load(Path("runs/embedded-base/pretrain.yaml").read_text()),
          "chat_data": {"examples": 20000, "valid": 500, "seed": 11},
          "chat_tune": state["args"],
          "adapters": json.loads(Path("runs/embedded-chat/adapter_config.json").read_text())}
(out / "recipe.json").write_text(json.dumps(recipe, indent=1))
PY
python examples/eval_embedded.py --model "$OUT"                                 # 6. evaluate
