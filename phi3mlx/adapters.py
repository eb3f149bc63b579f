"""Adapters at inference: LoRA and DoRA layers, rebuilding saved adapters on a model, switching them off, fusing.

LoRA adds ``scale * (x @ A) @ B`` to a frozen linear layer y = x W^T + b, with A (in, r) drawn
uniformly in ±1/sqrt(in), B (r, out) zero (so a fresh adapter changes nothing) and scale = alpha / r.
DoRA (https://arxiv.org/abs/2402.09353) splits the adapted weight W' = W + scale * (A B)^T into a
direction and a learned magnitude m (one per output row, initialised to ||W||): y = (m / ||W'||) *
(x W'^T) + b, the norm taken over each output row. Both work on float and quantized (QLoRA) layers:
quantized weights stay frozen and packed; DoRA dequantizes them on the fly. Mixture-of-experts
projections (``SwitchLinear``, stacked per expert) get one LoRA pair per expert.

What is adapted: ``targets`` names the projections (the last component of the parameter path, e.g.
``qkv_proj``); by default every attention and MLP projection of the model type, the MoE experts and
Phi-3-small's fused ``query_key_value`` included, never the MoE router. ``num_layers`` limits it to the
last N decoder layers.

A saved adapter folder holds ``adapters.safetensors`` (only the trained arrays) and
``adapter_config.json`` (everything needed to rebuild the adapters on the base model: type, rank,
alpha, dropout, targets, layers), the layout mlx-lm uses. ``load_adapters`` rebuilds and loads them
(what ``phi3mlx.loader.load(model, adapter_path=...)`` uses); the training side (fresh adapters from
flags, saving) is ``phi3mlx.finetune.lora``.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Callable, Iterable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .errors import Phi3MLXError
from .quant import dequantize as dequantize_model

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
FINE_TUNE_TYPES = ("lora", "dora", "full")
DEFAULTS = {"fine_tune_type": "lora", "rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": None, "num_layers": -1}

# Default targets per model_type: every projection of attention and MLP (and the MoE experts).
DEFAULT_TARGETS = {
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "phi3small": ("query_key_value", "dense", "up_proj", "down_proj"),
    "phimoe": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def flag_name(key: str) -> str:
    """How a setting is named to a user of the command line: ``num_layers`` -> ``--num-layers``."""
    return "--" + key.replace("_", "-")


def _is_quantized(layer) -> bool:
    return "scales" in layer


def _is_switch(layer) -> bool:
    return type(layer).__name__ in ("SwitchLinear", "QuantizedSwitchLinear")


def _dims(layer) -> tuple[int, int]:
    """(in, out) of a Linear / QuantizedLinear / SwitchLinear / QuantizedSwitchLinear."""
    out, packed_in = layer["weight"].shape[-2:]
    return (packed_in * 32 // layer.bits if _is_quantized(layer) else packed_in), out


def _float_weight(layer) -> mx.array:
    """The layer's weight, dequantized if needed: (out, in) or (experts, out, in)."""
    if not _is_quantized(layer):
        return layer["weight"]
    return mx.dequantize(layer["weight"], layer["scales"], layer.get("biases"), layer.group_size, layer.bits,
                         mode=getattr(layer, "mode", "affine"))


class LoRALinear(nn.Module):
    """y = base(x) + scale * dropout(x) @ A @ B, or DoRA's renormalised form when ``dora``."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, dora: bool = False):
        super().__init__()
        base.freeze()
        self.base = base
        in_dims, out_dims = _dims(base)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(p=dropout)
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))
        self.dora = dora
        if dora:
            self.m = mx.linalg.norm(_float_weight(base).astype(mx.float32), axis=1)  # (out,)
        self.enabled = True

    def delta(self) -> mx.array:
        """scale * (A B)^T: (out, in)."""
        return self.scale * (self.lora_b.T @ self.lora_a.T)

    def fused(self) -> mx.array:
        """The adapted weight (out, in) in float32."""
        w = _float_weight(self.base).astype(mx.float32) + self.delta().astype(mx.float32)
        if self.dora:
            w = w * (self.m / mx.linalg.norm(w, axis=1))[:, None]
        return w

    def __call__(self, x):
        if not self.enabled:
            return self.base(x)
        if self.dora:
            w = _float_weight(self.base) + self.delta().astype(x.dtype)
            norm = mx.linalg.norm(w.astype(mx.float32), axis=1)
            y = (self.dropout(x) @ w.T) * (self.m / norm).astype(x.dtype)
            return y + self.base["bias"] if "bias" in self.base else y
        z = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return self.base(x) + (self.scale * z).astype(x.dtype)


class LoRASwitchLinear(nn.Module):
    """LoRA on stacked experts: A (experts, r, in), B (experts, out, r), applied to the routed experts."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        base.freeze()
        self.base = base
        in_dims, out_dims = _dims(base)
        experts = base["weight"].shape[0]
        self.scale = alpha / rank
        self.dropout = nn.Dropout(p=dropout)
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (experts, rank, in_dims))
        self.lora_b = mx.zeros((experts, out_dims, rank))
        self.enabled = True

    def delta(self) -> mx.array:
        return self.scale * (self.lora_b @ self.lora_a)  # (experts, out, in)

    def fused(self) -> mx.array:
        return _float_weight(self.base).astype(mx.float32) + self.delta().astype(mx.float32)

    def __call__(self, x, indices, sorted_indices=False):
        y = self.base(x, indices, sorted_indices=sorted_indices)
        if not self.enabled:
            return y
        z = mx.gather_mm(self.dropout(x), self.lora_a.swapaxes(-1, -2).astype(x.dtype), rhs_indices=indices,
                         sorted_indices=sorted_indices)
        z = mx.gather_mm(z, self.lora_b.swapaxes(-1, -2).astype(x.dtype), rhs_indices=indices,
                         sorted_indices=sorted_indices)
        return y + (self.scale * z).astype(y.dtype)


