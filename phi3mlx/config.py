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
from typing import Any, ClassVar, Mapping, Optional

import yaml

from .errors import Phi3MLXError

_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass
class RopeConfig:
    """Rotary embedding settings.

    kind "default": plain RoPE with ``theta``.
    kind "longrope": inverse frequencies divided by ``short_factor`` while the sequence length
    (largest position + 1) is at most ``original_max_position_embeddings``, by ``long_factor``
    beyond it; cos/sin multiplied by ``attention_factor`` (by ``long_attention_factor`` in the long
    regime when that is set: Phi-3-small's and PhiMoE's separate short/long mscales).
    ``switch_factors`` False keeps the short factors at every length (transformers' PhiMoE, where only
    the multiplier switches). ``position_scale`` multiplies the positions (Phi-3-small's
    ``rope_position_scale``).
    """

    theta: float = 10000.0
    dims: int = 96
    kind: str = "default"
    short_factor: Optional[list] = None
    long_factor: Optional[list] = None
    original_max_position_embeddings: int = 4096
    attention_factor: float = 1.0
    long_attention_factor: Optional[float] = None
    switch_factors: bool = True
    position_scale: float = 1.0

    def factor_for(self, long: bool) -> float:
        if long and self.long_attention_factor is not None:
            return self.long_attention_factor
        return self.attention_factor

    def uses_long(self, seq_len: int) -> bool:
        return self.kind == "longrope" and seq_len > self.original_max_position_embeddings


class Section:
    """A variant's own config fields: a dataclass per model_type (see phi3mlx/models/__init__.py).

    ``normalize(cfg)`` renames the variant's keys to the common ones before the common fields are
    read; ``parse(cfg, fields, problems)`` reads the variant's fields from ``cfg``, may set common
    fields in ``fields`` (the ModelConfig keyword arguments: norm, muP scalings, rope mscales) and
    appends every problem it finds to ``problems``.
    """

    act: ClassVar[str] = "silu"  # the hidden_act the variant implements

    @staticmethod
    def normalize(cfg: dict) -> dict:
        return cfg

    @classmethod
    def parse(cls, cfg: dict, fields: dict, problems: list) -> "Section":
        return cls()


