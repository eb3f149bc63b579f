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


def _imports(path: Path):
    """(module imported, line, at module top level?, comment on that line or the one above) per import."""
    src = path.read_text()
    lines = src.splitlines()
    tree = ast.parse(src)
    top = {id(n) for n in tree.body}
    pkg = ".".join(("phi3mlx",) + path.relative_to(ROOT).with_suffix("").parts[:-1])
    pkg = pkg.replace("phi3mlx.phi3mlx", "phi3mlx")  # phi3mlx/x.py -> phi3mlx; finetune/x.py -> phi3mlx.finetune
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        near = " ".join(lines[max(0, node.lineno - 4): node.lineno])  # the comment over a group of imports
        for name in names:
            out.append((name, node.lineno, id(node) in top, near))
    return out


MINE = sorted(ROOT.glob("finetune/*.py")) + [ROOT / "phi3mlx" / f for f in ("benchkit.py", "adapters.py", "quant.py")]


@pytest.mark.parametrize("path", MINE, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_hides_in_a_function(path):
    """Project imports at module top; a lazy third-party import says why ("lazy: ...") next to it."""
    for name, line, at_top, near in _imports(path):
        if at_top:
            continue
        assert not name.startswith("phi3mlx"), f"{path.name}:{line} imports {name} inside a function"
        assert "lazy" in near, f"{path.name}:{line} imports {name} inside a function without saying why"


# Imports of phi3mlx.convert that the core's moves (hub -> phi3mlx/hub.py, maps -> phi3mlx/models/maps.py,
# copy_tokenizer_files -> phi3mlx/tokenizer.py) remove; none may be added.
CONVERT_PENDING = {"loader.py", "tiny.py", "bench.py", "models/phimoe.py"}


def test_the_core_does_not_reach_up_to_finetune_or_convert():
    """No module under phi3mlx/ but cli.py imports phi3mlx.finetune (anywhere, functions included); the
    loading layer's adapters and quant import no command or job module at all."""
    for path in sorted((ROOT / "phi3mlx").rglob("*.py")):
        rel = str(path.relative_to(ROOT / "phi3mlx"))
        if rel == "cli.py":
            continue
        for name, line, _, _ in _imports(path):
            assert not name.startswith("phi3mlx.finetune"), f"phi3mlx/{rel}:{line} imports {name}"
            if rel not in CONVERT_PENDING:
                assert not name.startswith("phi3mlx.convert"), f"phi3mlx/{rel}:{line} imports {name}"
    high = ("phi3mlx.finetune", "phi3mlx.convert", "phi3mlx.cli", "phi3mlx.chat", "phi3mlx.bench",
            "phi3mlx.generate", "phi3mlx.loader")
    for f in ("adapters.py", "quant.py"):
        for name, line, _, _ in _imports(ROOT / "phi3mlx" / f):
            assert not name.startswith(high), f"phi3mlx/{f}:{line} imports {name}"
    for name, line, _, _ in _imports(ROOT / "phi3mlx" / "benchkit.py"):
        assert not name.startswith(("phi3mlx.finetune", "phi3mlx.cli", "phi3mlx.chat", "phi3mlx.bench")) or \
            name.startswith("phi3mlx.benchkit"), f"phi3mlx/benchkit.py:{line} imports {name}"
