"""MLX folder -> Hugging Face folder (dequantized) that transformers loads with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from phi3mlx.errors import Phi3MLXError
from phi3mlx.loader import load_model
from phi3mlx.weights import atomic_dir, check_output, save_weights

from phi3mlx.models.maps import mlx_to_hf
from phi3mlx.tokenizer import copy_tokenizer_files

from .hf_to_mlx import DTYPES, _progress

_HF_ARCH = {"phi3": "Phi3ForCausalLM", "phi3small": "Phi3SmallForCausalLM", "phimoe": "PhimoeForCausalLM"}


def dequantize(model: nn.Module) -> nn.Module:
    """Replace quantized layers by float ones holding the dequantized weights."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    swaps = []
    for name, m in model.named_modules():
        if isinstance(m, QuantizedSwitchLinear):  # stacked experts (phimoe)
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
            sl = SwitchLinear(w.shape[2], w.shape[1], w.shape[0], bias="bias" in m)
            sl.weight = w
            if "bias" in m:
                sl.bias = m.bias
            swaps.append((name, sl))
            continue
        if isinstance(m, nn.QuantizedLinear):
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
            lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            lin.weight = w
            if "bias" in m:
                lin.bias = m.bias
            swaps.append((name, lin))
        elif isinstance(m, nn.QuantizedEmbedding):
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
            emb = nn.Embedding(w.shape[0], w.shape[1])
            emb.weight = w
            swaps.append((name, emb))
    if swaps:
        model.update_modules(_unflatten(swaps))
    return model


def _unflatten(pairs):
    from mlx.utils import tree_unflatten

    return tree_unflatten(pairs)


def export_hf(mlx_path: str, hf_path: str, *, dtype: str | None = None, force: bool = False, show_progress: bool = True) -> Path:
    src = Path(mlx_path)
    if dtype is not None and dtype not in DTYPES:
        raise Phi3MLXError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    out = Path(hf_path)
    check_output(out, force)
    model, cfg = load_model(src)
    dequantize(model)
    weights = dict(tree_flatten(model.parameters()))
    if dtype:
        weights = {k: v.astype(DTYPES[dtype]) for k, v in weights.items()}
    weights = mlx_to_hf(cfg.model_type, weights)
    hf_cfg = {k: v for k, v in cfg.raw.items() if k not in ("quantization", "quantization_config")}
    hf_cfg.setdefault("architectures", [_HF_ARCH.get(cfg.model_type, "Phi3ForCausalLM")])
    hf_cfg["torch_dtype"] = str(next(iter(weights.values())).dtype).split(".")[-1]
    with atomic_dir(out, force=force) as tmp:
        if show_progress:
            with _progress() as prog:
                save_weights(tmp, weights, prog, fmt="pt")
        else:
            save_weights(tmp, weights, fmt="pt")
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        copy_tokenizer_files(src, tmp)
    return out
