"""Shared fixtures: tiny checkpoints built by the tests themselves.

``hf_checkpoint(name, **overrides)`` builds a tiny random float32 Hugging Face Phi-3 checkpoint with
transformers from one of the real configs in ``../shared/reference/configs`` (shrunk in depth and
width, head_dim kept at 96 so the real LongRoPE factor lists apply) and the real Phi-3 tokenizer.
Tests that need the reference folder or torch skip with a reason where they are absent.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# Parity is checked in full float32: GPUs with reduced-precision float32 matmuls (Apple M5, NVIDIA via
# MLX's CUDA backend) would otherwise be off by ~1e-3. Set before MLX runs anything.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("PHI3MLX_REFERENCE", ROOT.parent / "shared" / "reference"))
CONFIGS = REFERENCE / "configs"
PHI3_TOKENIZER = REFERENCE / "tokenizers" / "phi-3-mini"
PHI3_SMALL_BPE = REFERENCE / "tokenizers" / "phi-3-small" / "cl100k_base.tiktoken"


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

# Width/depth used for every tiny checkpoint: 4 heads x 96 = 384, 2 layers.
TINY = dict(hidden_size=384, num_attention_heads=4, intermediate_size=512, num_hidden_layers=2)


def reference_config(name: str) -> dict:
    f = CONFIGS / f"{name}.json"
    if not f.exists():
        pytest.skip(f"reference configs not available ({f} missing)")
    return json.loads(f.read_text())


def tiny_hf_config(name: str, **overrides) -> dict:
    cfg = reference_config(name)
    cfg.pop("auto_map", None)
    kv = 4 if cfg["num_key_value_heads"] == cfg["num_attention_heads"] else 1  # keep GQA where the model has it
    cfg.update(TINY, num_key_value_heads=kv)
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="session")
def torch_mod():
    return pytest.importorskip("torch", reason="torch is needed for the transformers reference")


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, torch_mod):
    """Factory: hf_checkpoint(name, seed=0, **config_overrides) -> (folder, transformers model)."""
    transformers = pytest.importorskip("transformers")
    made = {}

    def build(name: str, seed: int = 0, tokenizer: bool = True, **overrides):
        key = (name, seed, tokenizer, json.dumps(overrides, sort_keys=True))
        if key in made:
            return made[key]
        cfg = tiny_hf_config(name, **overrides)
        torch_mod.manual_seed(seed)
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**cfg)).eval()
        out = tmp_path_factory.mktemp(name.replace(".", "_"))
        model.save_pretrained(out)
        if tokenizer:
            write_tokenizer(out)
        made[key] = (out, model)
        return made[key]

    return build


def write_tokenizer(folder: Path) -> None:
    """The real Phi-3 tokenizer where the reference folder has it, else the bundled copy."""
    if (PHI3_TOKENIZER / "tokenizer.json").exists():
        for f in PHI3_TOKENIZER.iterdir():
            shutil.copy(f, folder / f.name)
    else:
        from phi3mlx.tiny import write_phi3_tokenizer

        write_phi3_tokenizer(folder)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """The built-in tiny random model (phi3mlx layout, float32), built once per session."""
    from phi3mlx.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "tiny-phi3")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PHI3MLX_CACHE", str(tmp_path_factory.getbasetemp() / "phi3mlx-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
