"""Benchmark Phi-3-small- and Phi-3.5-MoE-shaped models against mlx-lm, without their weights.

Builds random float32 folders with the real models' layer shapes (head size, GQA ratio, blocksparse
settings, 16 experts top-2, vocabulary) but fewer layers and a narrower width, so that they run on a
laptop CPU, then runs ``phi3mlx bench --compare-mlx-lm`` on each. The random weights make the text
noise; the speeds are what matter. Phi-3-small's prefill is measured at 2048 and 4096 tokens: beyond
the 1024-token local window of its blocksparse layers.

    python examples/bench_variants.py                 # all, folders under ~/.cache/phi3mlx/bench
    python examples/bench_variants.py --which small --width 2048 --layers 4

(On mlx-lm's Phi-3-small prefill: its blocksparse layers let a token see later tokens of its own
64-token block, so its prompt logits differ from the model's; decoding one token at a time is right.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from phi3mlx.tiny import cache_dir, make_random


def kv_heads(heads: int) -> int:
    """The real models' 4 query heads per KV head, or the nearest grouping that divides ``heads``."""
    return max(d for d in range(1, max(1, heads // 4) + 1) if heads % d == 0)


def small_config(width: int, layers: int) -> dict:
    """Phi-3-small-8k: head size 128, 4 query heads per KV head, GEGLU 3.5x, blocksparse 64/16/8."""
    heads = width // 128
    return {
        "architectures": ["Phi3SmallForCausalLM"], "model_type": "phi3small",
        "hidden_size": width, "num_attention_heads": heads, "num_key_value_heads": kv_heads(heads),
        "ff_intermediate_size": width * 7 // 2, "num_hidden_layers": layers, "vocab_size": 100352,
        "blocksparse_block_size": 64, "blocksparse_num_local_blocks": 16, "blocksparse_vert_stride": 8,
        "blocksparse_homo_head_pattern": False, "dense_attention_every_n_layers": 2,
        "gegelu_limit": 20.0, "hidden_act": "gegelu", "layer_norm_epsilon": 1e-5,
        "max_position_embeddings": 16384, "mup_attn_multiplier": 1.0, "mup_embedding_multiplier": 10.0,
        "mup_use_scaling": True, "mup_width_multiplier": 8.0, "rope_embedding_base": 1000000,
        "rope_position_scale": 1.0, "bos_token_id": 100257, "eos_token_id": 100257,
    }


def moe_config(width: int, layers: int) -> dict:
    """Phi-3.5-MoE: head size 128, 4 query heads per KV head, 16 experts (width x 1.5625), top-2."""
    heads = width // 128
    return {
        "architectures": ["PhimoeForCausalLM"], "model_type": "phimoe",
        "hidden_size": width, "num_attention_heads": heads, "num_key_value_heads": kv_heads(heads),
        "intermediate_size": width * 25 // 16, "num_hidden_layers": layers, "vocab_size": 32064,
        "num_local_experts": 16, "num_experts_per_tok": 2, "router_jitter_noise": 0.01,
        "input_jitter_noise": 0.01, "attention_bias": True, "lm_head_bias": True, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "rope_theta": 10000.0, "rope_scaling": None,
        "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 32000,
    }


def _build(folder: Path, config: dict, dtype: str) -> None:
    """Build the folder unless it exists with this very config (an older, different one is rebuilt)."""
    old = folder / "config.json"
    if old.exists() and json.loads(old.read_text()) == dict(config, torch_dtype=dtype):
        return
    make_random(folder, config, force=True, dtype=dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--which", choices=["small", "moe", "all"], default="all")
    p.add_argument("--width", type=int, default=1024, help="hidden size (a multiple of 128; real: 4096)")
    p.add_argument("--layers", type=int, default=2, help="layers (real: 32); Phi-3-small alternates sparse/dense")
    p.add_argument("--out", type=Path, default=cache_dir() / "bench", help="where the folders are built")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-mlx-lm", action="store_true", help="measure phi3mlx alone")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="weights' dtype (float32 suits CPUs; bfloat16 is what GPUs and Macs run)")
    p.add_argument("--small-prompts", default="2048,4096", help="Phi-3-small prompt lengths, comma-separated")
    p.add_argument("--moe-prompts", default="512", help="Phi-3.5-MoE prompt lengths, comma-separated")
    a = p.parse_args()
    if a.width <= 0 or a.width % 128:
        p.error(f"--width must be a positive multiple of 128, got {a.width}")
    if a.layers <= 0:
        p.error(f"--layers must be positive, got {a.layers}")
    try:
        small_prompts = [int(n) for n in a.small_prompts.split(",")]
        moe_prompts = [int(n) for n in a.moe_prompts.split(",")]
    except ValueError:
        p.error("--small-prompts and --moe-prompts take comma-separated token counts, e.g. 2048,4096")
    runs = []
    if a.which in ("small", "all"):
        folder = a.out / f"phi3small-w{a.width}-l{a.layers}-{a.dtype}"
        _build(folder, small_config(a.width, a.layers), a.dtype)
        runs += [(folder, n, 16) for n in small_prompts]
    if a.which in ("moe", "all"):
        folder = a.out / f"phimoe-w{a.width}-l{a.layers}-{a.dtype}"
        _build(folder, moe_config(a.width, a.layers), a.dtype)
        runs += [(folder, n, 32) for n in moe_prompts]
    failed = 0
    for folder, prompt, gen in runs:
        cmd = [sys.executable, "-m", "phi3mlx", "bench", "--model", str(folder), "--prompt-tokens", str(prompt),
               "--gen-tokens", str(gen), "--repeats", str(a.repeats)]
        if not a.no_mlx_lm:
            cmd.append("--compare-mlx-lm")
        print("$", " ".join(cmd[1:]), flush=True)
        failed += subprocess.run(cmd, check=False).returncode != 0
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
