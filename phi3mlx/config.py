"""ModelConfig: which parts the one Phi-3 decoder is built from, read from a config.json.

Variants are data: a Hugging Face config.json (or one written by mlx-lm / phi3mlx) is turned
into a ModelConfig, validated, and the decoder in ``phi3mlx.models`` builds itself from it.
All problems in a config are reported at once, in one ``Phi3MLXError``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import Phi3MLXError

SUPPORTED_MODEL_TYPES = ("phi3",)

_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass
class RopeConfig:
    """Rotary embedding settings.

    kind "default": plain RoPE with ``theta``.
    kind "longrope": inverse frequencies divided by ``short_factor`` while the sequence length
    (largest position + 1) is at most ``original_max_position_embeddings``, by ``long_factor``
    beyond it; cos/sin multiplied by ``attention_factor``.
    """

    theta: float = 10000.0
    dims: int = 96
    kind: str = "default"
    short_factor: Optional[list] = None
    long_factor: Optional[list] = None
    original_max_position_embeddings: int = 4096
    attention_factor: float = 1.0

    def uses_long(self, seq_len: int) -> bool:
        return self.kind == "longrope" and seq_len > self.original_max_position_embeddings


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    sliding_window: Optional[int] = None
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    rope: RopeConfig = field(default_factory=RopeConfig)
    quantization: Optional[dict] = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> "ModelConfig":
        problems = []
        mt = cfg.get("model_type")
        if mt is None:
            raise Phi3MLXError(f"{source}: no 'model_type' key (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise Phi3MLXError(
                f"{source}: unsupported model_type '{mt}' (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        missing = [k for k in _REQUIRED if k not in cfg]
        if missing:
            problems.append("missing key(s) " + ", ".join(repr(k) for k in missing))
        for k in _REQUIRED:
            if k in cfg and (not isinstance(cfg[k], int) or isinstance(cfg[k], bool) or cfg[k] <= 0):
                problems.append(f"'{k}' must be a positive integer, got {cfg[k]!r}")
        if problems:
            raise Phi3MLXError.many(problems, f"{source}: ")

        n_heads = cfg["num_attention_heads"]
        n_kv = cfg.get("num_key_value_heads") or n_heads
        hidden = cfg["hidden_size"]
        head_dim = cfg.get("head_dim") or hidden // n_heads
        if cfg.get("head_dim") is None and hidden % n_heads:
            problems.append(f"hidden_size {hidden} is not divisible by num_attention_heads {n_heads}")
        if n_heads % n_kv:
            problems.append(f"num_attention_heads {n_heads} is not divisible by num_key_value_heads {n_kv}")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            problems.append(f"hidden_act '{act}' is not supported for phi3 (expected 'silu')")

        partial = float(cfg.get("partial_rotary_factor", 1.0))
        dims = int(head_dim * partial)
        max_pos = int(cfg.get("max_position_embeddings", 4096))
        orig = int(cfg.get("original_max_position_embeddings") or max_pos)
        rope = RopeConfig(theta=float(cfg.get("rope_theta", 10000.0)), dims=dims, original_max_position_embeddings=orig)
        rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        if rs:
            rtype = rs.get("type", rs.get("rope_type"))
            if "rope_theta" in rs:
                rope.theta = float(rs["rope_theta"])
            if rtype in ("longrope", "su"):
                rope.kind = "longrope"
                orig = int(rs.get("original_max_position_embeddings") or orig)
                rope.original_max_position_embeddings = orig
                for name in ("short_factor", "long_factor"):
                    f = rs.get(name)
                    if not isinstance(f, list) or not all(isinstance(x, (int, float)) for x in f):
                        problems.append(f"rope_scaling.{name} must be a list of numbers")
                    elif len(f) != dims // 2:
                        problems.append(f"rope_scaling.{name} has {len(f)} values, expected {dims // 2} (rotary dims / 2)")
                    else:
                        setattr(rope, name, [float(x) for x in f])
                af = rs.get("attention_factor")
                if af is None:
                    factor = rs.get("factor") or (max_pos / orig)
                    af = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
                rope.attention_factor = float(af)
            elif rtype in (None, "default") and not any(k in rs for k in ("short_factor", "long_factor", "factor")):
                pass
            else:
                problems.append(f"unsupported rope_scaling type {rtype!r} (supported: longrope, su)")
        if problems:
            raise Phi3MLXError.many(problems, f"{source}: ")

        sw = cfg.get("sliding_window")
        return cls(
            model_type=mt,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=max_pos,
            sliding_window=int(sw) if sw else None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            hidden_act=act,
            rope=rope,
            quantization=cfg.get("quantization"),
            raw=dict(cfg),
        )

    @classmethod
    def from_path(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(read_config(path), source=str(Path(path) / "config.json"))


def read_config(path: str | Path) -> dict[str, Any]:
    """Read ``path/config.json`` with one-line errors for the usual mistakes."""
    p = Path(path)
    if not p.exists():
        raise Phi3MLXError(f"model path not found: {p}")
    if not p.is_dir():
        raise Phi3MLXError(f"model path is not a folder: {p}")
    f = p / "config.json"
    if not f.exists():
        raise Phi3MLXError(f"no config.json in {p}")
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Phi3MLXError(f"{f}: not valid JSON ({e})") from None