@dataclass
class Phi3Section(Section):
    """phi3 (mini, medium, 3.5-mini): no fields beyond the common ones."""


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
    norm: str = "rms"  # "rms" | "layer"
    # muP (Phi-3-small, and models pretrained with muP): h = embed * multiplier; attention scores
    # times attn_scale (None: head_dim ** -0.5); logits / logit_divisor.
    embedding_multiplier: float = 1.0
    attn_scale: Optional[float] = None
    logit_divisor: float = 1.0
    section: Section = field(default_factory=Phi3Section)  # the variant's own typed fields
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    @property
    def attention_scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    @classmethod
    def from_dict(cls, cfg: dict, sections: Mapping[str, type], source: str = "config.json") -> "ModelConfig":
        """Parse a config.json dict; ``sections`` maps each supported model_type to its Section class."""
        if not isinstance(cfg, dict):
            raise Phi3MLXError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        try:
            return cls._from_dict(cfg, sections, source)
        except (TypeError, ValueError, AttributeError, KeyError, ZeroDivisionError, OverflowError) as e:
            # A value of a type the checks below did not foresee: still one line, naming the file.
            raise Phi3MLXError(f"{source}: invalid value in config ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_dict(cls, cfg: dict, sections: Mapping[str, type], source: str) -> "ModelConfig":
        problems = []
        raw = cfg
        mt = cfg.get("model_type")
        supported = ", ".join(sections)
        if mt is None:
            raise Phi3MLXError(f"{source}: no 'model_type' key (supported: {supported})")
        if mt not in sections:
            raise Phi3MLXError(f"{source}: unsupported model_type '{mt}' (supported: {supported})")
        section_cls = sections[mt]
        cfg = section_cls.normalize(dict(cfg))
        missing = [k for k in _REQUIRED if k not in cfg]
        if missing:
            problems.append("missing key(s) " + ", ".join(repr(k) for k in missing))
        for k in _REQUIRED:
            if k in cfg and (not isinstance(cfg[k], int) or isinstance(cfg[k], bool) or cfg[k] <= 0):
                problems.append(f"'{k}' must be a positive integer, got {cfg[k]!r}")
        if problems:
            raise Phi3MLXError.many(problems, f"{source}: ")

        n_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        n_kv = opt_number(cfg, "num_key_value_heads", n_heads, problems, integer=True)
        head_dim = opt_number(cfg, "head_dim", hidden // n_heads, problems, integer=True)
        if cfg.get("head_dim") is None and hidden % n_heads:
            problems.append(f"hidden_size {hidden} is not divisible by num_attention_heads {n_heads}")
        if n_heads % n_kv:
            problems.append(f"num_attention_heads {n_heads} is not divisible by num_key_value_heads {n_kv}")
        act = cfg.get("hidden_act", section_cls.act)
        if act != section_cls.act:
            problems.append(f"hidden_act {act!r} is not supported for {mt} (expected {section_cls.act!r})")
        partial = opt_number(cfg, "partial_rotary_factor", 1.0, problems)
        if partial > 1.0:
            problems.append(f"'partial_rotary_factor' must be at most 1, got {partial}")
        dims = int(head_dim * partial)
        max_pos = opt_number(cfg, "max_position_embeddings", 4096, problems, integer=True)
        orig = opt_number(cfg, "original_max_position_embeddings", max_pos, problems, integer=True)
        rms_eps = opt_number(cfg, "rms_norm_eps", 1e-5, problems)
        sw = opt_number(cfg, "sliding_window", 0, problems, integer=True, positive=False)
        theta = opt_number(cfg, "rope_theta", 10000.0, problems)
        quant = cfg.get("quantization")
        if quant is not None:
            if not isinstance(quant, dict):
                problems.append(f"'quantization' must be an object, got {quant!r}")
                quant = None
            else:
                for k in ("bits", "group_size"):
                    if k in quant:
                        opt_number(quant, k, 0, problems, integer=True, where="quantization.")
        rope = RopeConfig(theta=theta, dims=dims, original_max_position_embeddings=orig)
        rs_key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
        rs = cfg.get(rs_key)
        if rs and not isinstance(rs, dict):
            problems.append(f"'{rs_key}' must be an object or null, got {rs!r}")
            rs = None
        if rs:
            rtype = rs.get("type", rs.get("rope_type"))
            if "rope_theta" in rs:
                rope.theta = opt_number(rs, "rope_theta", rope.theta, problems, where=f"{rs_key}.")
            if rtype in ("longrope", "su"):
                rope.kind = "longrope"
                orig = opt_number(rs, "original_max_position_embeddings", orig, problems, integer=True,
                                   where=f"{rs_key}.")
                rope.original_max_position_embeddings = orig
                for name in ("short_factor", "long_factor"):
                    f = rs.get(name)
                    if not isinstance(f, list) or not all(isinstance(x, (int, float)) for x in f):
                        problems.append(f"{rs_key}.{name} must be a list of numbers")
                    elif len(f) != dims // 2:
                        problems.append(f"{rs_key}.{name} has {len(f)} values, expected {dims // 2} (rotary dims / 2)")
                    else:
                        setattr(rope, name, [float(x) for x in f])
                af = opt_number(rs, "attention_factor", None, problems, where=f"{rs_key}.")
                if af is None:
                    factor = opt_number(rs, "factor", max_pos / orig, problems, where=f"{rs_key}.")
                    af = 1.0 if factor <= 1.0 or orig <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
                rope.attention_factor = float(af)
            elif rtype in (None, "default") and not any(k in rs for k in ("short_factor", "long_factor", "factor")):
                pass
            else:
                problems.append(f"unsupported {rs_key} type {rtype!r} (supported: longrope, su)")

        fields = dict(
            model_type=mt,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=rms_eps,
            max_position_embeddings=max_pos,
            sliding_window=sw or None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            hidden_act=act,
            rope=rope,
            quantization=quant,
            raw=dict(raw),
        )
        fields["section"] = section_cls.parse(cfg, fields, problems)
        if problems:
            raise Phi3MLXError.many(problems, f"{source}: ")
        return cls(**fields)


def opt_number(cfg: dict, key: str, default, problems: list, integer: bool = False,
                positive: Optional[bool] = True, where: str = ""):
    """``cfg[key]`` as an int/float, ``default`` when absent or null; a wrong value adds a problem.

    ``positive``: True needs > 0, False needs >= 0, None takes any finite number."""
    v = cfg.get(key)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok and integer and not (isinstance(v, int) or float(v).is_integer()):
        ok = False
    if ok and positive is not None and (v <= 0 if positive else v < 0):
        ok = False
    if not ok:
        sign = "" if positive is None else "positive " if positive else "non-negative "
        what = sign + ("integer" if integer else "number")
        problems.append(f"'{where}{key}' must be a {what}, got {v!r}")
        return default
    return int(v) if integer else float(v)


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
    return read_json_object(f)


def read_json_object(f: Path) -> dict[str, Any]:
    """A JSON file holding an object; one-line errors naming the file."""
    try:
        value = json.loads(Path(f).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Phi3MLXError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise Phi3MLXError(f"{f}: expected a JSON object, got {type(value).__name__}")
    return value


def read_yaml_mapping(path: str | Path, what: str = "settings") -> dict[str, Any]:
    """A YAML file holding a mapping (a run's settings), keys with ``-`` read as ``_``; one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise Phi3MLXError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise Phi3MLXError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise Phi3MLXError(f"{path} is not UTF-8 text") from None
    if not isinstance(values, dict):
        raise Phi3MLXError(f"{path} must hold a mapping of {what}")
    return {str(k).replace("-", "_"): v for k, v in values.items()}

