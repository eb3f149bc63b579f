"""MLX folder -> Hugging Face folder (dequantized) that transformers loads with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

from mlx.utils import tree_flatten

from phi3mlx.errors import Phi3MLXError
from phi3mlx.loader import load_model
from phi3mlx.quant import dequantize
from phi3mlx.weights import atomic_dir, check_output, save_weights

from phi3mlx.models.maps import mlx_to_hf
from phi3mlx.tokenizer import copy_tokenizer_files

from .hf_to_mlx import DTYPES, _progress

_HF_ARCH = {"phi3": "Phi3ForCausalLM", "phi3small": "Phi3SmallForCausalLM", "phimoe": "PhimoeForCausalLM",
            "phi3_v": "Phi3VForCausalLM"}


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
