"""Reference data and helpers shared by the tests (fixtures live in conftest.py).

The tests carry their reference data in ``tests/data``: the config.json of the real checkpoints they
shrink (``configs/``) and Phi-3-small's ``cl100k_base.tiktoken`` (gzip-compressed; the ``cl100k_bpe``
fixture decompresses it). The Phi-3 tokenizer is the one bundled with the package
(``phi3mlx/assets``). ``PHI3MLX_REFERENCE`` may name another folder with the same files
(``configs/NAME.json``, ``tokenizers/phi-3-mini/``, ``tokenizers/phi-3-small/cl100k_base.tiktoken``);
then those are used instead.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

TOL = 1e-4  # max |delta logit| against transformers on float32 tiny models

DATA = Path(__file__).resolve().parent / "data"
_OVERRIDE = os.environ.get("PHI3MLX_REFERENCE")
REFERENCE: Optional[Path] = Path(_OVERRIDE) if _OVERRIDE else None
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
PHI3_TOKENIZER_JSON_SHA256 = "9e2ae3d66819f163cdcfedba5078f3a3af8118c2712491ed60912f77886bda6f"


def reference_file(rel: str, default: Path) -> Path:
    """``default`` (under tests/data), or ``$PHI3MLX_REFERENCE/rel`` when that variable is set."""
    if REFERENCE is None:
        f = default
    else:
        f = REFERENCE / rel
    if not f.exists():
        where = f"PHI3MLX_REFERENCE={REFERENCE}" if REFERENCE is not None else "the tests' data folder"
        raise FileNotFoundError(f"{f} is missing ({where})")
    return f


def reference_config(name: str) -> dict:
    """The config.json of a real checkpoint (``tests/data/configs/NAME.json``)."""
    return json.loads(reference_file(f"configs/{name}.json", DATA / "configs" / f"{name}.json").read_text())


# Width/depth used for every tiny Phi-3 checkpoint: 4 heads x 96 = 384, 2 layers.
TINY = dict(hidden_size=384, num_attention_heads=4, intermediate_size=512, num_hidden_layers=2)


def tiny_hf_config(name: str, **overrides) -> dict:
    """A real config shrunk in depth and width (head_dim kept at 96, so its LongRoPE factor lists apply)."""
    cfg = reference_config(name)
    cfg.pop("auto_map", None)
    kv = 4 if cfg["num_key_value_heads"] == cfg["num_attention_heads"] else 1  # keep GQA where the model has it
    cfg.update(TINY, num_key_value_heads=kv)
    cfg.update(overrides)
    return cfg


def write_tokenizer(folder: Path) -> None:
    """The real Phi-3 tokenizer (tokenizer.json + tokenizer_config.json) into ``folder``: the package's
    bundled copy (the same files as microsoft/Phi-3-mini-4k-instruct's), or PHI3MLX_REFERENCE's."""
    if REFERENCE is None:
        from phi3mlx.tiny import write_phi3_tokenizer

        write_phi3_tokenizer(Path(folder))
        return
    src = reference_file("tokenizers/phi-3-mini", DATA)
    for f in src.iterdir():
        shutil.copy(f, Path(folder) / f.name)


def phi3_small_tokenizer_config() -> dict:
    """tokenizer_config.json as in microsoft/Phi-3-small-8k-instruct (auto_map kept: it must be ignored)."""
    from phi3mlx.tokenizer import PHI3_SMALL_CHAT_TEMPLATE

    return {
        "auto_map": {"AutoTokenizer": ["tokenization_phi3_small.Phi3SmallTokenizer", None]},
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "chat_template": PHI3_SMALL_CHAT_TEMPLATE,
        "model_max_length": 8192,
        "tokenizer_class": "Phi3SmallTokenizer",
    }


# ------------------------------------------------------------------ tiny Phi-3-small checkpoints

PHI3_SMALL = "Phi-3-small-8k-instruct"  # the real config the tiny Phi-3-small checkpoints shrink


def phi3small_cfg(**kw) -> dict:
    """The real Phi-3-small config shrunk: 256 wide, 4 heads of 64, 2 KV heads, 2 layers (the first blocksparse)."""
    cfg = reference_config(PHI3_SMALL)
    cfg.update(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
               ff_intermediate_size=512, torch_dtype="float32")
    cfg.update(kw)
    return cfg


def make_phi3small_ckpt(folder: Path, cfg: dict, seed: int = 0, qkv_scale: float = 0.3) -> dict:
    """Write random float32 Phi-3-small weights (Hugging Face names) and config.json into ``folder``;
    return the weights as numpy arrays."""
    import mlx.core as mx

    g = np.random.default_rng(seed)
    H, K, hid = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    D = hid // H
    ff, V = cfg["ff_intermediate_size"], cfg["vocab_size"]
    r = lambda *s, sc=0.05: (g.standard_normal(s) * sc).astype(np.float32)  # noqa: E731
    w = {"model.embed_tokens.weight": r(V, hid, sc=0.02),
         "model.final_layernorm.weight": 1 + r(hid, sc=0.1), "model.final_layernorm.bias": r(hid)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.update({
            p + "input_layernorm.weight": 1 + r(hid, sc=0.1), p + "input_layernorm.bias": r(hid),
            p + "post_attention_layernorm.weight": 1 + r(hid, sc=0.1), p + "post_attention_layernorm.bias": r(hid),
            p + "self_attn.query_key_value.weight": r((H + 2 * K) * D, hid, sc=qkv_scale),
            p + "self_attn.query_key_value.bias": r((H + 2 * K) * D),
            p + "self_attn.dense.weight": r(hid, H * D), p + "self_attn.dense.bias": r(hid),
            p + "mlp.up_proj.weight": r(2 * ff, hid, sc=0.3), p + "mlp.up_proj.bias": r(2 * ff),
            p + "mlp.down_proj.weight": r(hid, ff), p + "mlp.down_proj.bias": r(hid),
        })
    mx.save_safetensors(str(Path(folder) / "model.safetensors"), {k: mx.array(v) for k, v in w.items()})
    (Path(folder) / "config.json").write_text(json.dumps(cfg))
    return w


# ------------------------------------------------------------------ tiny Phi-3.5-MoE configs

PHIMOE_JITTER = 0.01


def phimoe_tiny_cfg(seed: int = 0, **overrides) -> dict:
    """384 hidden, 4 heads of 96 (2 KV heads), 2 layers, 4 experts top-2, intermediate 256, vocab 32064,
    LongRoPE with random factor lists (48) and distinct short/long mscales, in the Hub's form."""
    rs = np.random.RandomState(seed)
    sf = [float(x) for x in 1 + rs.rand(48)]
    lf = [float(x) for x in 1 + 3 * rs.rand(48)]
    orig = overrides.pop("original_max_position_embeddings", 4096)
    rope = dict(type="longrope", short_factor=sf, long_factor=lf, short_mscale=1.1, long_mscale=1.3,
                original_max_position_embeddings=orig)
    cfg = dict(model_type="phimoe", hidden_size=384, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=256,
               vocab_size=32064, max_position_embeddings=131072, original_max_position_embeddings=orig,
               rope_theta=10000.0, rope_scaling=rope, sliding_window=131072, lm_head_bias=True,
               attention_bias=True, router_jitter_noise=PHIMOE_JITTER, input_jitter_noise=0.01, rms_norm_eps=1e-5)
    cfg.update(overrides)
    return cfg


# ------------------------------------------------------------------ fine-tuning models and task

# Tiny shapes of the fine-tuning tests (the ``folders`` fixture builds them; phi3 is phi3mlx:tiny, narrower).
FT_PHI3 = {"hidden_size": 192, "num_attention_heads": 2, "num_key_value_heads": 1}
FT_SMALL = {"model_type": "phi3small", "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "ff_intermediate_size": 256, "num_hidden_layers": 2, "vocab_size": 32064, "blocksparse_block_size": 4,
            "blocksparse_num_local_blocks": 2, "blocksparse_vert_stride": 2, "dense_attention_every_n_layers": 2,
            "mup_embedding_multiplier": 10.0, "mup_width_multiplier": 8.0, "max_position_embeddings": 1024}
FT_MOE = {"model_type": "phimoe", "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
          "intermediate_size": 96, "num_hidden_layers": 2, "vocab_size": 32064, "num_local_experts": 4,
          "num_experts_per_tok": 2, "attention_bias": True, "lm_head_bias": True, "max_position_embeddings": 1024,
          "rope_scaling": None, "sliding_window": None}

# A learnable task: sequences over 40 tokens where each token has one fixed successor.
TOKENS = np.random.default_rng(99).choice(np.arange(1000, 30000), 40, replace=False).astype(np.int32)
NEXT = {int(a): int(b) for a, b in zip(TOKENS, np.roll(TOKENS, -7))}


# ------------------------------------------------------------------ parity assertions


def random_ids(n: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 32000, size=(1, n))


def ref_logits(torch, hf_model, ids) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(ids)).logits.numpy()


