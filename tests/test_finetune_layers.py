"""Where things live after the layering of issue 8: what the fine-tuning side moved into the lower layers
(phi3mlx.adapters, phi3mlx.quant, phi3mlx.benchkit) and that nothing below the commands reaches up."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import mlx.nn as nn  # noqa: E402

from phi3mlx import load  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_quant_dequantize_replaces_every_quantized_layer(tmp_path):
    from phi3mlx.convert import mlx_to_hf
    from phi3mlx.convert.hf_to_mlx import convert
    from phi3mlx.quant import dequantize
    from phi3mlx.tiny import make_tiny

    src = make_tiny(tmp_path / "m", config={"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1})
    convert(str(src), str(tmp_path / "q"), quantize=True, show_progress=False)
    model, _ = load(tmp_path / "q")
    layer = model.model.layers[0].self_attn.qkv_proj
    want = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    ids = mx.array([[1, 2, 3, 4]])
    before = np.array(model(ids))
    assert dequantize(model) is model
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    assert np.array_equal(np.array(model.model.layers[0].self_attn.qkv_proj.weight), np.array(want))
    assert np.abs(np.array(model(ids)) - before).max() <= 1e-3
    assert mlx_to_hf.dequantize is dequantize  # export-hf uses the one in phi3mlx.quant
