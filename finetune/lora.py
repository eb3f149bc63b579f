"""The training side of adapters: fresh LoRA/DoRA adapters (or full fine-tuning) from the command
line's settings, the arrays that train, saving them.

The layers themselves, rebuilding saved adapters, switching them off and fusing live in
``phi3mlx.adapters`` (the loading layer, which ``phi3mlx.loader.load(..., adapter_path=...)`` uses);
their names are re-exported here so training code needs one import.

Saved as ``adapters.safetensors`` (only the trained arrays) and ``adapter_config.json`` (everything
needed to rebuild the adapters on the base model: type, rank, alpha, dropout, targets, layers), the
layout mlx-lm uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx

from phi3mlx.adapters import (  # noqa: F401  (re-exported: the names training code uses)
    ADAPTER_CLASSES,
    ADAPTER_FILE,
    CONFIG_FILE,
    DEFAULT_TARGETS,
    DEFAULTS,
    FINE_TUNE_TYPES,
    LoRALinear,
    LoRASwitchLinear,
    adapter_modules,
    adapter_problems,
    adapters_disabled,
    attach_adapters,
    fuse,
    load_adapters,
    read_adapter_config,
    trainable_arrays,
)
from phi3mlx.errors import Phi3MLXError

__all__ = ["ADAPTER_CLASSES", "ADAPTER_FILE", "CONFIG_FILE", "DEFAULT_TARGETS", "DEFAULTS", "FINE_TUNE_TYPES",
           "LoRALinear", "LoRASwitchLinear", "adapter_modules", "adapter_problems", "adapters_disabled",
           "apply_adapters", "attach_adapters", "check_adapter_args", "fuse", "load_adapters", "read_adapter_config",
           "save_adapters", "trainable_arrays"]


def check_adapter_args(fine_tune_type: str, rank: int, alpha: float, dropout: float, num_layers: int,
                       n_model_layers: int) -> None:
    """Every problem with the adapter flags at once (named as flags), as one Phi3MLXError."""
    problems = adapter_problems({"fine_tune_type": fine_tune_type, "rank": rank, "alpha": alpha, "dropout": dropout,
                                 "num_layers": num_layers}, n_model_layers)
    if problems:
        raise Phi3MLXError.many(problems)


def apply_adapters(model, config: dict) -> dict:
    """Freeze ``model`` and make the adapters of ``config`` trainable; return the completed config.

    config keys: fine_tune_type ("lora" | "dora" | "full"), rank, alpha, dropout, targets (None = the
    model type's defaults), num_layers (-1 = all); a bad one is reported by its flag (``--rank``).
    """
    return attach_adapters(model, config)


def save_adapters(path: Path, model, config: dict, extra: Optional[dict] = None) -> None:
    """Write adapters.safetensors and adapter_config.json into ``path`` (each through a temp file)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = trainable_arrays(model)
    tmp = path / (ADAPTER_FILE + ".tmp.safetensors")
    mx.save_safetensors(str(tmp), weights)
    tmp.replace(path / ADAPTER_FILE)
    tmpc = path / (CONFIG_FILE + ".tmp")
    tmpc.write_text(json.dumps(dict(config, **(extra or {})), indent=2))
    tmpc.replace(path / CONFIG_FILE)
