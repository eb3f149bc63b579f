"""Adapters: LoRA/DoRA/full on phi3, phi3small and phimoe layers, QLoRA, fuse, save/load, bad adapters."""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

from phi3mlx import load  # noqa: E402
from phi3mlx.errors import Phi3MLXError  # noqa: E402
from phi3mlx.finetune import lora  # noqa: E402

IDS = mx.array([[1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203]])

# folders (conftest.py): tiny random phi3, phi3small (helpers.FT_SMALL) and phimoe (helpers.FT_MOE) models.


def _perturb(model, seed=0):
    """Give every trainable array random values, as training would."""
    mx.random.seed(seed)
    model.update(tree_map(lambda p: p + 0.05 * mx.random.normal(p.shape), model.trainable_parameters()))


@pytest.mark.parametrize("kind,tune", [("phi3", "lora"), ("phi3", "dora"), ("phi3small", "lora"),
                                       ("phi3small", "dora"), ("phimoe", "lora")])  # DoRA on experts: refused
def test_starts_as_noop_and_fuses_exactly(folders, kind, tune):
    model, _ = load(folders[kind])
    base = np.array(model(IDS))
    cfg = lora.apply_adapters(model, {"fine_tune_type": tune, "rank": 4, "alpha": 8.0})
    assert cfg["targets"] == list(lora.DEFAULT_TARGETS[kind])
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(k.split(".")[-1] in ("lora_a", "lora_b", "m") for k in names)
    if kind == "phimoe":
        assert any("switch_mlp.gate_proj.lora_a" in k for k in names) and not any(".gate.lora" in k for k in names)
    if kind == "phi3small":
        assert any("query_key_value.lora_a" in k for k in names)
    assert np.abs(np.array(model(IDS)) - base).max() == 0  # B = 0 (and m = ||W||): an exact no-op
    _perturb(model)
    adapted = np.array(model(IDS))
    assert np.abs(adapted - base).max() > 1e-3
    with lora.adapters_disabled(model):
        assert np.abs(np.array(model(IDS)) - base).max() == 0
    assert np.abs(np.array(model(IDS)) - adapted).max() == 0  # back on
    lora.fuse(model)
    assert not lora.adapter_modules(model)
    assert np.abs(np.array(model(IDS)) - adapted).max() <= 1e-5


def test_dora_matches_its_definition(folders):
    model, _ = load(folders["phi3"])
    lora.apply_adapters(model, {"fine_tune_type": "dora", "rank": 4, "alpha": 8.0})
    _perturb(model, 1)
    layer = model.model.layers[0].self_attn.qkv_proj
    x = mx.random.normal((3, layer.base.weight.shape[1]))
    W = np.array(layer.base.weight, dtype=np.float64)
    A, B, m = (np.array(t, dtype=np.float64) for t in (layer.lora_a, layer.lora_b, layer.m))
    Wp = W + layer.scale * (A @ B).T  # adapted weight (out, in)
    want = np.array(x, dtype=np.float64) @ (m[:, None] * Wp / np.linalg.norm(Wp, axis=1, keepdims=True)).T
    assert np.abs(np.array(layer(x)) - want).max() <= 1e-5
    # magnitude initialised to the base weight's row norms
    fresh, _ = load(folders["phi3"])
    lora.apply_adapters(fresh, {"fine_tune_type": "dora", "rank": 4, "alpha": 8.0})
    l0 = fresh.model.layers[0].self_attn.qkv_proj
    assert np.allclose(np.array(l0.m), np.linalg.norm(np.array(l0.base.weight), axis=1), atol=1e-6)


