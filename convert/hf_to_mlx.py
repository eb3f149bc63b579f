"""Hugging Face folder (or hub id) -> self-contained MLX folder, optionally quantized.

The output folder holds safetensors shards (at most 5 GB each) with an index, config.json (with a
``quantization`` block as mlx-lm writes it), the tokenizer and generation_config files. It is written
to a temporary folder and renamed into place only when complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from phi3mlx.config import read_config
from phi3mlx.errors import Phi3MLXError
from phi3mlx.hub import resolve
from phi3mlx.models import build_model, parse_config
from phi3mlx.models.maps import hf_to_mlx, mlx_to_folder
from phi3mlx.plan import DEVICES, MIN_CONTEXT, check_device, fit_for, swift_problem
from phi3mlx.quant import check_quant_args, estimate_memory, quantize_model
from phi3mlx.tokenizer import copy_tokenizer_files, missing_tokenizer
from phi3mlx.weights import atomic_dir, check_output, check_weights, folder_bytes, read_weights, save_weights

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}

# Keys of a Hugging Face config that mean nothing to an MLX folder.
_DROP_CONFIG_KEYS = ("auto_map", "quantization_config", "torch_dtype", "dtype", "_name_or_path")


@dataclass
class ConvertResult:
    path: Path
    bytes_on_disk: int
    summary: list = field(default_factory=list)


def _for_target(cfg, target: str, quantize: bool, q_bits: int, dtype: Optional[str], context: Optional[int]):
    """(quantize, bits, dtype) for a device target; every reason it cannot work, at once."""
    problems = []
    label, budget = DEVICES[target]
    if target.startswith("iphone"):
        p = swift_problem(cfg.model_type)
        if p:
            problems.append(p)
        if cfg.model_type == "phimoe" and not (cfg.section.lm_head_bias and cfg.section.attention_bias):
            problems.append("mlx-swift-lm's PhiMoE reads biased attention projections and a biased lm_head; this "
                            "checkpoint has none (attention_bias / lm_head_bias are false)")
    fit = fit_for(cfg, target, min_context=context or MIN_CONTEXT)
    if not quantize:
        if fit.choice is None:
            problems.append(f"no weight format fits the {label} budget of about {budget:.1f} GB with "
                            f"{min(context or MIN_CONTEXT, cfg.context_length)} tokens of context (4-bit weights "
                            f"alone are {fit.weights_gb:.2f} GB); see phi3mlx plan")
        elif fit.choice != "float16":
            quantize, q_bits = True, 8 if fit.choice == "8-bit" else 4
        elif dtype is None:
            dtype = "float16"
    if problems:
        raise Phi3MLXError.many(problems)
    return quantize, q_bits, dtype


def _progress():
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), transient=True)


def convert(
    hf_path: str,
    mlx_path: str,
    *,
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    dtype: Optional[str] = None,
    keep_float: tuple = (),
    quantize_vision: bool = False,
    force: bool = False,
    context: Optional[int] = None,
    show_progress: bool = True,
    target: Optional[str] = None,
) -> ConvertResult:
    """Convert ``hf_path`` into ``mlx_path``; with ``quantize``, ``q_bits`` (default 4) bits per weight in groups
    of ``q_group_size`` (default 64). Giving ``q_bits``/``q_group_size`` without ``quantize`` is an error.

    ``target`` (a ``phi3mlx.plan.DEVICES`` name, e.g. "iphone-8gb"): without ``quantize``, the weight
    format ``phi3mlx plan`` chooses for that device (float16, 8-bit or 4-bit, the most faithful that holds
    ``context`` or 2048 tokens); an iPhone target also checks that MLX Swift can load the model type.

    Vision models (phi3_v): quantizing covers the language model; the vision tower and projector stay
    float unless ``quantize_vision``."""
    problems = []
    given = [flag for flag, v in (("--q-bits", q_bits), ("--q-group-size", q_group_size),
                                  ("--quantize-vision", quantize_vision or None)) if v is not None]
    if given and not quantize:
        problems.append(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} only when quantizing: "
                        "add -q/--quantize")
    q_bits = 4 if q_bits is None else q_bits
    q_group_size = 64 if q_group_size is None else q_group_size
    if quantize or given:
        try:
            check_quant_args(q_bits, q_group_size)
        except Phi3MLXError as e:
            problems.append(str(e))
    if dtype is not None and dtype not in DTYPES:
        problems.append(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    if context is not None and context <= 0:
        problems.append(f"--context must be a positive number, got {context}")
    if target is not None:
        try:
            check_device(target)
        except Phi3MLXError as e:
            problems.append(f"--target: {e}")
    if problems:
        raise Phi3MLXError.many(problems)
    out = Path(mlx_path)
    check_output(out, force)  # fail before any download
    src = resolve(hf_path)
    raw = read_config(src)
    cfg = parse_config(raw, source=str(src / "config.json"))
    if cfg.quantization:
        raise Phi3MLXError(f"{src} is already quantized; convert from a float checkpoint")
    problem = missing_tokenizer(src, cfg.model_type)  # fail before the work, as loading the result would
    if problem:
        raise Phi3MLXError(problem)
    if target is not None:
        quantize, q_bits, dtype = _for_target(cfg, target, quantize, q_bits, dtype, context)

    model = build_model(cfg)
    vision = model.takes_images
    if quantize_vision and not vision:
        raise Phi3MLXError(f"--quantize-vision applies to vision models; {src} is {cfg.model_type}")
    if vision and not quantize_vision:
        keep_float = tuple(keep_float) + ("model.vision_embed_tokens",)
    weights = hf_to_mlx(cfg.model_type, read_weights(src), cfg.tie_word_embeddings)
    check_weights(model, weights, str(src))
    target = DTYPES[dtype] if dtype else None
    if target is None:  # keep the checkpoint's float type, bfloat16 if it is mixed
        kinds = {v.dtype for v in weights.values()}
        target = kinds.pop() if len(kinds) == 1 else mx.bfloat16
    weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()))

    new_cfg = {k: v for k, v in raw.items() if k not in _DROP_CONFIG_KEYS}
    if quantize:
        new_cfg["quantization"] = quantize_model(model, q_bits, q_group_size, keep_float)
        new_cfg["quantization_config"] = new_cfg["quantization"]  # the key mlx-lm also writes
    new_cfg["torch_dtype"] = str(target).split(".")[-1]

    flat = mlx_to_folder(cfg.model_type, dict(tree_flatten(model.parameters())))
    with atomic_dir(out, force=force) as tmp:
        if show_progress:
            with _progress() as prog:
                save_weights(tmp, flat, prog)
        else:
            save_weights(tmp, flat)
        (tmp / "config.json").write_text(json.dumps(new_cfg, indent=2))
        copy_tokenizer_files(src, tmp)
        if missing_tokenizer(tmp, cfg.model_type):
            raise Phi3MLXError(missing_tokenizer(src, cfg.model_type) or f"{src}: the tokenizer files could not be copied")
    size = folder_bytes(out)
    est = estimate_memory(model, cfg, context)
    summary = [
        f"wrote {out} ({size / 1e9:.3f} GB on disk, {str(target).split('.')[-1]}"
        + (f", {q_bits}-bit group {q_group_size}" if quantize else "")
        + ")",
        *est.lines(),
    ]
    return ConvertResult(out, size, summary)
