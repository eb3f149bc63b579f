"""Shared fixtures: tiny checkpoints built by the tests themselves (helpers and data: helpers.py).

``hf_checkpoint(name, **overrides)`` builds a tiny random float32 Hugging Face Phi-3 checkpoint with
transformers from one of the real configs in ``tests/data/configs`` (shrunk in depth and width,
head_dim kept at 96 so the real LongRoPE factor lists apply) and the real Phi-3 tokenizer;
``phimoe_checkpoint`` does the same for Phi-3.5-MoE. Both need torch (the transformers reference) and
skip cleanly without it; nothing here skips for missing data: the data ships with the tests.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil

# Parity is checked in full float32: GPUs with reduced-precision float32 matmuls (Apple M5, NVIDIA via
# MLX's CUDA backend) would otherwise be off by ~1e-3. Set before MLX runs anything.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import pytest  # noqa: E402

from .helpers import (  # noqa: E402
    DATA, FT_MOE, FT_PHI3, FT_SMALL, REFERENCE, phimoe_tiny_cfg, reference_file, tiny_hf_config, write_tokenizer,
)


@pytest.fixture(scope="session")
def torch_mod():
    return pytest.importorskip("torch", reason="torch is needed for the transformers reference")


@pytest.fixture(scope="session")
def cl100k_bpe(tmp_path_factory):
    """Phi-3-small's cl100k_base.tiktoken (decompressed once per session from tests/data)."""
    if REFERENCE is not None:
        return reference_file("tokenizers/phi-3-small/cl100k_base.tiktoken", DATA)
    out = tmp_path_factory.mktemp("cl100k") / "cl100k_base.tiktoken"
    with gzip.open(DATA / "cl100k_base.tiktoken.gz", "rb") as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


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


@pytest.fixture(scope="session")
def phimoe_checkpoint(tmp_path_factory, torch_mod):
    """Factory: (hf folder, mlx folder, transformers model) for a tiny Phi-3.5-MoE config, built once each."""
    transformers = pytest.importorskip("transformers")
    from phi3mlx.convert.hf_to_mlx import convert

    made = {}

    def build(seed=0, near_tied=True, **overrides):
        key = (seed, near_tied, json.dumps(overrides, sort_keys=True))
        if key in made:
            return made[key]
        cfg = phimoe_tiny_cfg(seed, **overrides)
        torch_mod.manual_seed(seed)
        model = transformers.PhimoeForCausalLM(transformers.PhimoeConfig(**cfg)).eval()
        with torch_mod.no_grad():  # biases and norms start at 0 / 1: make them random so they count
            for n, p in model.named_parameters():
                if n.endswith("bias") or "norm" in n:
                    p.add_(0.02 * torch_mod.randn_like(p))
                elif near_tied and n.endswith("router.weight"):  # near-equal expert rows: near-tied router scores, so
                    p.copy_(p[:1] + 0.02 * p)  # SparseMixer's jitter band holds 2+ experts for many tokens
        src = tmp_path_factory.mktemp("phimoe_hf")
        model.save_pretrained(src)
        saved = json.loads((src / "config.json").read_text())
        saved.pop("rope_parameters", None)
        saved.update(cfg)
        (src / "config.json").write_text(json.dumps(saved))
        write_tokenizer(src)
        ref = transformers.PhimoeForCausalLM.from_pretrained(src).eval()  # as transformers reads the Hub form
        out = tmp_path_factory.mktemp("phimoe_mlx") / "model"
        convert(str(src), str(out), show_progress=False)
        made[key] = (src, out, ref)
        return made[key]

    return build


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """The built-in tiny random model (phi3mlx layout, float32), built once per session."""
    from phi3mlx.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "tiny-phi3")


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """The fine-tuning tests' tiny random models: {"phi3", "phi3small", "phimoe"} -> folder (read only)."""
    from phi3mlx.tiny import make_random, make_tiny

    d = tmp_path_factory.mktemp("finetune-models")
    return {"phi3": make_tiny(d / "phi3", config=FT_PHI3),
            "phi3small": make_random(d / "phi3small", FT_SMALL),
            "phimoe": make_random(d / "phimoe", FT_MOE)}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PHI3MLX_CACHE", str(tmp_path_factory.getbasetemp() / "phi3mlx-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