def test_qlora_on_a_quantized_model(folders, tmp_path):
    """LoRA on a 4-bit folder: the packed weights stay frozen, gradients reach only the adapters, and
    fuse either requantizes (close) or dequantizes (exact)."""
    from phi3mlx.convert.hf_to_mlx import convert

    q = tmp_path / "q4"
    convert(str(folders["phi3"]), str(q), quantize=True, show_progress=False)
    model, _ = load(q)
    base = np.array(model(IDS))
    lora.apply_adapters(model, {"rank": 4, "alpha": 8.0})
    assert isinstance(model.model.layers[0].self_attn.qkv_proj.base, nn.QuantizedLinear)
    assert np.abs(np.array(model(IDS)) - base).max() == 0
    loss = lambda m: m(IDS).astype(mx.float32).square().mean()  # noqa: E731
    _, grads = nn.value_and_grad(model, loss)(model)
    names = [k for k, _ in tree_flatten(grads)]
    assert names and all(k.endswith(("lora_a", "lora_b")) for k in names)
    _perturb(model, 4)
    adapted = np.array(model(IDS))
    trained = model.trainable_parameters()
    lora.fuse(model)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, nn.QuantizedLinear)
    requant = np.array(model(IDS))
    cos = (requant * adapted).sum(-1) / (np.linalg.norm(requant, axis=-1) * np.linalg.norm(adapted, axis=-1))
    assert cos.min() > 0.95
    d, _ = load(q)  # DoRA on packed weights: dequantized on the fly, also an exact no-op at the start
    lora.apply_adapters(d, {"fine_tune_type": "dora", "rank": 4, "alpha": 8.0})
    assert np.abs(np.array(d(IDS)) - base).max() <= 1e-5
    m2, _ = load(q)
    lora.apply_adapters(m2, {"rank": 4, "alpha": 8.0})
    m2.update(trained)
    lora.fuse(m2, dequantize=True)
    assert isinstance(m2.model.layers[0].self_attn.qkv_proj, nn.Linear)
    assert np.abs(np.array(m2(IDS)) - adapted).max() <= 1e-4


def test_save_load_round_trip_and_mismatch(folders, tmp_path):
    model, _ = load(folders["phi3"])
    cfg = lora.apply_adapters(model, {"rank": 4, "alpha": 8.0, "num_layers": 1})
    assert all(".layers.1." in k for k, _ in tree_flatten(model.trainable_parameters()))
    _perturb(model, 2)
    want = np.array(model(IDS))
    lora.save_adapters(tmp_path / "a", model, cfg)
    saved = json.loads((tmp_path / "a" / lora.CONFIG_FILE).read_text())
    assert saved["rank"] == 4 and saved["num_layers"] == 1 and saved["model_type"] == "phi3"
    again, _ = load(folders["phi3"], adapter_path=str(tmp_path / "a"))
    assert np.abs(np.array(again(IDS)) - want).max() == 0
    # a rank that does not match the saved arrays: the layer and both shapes are named
    saved["rank"] = 8
    (tmp_path / "a" / lora.CONFIG_FILE).write_text(json.dumps(saved))
    with pytest.raises(Phi3MLXError, match=r"lora_a: adapter shape \(\d+, 4\), model expects \(\d+, 8\)"):
        load(folders["phi3"], adapter_path=str(tmp_path / "a"))
    saved.update(rank=4, model_type="phimoe")
    (tmp_path / "a" / lora.CONFIG_FILE).write_text(json.dumps(saved))
    with pytest.raises(Phi3MLXError, match="for a phimoe model, this one is phi3"):
        load(folders["phi3"], adapter_path=str(tmp_path / "a"))
    with pytest.raises(Phi3MLXError, match="does not exist"):
        load(folders["phi3"], adapter_path=str(tmp_path / "nope"))


def test_bad_adapter_settings(folders):
    model, _ = load(folders["phi3"])
    with pytest.raises(Phi3MLXError) as e:
        lora.apply_adapters(model, {"rank": 0, "alpha": -1.0, "dropout": 1.5, "num_layers": 7})
    msg = str(e.value)
    assert "--rank" in msg and "--alpha" in msg and "--dropout" in msg and "--num-layers" in msg
    with pytest.raises(Phi3MLXError, match="matches --targets nothing_here"):
        lora.apply_adapters(model, {"targets": "nothing_here"})
    moe, _ = load(folders["phimoe"])
    with pytest.raises(Phi3MLXError, match="DoRA is not available for mixture-of-experts"):
        lora.apply_adapters(moe, {"fine_tune_type": "dora"})


def test_full_fine_tuning_trains_the_layers_themselves(folders, tmp_path):
    model, _ = load(folders["phi3"])
    cfg = lora.apply_adapters(model, {"fine_tune_type": "full", "num_layers": 1})
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(k.startswith("model.layers.1.") and k.endswith("weight") for k in names)
    _perturb(model, 3)
    want = np.array(model(IDS))
    lora.save_adapters(tmp_path / "f", model, cfg)
    again, _ = load(folders["phi3"], adapter_path=str(tmp_path / "f"))
    assert np.abs(np.array(again(IDS)) - want).max() == 0