def ref_generate(torch, hf_model, ids, n: int = 32) -> list:
    """transformers' greedy ``generate``, exactly ``n`` new tokens, no early stop."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def assert_logits_and_greedy_match(model, hf_model, torch, label: str = "") -> None:
    """Logits within TOL at lengths 1, 9 and 300, and 32 greedy tokens equal to ``generate``."""
    import mlx.core as mx

    from phi3mlx.generate import generate_step

    for n, seed in ((1, 1), (9, 2), (300, 3)):
        ids = random_ids(n, seed)
        ours = np.array(model(mx.array(ids)))
        assert ours.shape == (1, n, 32064)
        err = np.abs(ours - ref_logits(torch, hf_model, ids)).max()
        assert err <= TOL, f"{label} L={n}: max |dlogit| {err}"
    ids = random_ids(12, 4)
    ours = [t for t, _ in generate_step(ids[0].tolist(), model, max_tokens=32)]
    assert ours == ref_generate(torch, hf_model, ids)


def assert_streams_to_decode(tok, text: str) -> None:
    """The streaming detokenizer's pieces join to decode(all ids), never with a half character."""
    ids = tok.encode(text)
    detok = tok.detokenizer()
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.finalize())
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def assert_error(code, err, *needles):
    """Exit 1, stderr exactly one line ``phi3mlx: error: ...`` naming every needle."""
    assert code == 1, f"exit code {code}, stderr: {err!r}"
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err!r}"
    assert lines[0].startswith("phi3mlx: error: "), lines[0]
    for n in needles:
        assert str(n) in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]
