"""The built-in models: ``phi3mlx:embedded`` (the default) and ``phi3mlx:tiny``.

``phi3mlx:embedded`` is a small Phi-3 model pretrained and chat-tuned by the project's own recipe
(``examples/build_embedded.sh``), shipped inside the package (``assets/embedded``): it adds two-digit
numbers, knows the invented valley of Orvane and says when it does not know.


A tiny Phi-3-shaped checkpoint (2 layers, width 384, head_dim 96, the real Phi-3 tokenizer) with
*random* weights, built on first use into the user cache. It exercises every part of the toolkit
offline — loading, generation, chat, conversion, quantization, benchmarks — but its text is noise.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .errors import Phi3MLXError
from .models import build_model, parse_config
from .models.maps import mlx_to_hf
from .tokenizer import copy_tokenizer_files
from .weights import atomic_dir, save_weights

TINY_ID = "phi3mlx:tiny"
EMBEDDED_ID = "phi3mlx:embedded"  # the default model: trained by examples/build_embedded.sh, shipped in the package
ASSETS = Path(__file__).parent / "assets"
EMBEDDED_PATH = ASSETS / "embedded"

TINY_CONFIG = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "vocab_size": 32064,
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "sliding_window": 2047,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def cache_dir() -> Path:
    base = os.environ.get("PHI3MLX_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "phi3mlx")
    return Path(base).expanduser()


def write_phi3_tokenizer(folder: Path) -> None:
    """Write the bundled Phi-3 tokenizer (tokenizer.json + tokenizer_config.json) into a folder."""
    with gzip.open(ASSETS / "phi3-tokenizer.json.gz", "rb") as f:
        (folder / "tokenizer.json").write_bytes(f.read())
    (folder / "tokenizer_config.json").write_bytes((ASSETS / "phi3-tokenizer_config.json").read_bytes())


def make_random(out: Path, config: dict, seed: int = 0, tokenizer_from: Path | None = None,
                force: bool = False, dtype: str = "float32") -> Path:
    """A random-weight folder in Hugging Face layout for any supported config.json dict.

    Linear weights ~ N(0, 0.02), norms at 1, biases 0. The tokenizer files are copied from
    ``tokenizer_from``, else the bundled Phi-3 tokenizer is written. Used for the built-in model and to
    benchmark a variant's shape without its weights.
    """
    cfg = parse_config(config)
    mx.random.seed(seed)
    model = build_model(cfg)
    params = {}
    for k, v in tree_flatten(model.parameters()):
        if "norm" in k and k.endswith("weight"):
            params[k] = mx.ones(v.shape)
        elif k.endswith("bias"):
            params[k] = mx.zeros(v.shape)
        else:
            params[k] = 0.02 * mx.random.normal(v.shape)
        params[k] = params[k].astype(getattr(mx, dtype))
        mx.eval(params[k])
    params = mlx_to_hf(cfg.model_type, params)
    with atomic_dir(out, force=force) as tmp:
        save_weights(tmp, params, fmt="pt")
        (tmp / "config.json").write_text(json.dumps(dict(config, torch_dtype=dtype), indent=2))
        eos = config.get("eos_token_id", 32000)
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": config.get("bos_token_id", 1),
                                                                "eos_token_id": eos}))
        if tokenizer_from is not None:
            copy_tokenizer_files(Path(tokenizer_from), tmp)
        else:
            write_phi3_tokenizer(tmp)
    return out


def make_tiny(out: Path, seed: int = 0, config: dict | None = None, force: bool = False) -> Path:
    """Build a random tiny Phi-3 folder (Hugging Face layout, float32) at ``out``."""
    raw = dict(TINY_CONFIG, **(config or {}))
    cfg = parse_config(raw)
    mx.random.seed(seed)
    model = build_model(cfg)
    # Small random init, like transformers' initializer_range 0.02, norms at 1.
    params = {}
    for k, v in tree_flatten(model.parameters()):
        params[k] = mx.ones(v.shape) if "norm" in k else 0.02 * mx.random.normal(v.shape)
    with atomic_dir(out, force=force) as tmp:
        save_weights(tmp, params, fmt="pt")
        (tmp / "config.json").write_text(json.dumps(raw, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [32000, 32007]}))
        write_phi3_tokenizer(tmp)
    return out


def embedded_path() -> Path:
    """The built-in trained model's folder inside the package."""
    if not (EMBEDDED_PATH / "config.json").exists():
        raise Phi3MLXError(f"the built-in model {EMBEDDED_ID} is missing from the installed package ({EMBEDDED_PATH}); "
                           "reinstall phi3mlx, or rebuild it with examples/build_embedded.sh")
    return EMBEDDED_PATH


def tiny_path() -> Path:
    """The built-in tiny model's folder, built on first use."""
    p = cache_dir() / "tiny-phi3"
    if not (p / "config.json").exists():
        make_tiny(p, force=True)
    return p
