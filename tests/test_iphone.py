"""Folders for iPhones: what MLX Swift reads, and ``phi3mlx plan`` / ``convert --target``.

The names and config keys below are transcribed from mlx-swift-lm (github.com/ml-explore/mlx-swift-lm):
``Libraries/MLXLLM/Models/Phi3.swift`` (commit 22e3da1f: ``Phi3Configuration``'s CodingKeys and the
``@ModuleInfo`` keys of ``Phi3ModelInner``, ``TransformerBlock``, ``Attention``, ``MLP``) and
``Libraries/MLXLLM/Models/PhiMoE.swift`` (commit 3dca9a4a: ``PhiMoEConfiguration``, ``Attention`` with
biased q/k/v/o, ``PhiMoESparseMoeBlock`` with ``gate`` and ``switch_mlp``, LayerNorms, a biased
``lm_head``). MLXLMCommon loads a Linear as quantized where the weights hold its ``scales`` (and the
config its ``quantization`` block, ``group_size`` and ``bits``), and verifies that every parameter is
given and no weight is left over, so the tensor set must be exactly the module tree's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from convert.hf_to_mlx import _for_target, convert
from phi3mlx.cli import main
from phi3mlx.errors import Phi3MLXError
from phi3mlx.models import parse_config
from phi3mlx.plan import DEVICES, MIN_CONTEXT, plan, weight_bytes_for

from .helpers import DATA

# Phi3Configuration: decoded with `decode` (required) or `decodeIfPresent` (optional), with these types
PHI3_REQUIRED = {"hidden_size": int, "num_hidden_layers": int, "intermediate_size": int, "num_attention_heads": int,
                 "rms_norm_eps": float, "vocab_size": int, "num_key_value_heads": int,
                 "max_position_embeddings": int, "original_max_position_embeddings": int}
PHI3_OPTIONAL = {"rope_theta": float, "rope_traditional": bool, "rope_scaling": dict, "partial_rotary_factor": float,
                 "tie_word_embeddings": bool}
# PhiMoEConfiguration: every key has a default; when present it must decode as this type
PHIMOE_KEYS = {"model_type": str, "vocab_size": int, "hidden_size": int, "intermediate_size": int,
               "num_hidden_layers": int, "num_attention_heads": int, "num_key_value_heads": int,
               "max_position_embeddings": int, "original_max_position_embeddings": int, "rms_norm_eps": float,
               "rope_scaling": dict, "num_local_experts": int, "num_experts_per_tok": int, "rope_theta": float}
QUANT = ("weight", "scales", "biases")  # a quantized Linear / Embedding


def phi3_swift_names(cfg: dict) -> set:
    names = {f"model.embed_tokens.{k}" for k in QUANT} | {"model.norm.weight"}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for lin in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            names |= {f"{p}.{lin}.{k}" for k in QUANT}
        names |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"}
    if not cfg.get("tie_word_embeddings", False):
        names |= {f"lm_head.{k}" for k in QUANT}
    return names


def phimoe_swift_names(cfg: dict) -> set:
    names = {f"model.embed_tokens.{k}" for k in QUANT} | {"model.norm.weight", "model.norm.bias"}
    names |= {f"lm_head.{k}" for k in QUANT} | {"lm_head.bias"}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names |= {f"{p}.self_attn.{proj}.{k}" for k in QUANT} | {f"{p}.self_attn.{proj}.bias"}
        names |= {f"{p}.block_sparse_moe.gate.{k}" for k in QUANT}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names |= {f"{p}.block_sparse_moe.switch_mlp.{proj}.{k}" for k in QUANT}
        for norm in ("input_layernorm", "post_attention_layernorm"):
            names |= {f"{p}.{norm}.weight", f"{p}.{norm}.bias"}
    return names


def tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                out[k] = st.get_slice(k).get_shape()
    return out


def _typed(v, t) -> bool:
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, t) and not (t is int and isinstance(v, bool))


@pytest.mark.parametrize("kind", ["phi3", "phimoe"])
def test_converted_folder_is_what_mlx_swift_reads(folders, tmp_path, kind):
    out = tmp_path / "q4"
    convert(str(folders[kind]), str(out), quantize=True, show_progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == kind
    if kind == "phi3":
        for k, t in PHI3_REQUIRED.items():
            assert k in cfg and _typed(cfg[k], t), k
        for k, t in PHI3_OPTIONAL.items():
            assert cfg.get(k) is None or _typed(cfg[k], t), k
        expected = phi3_swift_names(cfg)
    else:
        for k, t in PHIMOE_KEYS.items():
            assert cfg.get(k) is None or _typed(cfg[k], t), k
        expected = phimoe_swift_names(cfg)
    q = cfg["quantization"]
    assert _typed(q["group_size"], int) and _typed(q["bits"], int) and q["bits"] == 4
    # layers left float are per-layer overrides "path": false (MLXLMCommon's per-layer quantization form)
    skipped = [k for k, v in q.items() if k not in ("group_size", "bits")]
    assert all(q[k] is False for k in skipped)
    expected -= {f"{k}.{s}" for k in skipped for s in ("scales", "biases")}
    got = tensors(out)
    assert set(got) == expected
    # packed shapes: (out, in * bits / 32) words, (out, in / group) scales
    H = cfg["hidden_size"]
    first = "model.layers.0.self_attn.qkv_proj" if kind == "phi3" else "model.layers.0.self_attn.q_proj"
    assert got[f"{first}.weight"][-1] == H * 4 // 32 and got[f"{first}.scales"][-1] == H // q["group_size"]
    for f in ("tokenizer.json", "tokenizer_config.json"):  # what swift-transformers reads
        assert (out / f).is_file()


def test_iphone_target_refuses_models_mlx_swift_lacks(folders, tmp_path, capsys):
    assert main(["convert", "--hf-path", str(folders["phi3small"]), "--mlx-path", str(tmp_path / "o"),
                 "--target", "iphone-8gb"]) == 1
    err = capsys.readouterr().err
    assert "Phi-3-small has no MLX Swift implementation" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    # a Mac target is fine for it
    assert main(["convert", "--hf-path", str(folders["phi3small"]), "--mlx-path", str(tmp_path / "m"),
                 "--target", "mac-16gb"]) == 0


def test_target_chooses_the_weight_format(folders, tmp_path):
    mini = parse_config(json.loads((DATA / "configs" / "Phi-3-mini-4k-instruct.json").read_text()))
    assert _for_target(mini, "iphone-8gb", False, 4, None, None) == (True, 4, None)  # float16 is 7.6 GB
    assert _for_target(mini, "mac-16gb", False, 4, None, None) == (False, 4, "float16")
    medium = parse_config(json.loads((DATA / "configs" / "Phi-3-medium-4k-instruct.json").read_text()))
    with pytest.raises(Phi3MLXError, match="no weight format fits the iPhone, 8 GB budget"):
        _for_target(medium, "iphone-8gb", False, 4, None, None)
    # the tiny model fits any device in float16: the folder is written float16
    convert(str(folders["phi3"]), str(tmp_path / "t"), target="iphone-6gb", show_progress=False)
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["torch_dtype"] == "float16" and "quantization" not in cfg


def test_plan_weight_bytes_equal_the_converted_folder(folders, tmp_path):
    out = tmp_path / "q"
    convert(str(folders["phimoe"]), str(out), quantize=True, dtype="float16", show_progress=False)
    on_disk = 0
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), framework="numpy") as st:
            on_disk += sum(st.get_tensor(k).nbytes for k in st.keys())
    cfg = parse_config(json.loads((Path(folders["phimoe"]) / "config.json").read_text()))
    assert weight_bytes_for(cfg, 4) == on_disk


def test_plan_contexts():
    cfg = parse_config(json.loads((DATA / "configs" / "Phi-3-mini-128k-instruct.json").read_text()))
    fits = {f.device: f for f in plan(cfg)}
    assert set(fits) == set(DEVICES)
    # more memory never means less context; a 4-bit KV cache holds more; nothing beyond the model's context
    macs = [fits[d] for d in ("mac-8gb", "mac-16gb", "mac-24gb", "mac-32gb", "mac-64gb")]
    assert all(a.context_4bit <= b.context_4bit for a, b in zip(macs, macs[1:]))
    assert all(f.context_4bit_kv4 >= f.context_4bit for f in fits.values())
    assert all(f.context <= cfg.context_length for f in fits.values())
    assert fits["mac-64gb"].choice == "float16" and fits["iphone-8gb"].choice == "4-bit"
    assert fits["iphone-6gb"].choice is None and fits["iphone-6gb"].context_4bit < MIN_CONTEXT
    f = fits["iphone-8gb"]  # the arithmetic: budget = weights + activations + context x KV bytes per token
    per_token = 2 * 32 * 32 * 96 * 2
    assert abs(f.context - (4.0e9 - f.weights_gb * 1e9 - 512 * (4 * 3072 + 3 * 8192) * 2 - 512 * 32064 * 4)
               / per_token) <= 1


def test_plan_command(capsys, tmp_path):
    cfgfile = DATA / "configs" / "Phi-3-small-8k-instruct.json"
    assert main(["plan", "--model", str(cfgfile), "--device", "iphone-12gb", "--device", "mac-16gb"]) == 0
    out = capsys.readouterr().out
    assert "iphone-12gb" in out and "mac-16gb" in out and "mac-32gb" not in out
    assert "no MLX Swift implementation" in out
    assert main(["plan", "--model", str(cfgfile), "--device", "pixel-9"]) == 1
    assert "invalid choice" in capsys.readouterr().err
    assert main(["plan", "--model", str(tmp_path / "nothing")]) == 1
    assert main(["plan", "--model", "phi3mlx:embedded", "--prefill-chunk", "0"]) == 1
    assert "--prefill-chunk must be at least 1" in capsys.readouterr().err
