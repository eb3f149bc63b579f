"""Where things live after the layering of issue 8: what the fine-tuning side moved into the lower layers
(phi3mlx.adapters, phi3mlx.quant, phi3mlx.benchkit) and that nothing below the commands reaches up."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

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


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory):
    from phi3mlx.finetune import lora
    from phi3mlx.tiny import make_tiny

    d = tmp_path_factory.mktemp("adapters")
    folder = make_tiny(d / "m", config={"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1})
    model, _ = load(folder)
    cfg = lora.apply_adapters(model, {"rank": 2, "alpha": 4.0})
    mx.random.seed(3)
    model.update(tree_map(lambda p: p + 0.05 * mx.random.normal(p.shape), model.trainable_parameters()))
    lora.save_adapters(d / "ad", model, cfg)
    return folder, d / "ad"


def test_loading_adapters_needs_no_finetune_module(adapter_folder):
    """load(..., adapter_path=...) is the loading layer's job: phi3mlx.finetune is never imported."""
    import subprocess
    import sys

    folder, ad = adapter_folder
    code = ("import sys; from phi3mlx import load; m, _ = load(sys.argv[1], adapter_path=sys.argv[2]); "
            "from phi3mlx.adapters import adapter_modules; assert adapter_modules(m); "
            "bad = sorted(k for k in sys.modules if k.startswith(('phi3mlx.finetune', 'phi3mlx.convert.mlx_to_hf'))); "
            "print('imported:', bad)")
    r = subprocess.run([sys.executable, "-c", code, str(folder), str(ad)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "imported: []"


def test_a_bad_saved_config_names_the_file_and_keys(adapter_folder, tmp_path):
    import json
    import shutil

    from phi3mlx.adapters import CONFIG_FILE
    from phi3mlx.errors import Phi3MLXError

    folder, ad = adapter_folder
    bad = tmp_path / "bad"
    shutil.copytree(ad, bad)
    cfg = json.loads((bad / CONFIG_FILE).read_text())
    cfg.update(rank=0, dropout=2.0)
    (bad / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(Phi3MLXError) as e:
        load(folder, adapter_path=str(bad))
    msg = str(e.value)
    assert f"{bad / CONFIG_FILE}: rank must be a positive integer, got 0" in msg
    assert f"{bad / CONFIG_FILE}: dropout must be in [0, 1), got 2.0" in msg and "--" not in msg


def test_finetune_lora_reexports_the_adapter_layer():
    from phi3mlx import adapters
    from phi3mlx.finetune import lora

    for name in ("LoRALinear", "LoRASwitchLinear", "load_adapters", "read_adapter_config", "adapters_disabled",
                 "fuse", "ADAPTER_FILE", "CONFIG_FILE", "DEFAULT_TARGETS"):
        assert getattr(lora, name) is getattr(adapters, name), name
