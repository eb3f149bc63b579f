"""Conversion both ways, mlx-lm interoperability, sharding and 4-bit quantization."""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from phi3mlx import load  # noqa: E402
from phi3mlx.convert.hf_to_mlx import convert  # noqa: E402
from phi3mlx.convert.mlx_to_hf import export_hf  # noqa: E402
from phi3mlx.weights import folder_bytes, save_weights  # noqa: E402

IDS = np.random.RandomState(0).randint(0, 32000, size=(1, 50))


@pytest.fixture(scope="module")
def mini(hf_checkpoint, tmp_path_factory):
    src, hf_model = hf_checkpoint("Phi-3-mini-4k-instruct")
    out = tmp_path_factory.mktemp("conv") / "mini"
    convert(str(src), str(out), show_progress=False)
    return src, out, hf_model


def test_folder_is_self_contained(mini):
    _, out, _ = mini
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json"} <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "phi3" and "quantization" not in cfg
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}


def test_mlx_lm_loads_our_folder_with_same_logits(mini):
    from mlx_lm import load as mlx_lm_load

    _, out, _ = mini
    ours, _ = load(out)
    theirs, _ = mlx_lm_load(str(out))
    a, b = np.array(ours(mx.array(IDS))), np.array(theirs(mx.array(IDS)))
    assert np.abs(a - b).max() <= 1e-4


def test_mlx_lm_loads_our_quantized_folder(mini, tmp_path):
    from mlx_lm import load as mlx_lm_load

    src, _, _ = mini
    q = tmp_path / "q4"
    convert(str(src), str(q), quantize=True, show_progress=False)
    ours, _ = load(q)
    theirs, _ = mlx_lm_load(str(q))
    a, b = np.array(ours(mx.array(IDS))), np.array(theirs(mx.array(IDS)))
    assert np.abs(a - b).max() <= 1e-4


def test_export_hf_round_trip(mini, tmp_path, torch_mod):
    from transformers import AutoModelForCausalLM

    _, out, hf_model = mini
    back = tmp_path / "hf"
    export_hf(str(out), str(back), show_progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(back).eval()
    with torch_mod.no_grad():
        a = reloaded(torch_mod.tensor(IDS)).logits.numpy()
        b = hf_model(torch_mod.tensor(IDS)).logits.numpy()
    assert np.abs(a - b).max() <= 1e-5
    ours, _ = load(out)
    assert np.abs(np.array(ours(mx.array(IDS))) - a).max() <= 1e-4


def test_export_hf_dequantizes(mini, tmp_path, torch_mod):
    from transformers import AutoModelForCausalLM

    src, _, _ = mini
    q = tmp_path / "q4"
    convert(str(src), str(q), quantize=True, show_progress=False)
    back = tmp_path / "hf"
    export_hf(str(q), str(back), show_progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(back).eval()
    with torch_mod.no_grad():
        a = reloaded(torch_mod.tensor(IDS)).logits.numpy()
    ours, _ = load(q)
    assert np.abs(np.array(ours(mx.array(IDS))) - a).max() <= 1e-4


def _cosine(f, q):
    return float(((f * q).sum(-1) / (np.linalg.norm(f, axis=-1) * np.linalg.norm(q, axis=-1))).mean())


def test_four_bit_close_to_float_and_small(mini, tmp_path):
    """Metric: mean cosine similarity of the per-position logit vectors, quantized vs float.

    Random Gaussian weights are the hard case for 4-bit (no outliers to spare, near-flat logits,
    so top-1 agreement means little): bounds are 4-bit >= 0.95, 8-bit >= 0.999, while an unrelated
    model scores about 0. Size: 4-bit group 64 vs bfloat16 is about 0.28x (0.5 + 4/64 bytes vs 2).
    """
    src, out, _ = mini
    bf16, q4, q8 = tmp_path / "bf16", tmp_path / "q4", tmp_path / "q8"
    convert(str(src), str(bf16), dtype="bfloat16", show_progress=False)
    convert(str(src), str(q4), quantize=True, q_bits=4, q_group_size=64, dtype="bfloat16", show_progress=False)
    convert(str(src), str(q8), quantize=True, q_bits=8, q_group_size=64, show_progress=False)
    ratio = folder_bytes(q4) / folder_bytes(bf16)
    assert 0.26 <= ratio <= 0.30, ratio
    cfg = json.loads((q4 / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 64, "bits": 4}

    f = np.array(load(out)[0](mx.array(IDS)))[0]
    q4_logits = np.array(load(q4)[0](mx.array(IDS)).astype(mx.float32))[0]
    q8_logits = np.array(load(q8)[0](mx.array(IDS)).astype(mx.float32))[0]
    assert _cosine(f, q4_logits) >= 0.95
    assert _cosine(f, q8_logits) >= 0.999
    other = np.random.RandomState(1).permutation(f.shape[-1])
    assert abs(_cosine(f, f[:, other])) < 0.2  # the metric does tell models apart


def test_keep_head_and_embeddings_float(mini, tmp_path):
    src, _, _ = mini
    q = tmp_path / "q"
    convert(str(src), str(q), quantize=True, q_bits=8, keep_float=("lm_head", "model.embed_tokens"), show_progress=False)
    cfg = json.loads((q / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 64, "bits": 8, "lm_head": False, "model.embed_tokens": False}
    model, _ = load(q)
    import mlx.nn as nn

    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, nn.QuantizedLinear)
    assert isinstance(model.layers[0].mlp.down_proj, nn.QuantizedLinear)


def test_sharded_folder_loads(mini, tmp_path):
    """Shards of a few MB (as 5 GB shards would be for real models) with an index load the same."""
    import shutil

    _, out, _ = mini
    sharded = tmp_path / "sharded"
    shutil.copytree(out, sharded)
    for f in sharded.glob("model*.safetensors*"):
        f.unlink()
    weights = mx.load(str(out / "model.safetensors"))
    save_weights(sharded, weights, max_shard_bytes=20 * 1024**2)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0].startswith("model-00001-of-")
    a, _ = load(out)
    b, _ = load(sharded)
    assert np.array_equal(np.array(a(mx.array(IDS))), np.array(b(mx.array(IDS))))


def test_load_reads_hf_folder_directly(mini):
    src, out, _ = mini
    a, _ = load(src)
    b, _ = load(out)
    assert np.array_equal(np.array(a(mx.array(IDS))), np.array(b(mx.array(IDS))))


def test_cpu_prefill_path_matches_quantized_matmul(mini, tmp_path):
    """Quantized layers multiply many rows through dequantized float32 on the CPU: same result."""
    import mlx.nn as nn

    from phi3mlx.quant import CpuPrefillQuantizedLinear

    src, _, _ = mini
    q = tmp_path / "q4"
    convert(str(src), str(q), quantize=True, show_progress=False)
    model, _ = load(q)
    layer = model.layers[0].mlp.gate_up_proj
    assert type(layer) is CpuPrefillQuantizedLinear
    x = mx.random.normal((1, 40, layer.scales.shape[-1] * layer.group_size))
    fast = layer(x)
    stock = nn.QuantizedLinear.__call__(layer, x)
    assert np.abs(np.array(fast) - np.array(stock)).max() <= 1e-4
    assert np.array_equal(np.array(layer(x[:, :1])), np.array(nn.QuantizedLinear.__call__(layer, x[:, :1])))