ADAPTER_CLASSES = (LoRALinear, LoRASwitchLinear)


def _is_target_layer(module) -> bool:
    return isinstance(module, (nn.Linear, nn.QuantizedLinear)) or _is_switch(module)


def _adapted_layers(model, targets: Iterable[str], num_layers: int):
    """(path, module) of every target projection in the last ``num_layers`` decoder layers."""
    layers = model.model.layers
    first = 0 if num_layers is None or num_layers < 0 else max(0, len(layers) - num_layers)
    targets = set(targets)
    found = []
    for i in range(first, len(layers)):
        for path, module in layers[i].named_modules():
            name = path.split(".")[-1]
            if name in targets and _is_target_layer(module):
                found.append((f"model.layers.{i}.{path}", module))
    return found


def adapter_problems(cfg: dict, n_model_layers: int, name: Callable[[str], str] = flag_name) -> list[str]:
    """Every problem with an adapter config's settings; ``name(key)`` says how a setting is called
    (a flag for the command line, a key of adapter_config.json for a saved folder)."""
    problems = []
    tune, rank, alpha = cfg.get("fine_tune_type"), cfg.get("rank"), cfg.get("alpha")
    dropout, num_layers = cfg.get("dropout"), cfg.get("num_layers")
    if tune not in FINE_TUNE_TYPES:
        problems.append(f"fine-tune type must be one of {', '.join(FINE_TUNE_TYPES)}, got {tune!r}")
    if tune != "full":
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            problems.append(f"{name('rank')} must be a positive integer, got {rank}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            problems.append(f"{name('alpha')} must be a positive number, got {alpha}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        problems.append(f"{name('dropout')} must be in [0, 1), got {dropout}")
    if num_layers is not None and num_layers != -1 and not (
            isinstance(num_layers, int) and 1 <= num_layers <= n_model_layers):
        problems.append(f"{name('num_layers')} must be -1 (all) or 1..{n_model_layers}, got {num_layers}")
    return problems


def attach_adapters(model, config: dict, name: Callable[[str], str] = flag_name) -> dict:
    """Freeze ``model`` and make the adapters of ``config`` trainable; return the completed config.

    config keys (missing ones take ``DEFAULTS``): fine_tune_type ("lora" | "dora" | "full"), rank, alpha,
    dropout, targets (None = the model type's defaults; a list or a comma-separated string), num_layers
    (-1 = all). Every bad setting is named at once, as ``name(key)`` calls it.
    """
    cfg = dict(DEFAULTS)
    cfg.update({k: v for k, v in config.items() if v is not None})
    mt = model.config.model_type
    problems = adapter_problems(cfg, len(model.model.layers), name)
    if problems:
        raise Phi3MLXError.many(problems)
    targets = cfg["targets"] or DEFAULT_TARGETS.get(mt, DEFAULT_TARGETS["phi3"])
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    cfg["targets"] = list(targets)
    cfg["model_type"] = mt
    model.freeze()
    found = _adapted_layers(model, targets, cfg["num_layers"])
    if not found:
        raise Phi3MLXError(f"no layer of this {mt} model matches {name('targets')} {','.join(targets)} "
                           f"(its projections: {', '.join(DEFAULT_TARGETS.get(mt, ()))})")
    if cfg["fine_tune_type"] == "full":
        for path, module in found:
            if _is_quantized(module):
                raise Phi3MLXError(f"full fine-tuning needs float weights, but {path} is quantized; "
                                   "use LoRA (QLoRA) on a quantized model")
            module.unfreeze()
        return cfg
    dora = cfg["fine_tune_type"] == "dora"
    replacements = []
    for path, module in found:
        if _is_switch(module):
            if dora:
                raise Phi3MLXError(f"DoRA is not available for mixture-of-experts layers ({path}); "
                                   f"use LoRA or leave the experts out of {name('targets')}")
            new = LoRASwitchLinear(module, cfg["rank"], cfg["alpha"], cfg["dropout"])
        else:
            new = LoRALinear(module, cfg["rank"], cfg["alpha"], cfg["dropout"], dora=dora)
        replacements.append((path, new))
    model.update_modules(tree_unflatten(replacements))
    return cfg


def adapter_modules(model) -> list:
    return [m for _, m in model.named_modules() if isinstance(m, ADAPTER_CLASSES)]


@contextlib.contextmanager
def adapters_disabled(model):
    """Run the base model: every adapter switched off inside the block (for DPO's reference pass)."""
    mods = adapter_modules(model)
    states = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, s in zip(mods, states):
            m.enabled = s


def trainable_arrays(model) -> dict:
    """The arrays an adapter folder holds: the model's trainable parameters, by path."""
    return dict(tree_flatten(model.trainable_parameters()))


def read_adapter_config(path: Path) -> dict:
    """``path``/adapter_config.json, after checking that the folder holds both adapter files."""
    path = Path(path)
    if not path.exists():
        raise Phi3MLXError(f"adapter path {path} does not exist")
    f = path / CONFIG_FILE
    if not f.exists():
        raise Phi3MLXError(f"no {CONFIG_FILE} in {path}")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise Phi3MLXError(f"{f} is not valid JSON ({e.msg}, line {e.lineno})") from None
    except UnicodeDecodeError:
        raise Phi3MLXError(f"{f} is not UTF-8 text") from None
    if not isinstance(cfg, dict):
        raise Phi3MLXError(f"{f} must hold a JSON object")
    if not (path / ADAPTER_FILE).exists():
        raise Phi3MLXError(f"no {ADAPTER_FILE} in {path}")
    return cfg


def load_adapters(model, path: Path) -> dict:
    """Rebuild the adapters described by ``path``/adapter_config.json on ``model`` and load their arrays.

    Every mismatch (a layer the model lacks, a shape that differs) is reported at once, naming the
    layer and both shapes.
    """
    path = Path(path)
    cfg = read_adapter_config(path)
    mt = model.config.model_type
    if cfg.get("model_type") not in (None, mt):
        raise Phi3MLXError(f"the adapters in {path} are for a {cfg['model_type']} model, this one is {mt}")
    cfg = attach_adapters(model, cfg, name=lambda key: f"{path / CONFIG_FILE}: {key}")
    try:
        weights = mx.load(str(path / ADAPTER_FILE))
    except Exception as e:  # corrupt file
        raise Phi3MLXError(f"cannot read {path / ADAPTER_FILE} ({str(e).splitlines()[0]})") from None
    expected = trainable_arrays(model)
    problems = []
    for k, v in weights.items():
        if k not in expected:
            problems.append(f"{k} is not a trainable array of this model")
        elif tuple(v.shape) != tuple(expected[k].shape):
            problems.append(f"{k}: adapter shape {tuple(v.shape)}, model expects {tuple(expected[k].shape)}")
    missing = [k for k in expected if k not in weights]
    if missing:
        problems.append(f"{len(missing)} arrays missing from {ADAPTER_FILE} (first: {missing[0]})")
    if problems:
        raise Phi3MLXError.many(problems, f"adapters in {path} do not match the model: ")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return cfg


def fuse(model, dequantize: bool = False) -> None:
    """Replace every adapter by a plain layer with the adapted weight (requantized like its base unless
    ``dequantize``; with it, every other quantized layer of the model is dequantized too)."""
    replacements = []
    for path, m in model.named_modules():
        if not isinstance(m, ADAPTER_CLASSES):
            continue
        base = m.base
        w = m.fused()
        bias = base["bias"] if "bias" in base else None
        dtype = base["scales"].dtype if _is_quantized(base) else base["weight"].dtype
        if isinstance(m, LoRASwitchLinear):
            # lazy: importing mlx_lm takes seconds (it pulls in transformers); only MoE experts need it
            from mlx_lm.models.switch_layers import SwitchLinear

            new = SwitchLinear(w.shape[2], w.shape[1], w.shape[0], bias=bias is not None)
        else:
            new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        new.weight = w.astype(dtype)
        if bias is not None:
            new.bias = bias
        if _is_quantized(base) and not dequantize:
            new = new.to_quantized(group_size=base.group_size, bits=base.bits)
        replacements.append((path, new))
    model.update_modules(tree_unflatten(replacements))
    if dequantize:
        dequantize_model(model)
