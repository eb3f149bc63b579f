"""Pretraining from scratch: a config, a tokenizer, data phases, muP, and a loadable model folder.

``run_pretrain(cfg)`` builds what ``PretrainConfig`` describes and trains it with the one trainer
(``trainer.train``) and the plain next-token loss (``losses.sft_loss`` on all-ones masks):

1. every setting is checked, and every problem named at once, before anything slow starts;
2. the tokenizer is loaded (``tokenizer: {path: FOLDER}``) or trained on the run's sources with
   ``tokenizer_train`` and cached by what it was trained on (``tokenizer: {vocab_size: N}``);
3. every source is tokenized once into a memory-mapped cache (``pretrain_data``);
4. the model is built from ``model`` (a config.json mapping: ``phi3`` by default, ``phi3small`` or
   ``phimoe``) and initialised (``mup.init_params``, muP with ``mup: true`` and ``base_width``);
5. the phases run one after the other under one learning-rate schedule (``warmup`` steps of linear
   warmup, then ``cosine`` decay to ``lr * min_lr_ratio``, ``wsd`` (warmup-stable-decay: flat, then a
   linear decay over the last ``decay_fraction`` of the steps) or ``constant``), AdamW with decoupled
   weight decay off for embeddings, norms and biases, gradient clipping and accumulation;
6. each checkpoint (``out/checkpoint``: weights, optimizer state, step, data position and the config
   it belongs to) also publishes ``out`` as a normal model folder: ``config.json``,
   ``model.safetensors`` (Hugging Face names; muP factors folded in), the tokenizer, ``pretrain.yaml``
   (the resolved config), ``metrics.jsonl`` and ``loss.png``.

``resume`` continues from the checkpoint exactly (the data plan is positional, so also across a phase
boundary); a checkpoint made with another config is refused with the settings that differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import yaml
from mlx.utils import tree_flatten

from phi3mlx.config import read_yaml_mapping
from phi3mlx.errors import Phi3MLXError
from phi3mlx.models import build_model, parse_config
from phi3mlx.models.maps import mlx_to_hf
from phi3mlx.tiny import cache_dir
from phi3mlx.tokenizer import copy_tokenizer_files, load_tokenizer
from phi3mlx.weights import save_weights

from . import mup as M
from . import pretrain_data as PD
from .losses import sft_loss
from .tokenizer_train import check_vocab_size, train_tokenizer
from .trainer import CHECKPOINT, METRICS, TrainArgs, read_trainer_state, remove_run_files, train

SCHEDULES = ("cosine", "wsd", "constant")
MODEL_TYPES = ("phi3", "phi3small", "phimoe")
RUN_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "generation_config.json",
             "pretrain.yaml", "loss.png", METRICS, CHECKPOINT, CHECKPOINT + ".tmp", CHECKPOINT + ".old")
# settings that do not change what is trained (a resumed run may change them)
RUN_CONTROL = ("out", "cache_dir", "val_every", "val_batches", "save_every", "report_every", "compile")

# The architecture defaults at small size; a config's ``model`` mapping overrides any key.
MODEL_DEFAULTS = {
    "phi3": {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
        "max_position_embeddings": 2048, "original_max_position_embeddings": 2048, "sliding_window": None,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_dropout": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
    },
    "phi3small": {
        "architectures": ["Phi3SmallForCausalLM"], "model_type": "phi3small", "hidden_size": 256,
        "ff_intermediate_size": 896, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "blocksparse_block_size": 16, "blocksparse_num_local_blocks": 4, "blocksparse_vert_stride": 2,
        "blocksparse_homo_head_pattern": False, "dense_attention_every_n_layers": 2, "gegelu_limit": 20.0,
        "hidden_act": "gegelu", "layer_norm_epsilon": 1e-5, "max_position_embeddings": 2048,
        "mup_attn_multiplier": 1.0, "mup_embedding_multiplier": 10.0, "mup_use_scaling": True,
        "mup_width_multiplier": 2.0, "rope_embedding_base": 10000, "rope_position_scale": 1.0,
        "tie_word_embeddings": True,
    },
    "phimoe": {
        "architectures": ["PhimoeForCausalLM"], "model_type": "phimoe", "hidden_size": 256,
        "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_local_experts": 4, "num_experts_per_tok": 2, "router_jitter_noise": 0.0, "input_jitter_noise": 0.0,
        "attention_bias": True, "lm_head_bias": True, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048, "rope_theta": 10000.0, "rope_scaling": None, "sliding_window": None,
        "tie_word_embeddings": False,
    },
}

DEFAULT_SOURCES = {"general": {"builtin": "general"}, "textbook": {"builtin": "textbook"}}
DEFAULT_PHASES = [
    {"name": "general", "tokens": 500_000, "mix": {"general": 1.0}},
    {"name": "textbook", "tokens": 500_000, "mix": {"general": 0.3, "textbook": 0.7}},
]


@dataclass
class PretrainConfig:
    """Everything a pretraining run is made of (the keys of ``--config`` YAML; flags override them)."""

    out: str = "pretrained"
    model: dict = field(default_factory=dict)  # config.json keys over MODEL_DEFAULTS[model_type]
    tokenizer: dict = field(default_factory=lambda: {"vocab_size": 2048})  # {path} or {vocab_size, sources}
    sources: dict = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_SOURCES)))
    phases: list = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_PHASES)))
    seq_len: int = 128
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    schedule: str = "wsd"
    warmup: int = 50
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: Optional[float] = 1.0
    init_std: float = 0.02
    mup: bool = False
    base_width: Optional[int] = None
    val_every: int = 100
    val_batches: int = 8
    save_every: int = 100
    report_every: int = 10
    seed: int = 0
    cache_dir: Optional[str] = None
    compile: bool = True

    @classmethod
    def from_yaml(cls, path: Optional[Path], overrides: Optional[dict] = None) -> "PretrainConfig":
        """The file's settings with ``overrides`` (the flags given) on top; unknown keys are an error."""
        values = read_yaml_mapping(path) if path is not None else {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise Phi3MLXError(f"{path}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls(**values)

    def resolved(self) -> dict:
        """The settings as a plain mapping (what pretrain.yaml records)."""
        return dataclasses.asdict(self)

    @property
    def model_type(self) -> str:
        return str((self.model or {}).get("model_type", "phi3"))

    def model_dict(self, vocab_size: Optional[int] = None, ids: Optional[dict] = None) -> dict:
        """config.json of the model: the architecture's defaults, the ``model`` keys, the tokenizer's ids."""
        raw = dict(MODEL_DEFAULTS.get(self.model_type, {}))
        raw.update(self.model or {})
        if "num_attention_heads" in (self.model or {}) and "num_key_value_heads" not in self.model:
            raw["num_key_value_heads"] = raw["num_attention_heads"]  # the defaults' grouping may not divide it
        if vocab_size is not None:
            raw.setdefault("vocab_size", vocab_size)
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if ids and k in ids:
                raw.setdefault(k, ids[k])
        raw["torch_dtype"] = "float32"
        return raw


# --- checks ----------------------------------------------------------------------------------------------


def _number_problems(c: PretrainConfig) -> list[str]:
    problems = []
    for k in ("seq_len", "batch_size", "grad_accum", "val_every", "val_batches", "save_every", "report_every"):
        v = getattr(c, k)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            problems.append(f"{k} must be a positive integer, got {v!r}")
    for k in ("lr", "init_std"):
        v = getattr(c, k)
        if not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
            problems.append(f"{k} must be a positive number, got {v!r}")
    if not isinstance(c.warmup, int) or c.warmup < 0:
        problems.append(f"warmup must be a non-negative number of steps, got {c.warmup!r}")
    if c.schedule not in SCHEDULES:
        problems.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {c.schedule!r}")
    if not isinstance(c.decay_fraction, (int, float)) or not 0 < c.decay_fraction <= 1:
        problems.append(f"decay_fraction must be in (0, 1], got {c.decay_fraction!r}")
    if not isinstance(c.min_lr_ratio, (int, float)) or not 0 <= c.min_lr_ratio <= 1:
        problems.append(f"min_lr_ratio must be in [0, 1], got {c.min_lr_ratio!r}")
    if not isinstance(c.weight_decay, (int, float)) or c.weight_decay < 0:
        problems.append(f"weight_decay must be a non-negative number, got {c.weight_decay!r}")
    if c.grad_clip is not None and (not isinstance(c.grad_clip, (int, float)) or not c.grad_clip > 0):
        problems.append(f"grad_clip must be a positive number (or null: no clipping), got {c.grad_clip!r}")
    return problems


def _model_problems(c: PretrainConfig) -> list[str]:
    if not isinstance(c.model, dict):
        return [f"model must be a mapping of config.json keys, got {c.model!r}"]
    if c.model_type not in MODEL_TYPES:
        return [f"model.model_type must be one of {', '.join(MODEL_TYPES)}, got {c.model_type!r}"]
    raw = c.model_dict(vocab_size=c.model.get("vocab_size", 1024))
    problems = []
    width, heads = raw.get("hidden_size"), raw.get("num_attention_heads")
    if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads:
        problems.append(f"model.hidden_size {width} is not divisible by model.num_attention_heads {heads}")
    positions = raw.get("max_position_embeddings")
    if isinstance(positions, int) and isinstance(c.seq_len, int) and c.seq_len > positions:
        problems.append(f"seq_len {c.seq_len} is longer than the model's {positions} positions "
                        "(model.max_position_embeddings)")
    if not problems:
        try:
            parse_config(raw, "the model config")
        except Phi3MLXError as e:
            problems.append(str(e))
    return problems


def _tokenizer_problems(c: PretrainConfig) -> list[str]:
    t = c.tokenizer
    if isinstance(t, str):
        t = c.tokenizer = {"path": t}
    if not isinstance(t, dict):
        return [f"tokenizer must be a mapping ({{path: FOLDER}} or {{vocab_size: N}}), got {t!r}"]
    unknown = sorted(set(t) - {"path", "vocab_size", "sources"})
    problems = [f"tokenizer: unknown keys {', '.join(unknown)} (known: path, vocab_size, sources)"] if unknown else []
    if "path" in t:
        if not (Path(t["path"]).expanduser() / "tokenizer_config.json").exists() and \
                not (Path(t["path"]).expanduser() / "tokenizer.json").exists():
            problems.append(f"tokenizer.path {t['path']} holds no tokenizer (tokenizer.json)")
    else:
        try:
            check_vocab_size(int(t.get("vocab_size", 2048)))
        except (Phi3MLXError, TypeError, ValueError) as e:
            problems.append(f"tokenizer.vocab_size: {e}")
        for s in t.get("sources") or []:
            if s not in (c.sources or {}):
                problems.append(f"tokenizer.sources names {s!r}, which is not a source")
    return problems


def parse_sources_phases(c: PretrainConfig, problems: list[str]) -> tuple[dict, list]:
    sources = {}
    if not isinstance(c.sources, dict) or not c.sources:
        problems.append("sources must be a mapping of names to {paths: [...]} or {builtin: NAME}")
    else:
        for name, raw in c.sources.items():
            s = PD.Source.parse(str(name), raw, problems)
            if s is not None:
                sources[str(name)] = s
    phases = []
    if not isinstance(c.phases, list):
        problems.append("phases must be a list of {name, tokens, mix}")
    else:
        for i, raw in enumerate(c.phases):
            if not isinstance(raw, dict):
                problems.append(f"phase {i + 1} must be a mapping with name, tokens and mix")
                continue
            unknown = sorted(set(raw) - {"name", "tokens", "mix"})
            if unknown:
                problems.append(f"phase {i + 1}: unknown keys {', '.join(unknown)} (known: name, tokens, mix)")
            tokens = raw.get("tokens")
            if isinstance(tokens, float) and tokens.is_integer():
                tokens = int(tokens)
            phases.append(PD.Phase(str(raw.get("name", f"phase{i + 1}")), tokens, raw.get("mix")))
        problems += PD.phase_problems(phases, c.sources if isinstance(c.sources, dict) else {})
    return sources, phases


def check_config(c: PretrainConfig) -> tuple[dict, list]:
    """Every problem of the settings at once (one Phi3MLXError); the parsed sources and phases."""
    problems = _number_problems(c) + _model_problems(c) + _tokenizer_problems(c)
    sources, phases = parse_sources_phases(c, problems)
    if c.mup:
        raw = c.model_dict(vocab_size=1024) if isinstance(c.model, dict) else {}
        if c.model_type == "phi3small":
            problems.append("mup: phi3small trains with the muP multipliers of its config (mup_width_multiplier, "
                            "mup_embedding_multiplier, mup_attn_multiplier); leave --mup off")
        if not isinstance(c.base_width, int) or c.base_width <= 0:
            problems.append(f"--base-width must be a positive width with --mup, got {c.base_width!r}")
        if raw.get("tie_word_embeddings"):
            problems.append("mup needs an untied output layer (model.tie_word_embeddings: false)")
    if problems:
        raise Phi3MLXError.many(problems)
    return sources, phases


def _flat(d, prefix="") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list):
        return {prefix[:-1]: json.dumps(d, sort_keys=True)}
    return {prefix[:-1]: d}


def fingerprint(c: PretrainConfig) -> dict:
    """The settings a resumed run must share with its checkpoint."""
    return {k: v for k, v in c.resolved().items() if k not in RUN_CONTROL}


def config_differences(saved: dict, now: dict) -> list[str]:
    a, b = _flat(saved), _flat(now)
    return [f"{k}: {a.get(k, '(unset)')!r} in the checkpoint, {b.get(k, '(unset)')!r} now"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_output(c: PretrainConfig, resume: bool, force: bool) -> None:
    out = Path(c.out)
    if out.exists() and not out.is_dir():
        raise Phi3MLXError(f"--out {out} exists and is not a folder")
    if resume and force:
        raise Phi3MLXError("--resume and --force exclude each other (--resume continues the run in --out, --force "
                           "starts it again)")
    if resume:
        state = read_trainer_state(out)
        if state is None:
            raise Phi3MLXError(f"nothing to resume in {out}: no {CHECKPOINT}/trainer_state.json")
        diff = config_differences(state.get("meta", {}).get("config", {}), fingerprint(c))
        if diff:
            raise Phi3MLXError.many(diff, prefix=f"the checkpoint in {out} was made with another config: ")
        return
    earlier = [n for n in RUN_FILES if (out / n).exists()]
    if earlier and not force:
        raise Phi3MLXError(f"--out {out} already holds {', '.join(earlier)} from an earlier run; pass --force to "
                           "replace it or --resume to continue it")


# --- the run ---------------------------------------------------------------------------------------------


def make_schedule(c: PretrainConfig, total: int) -> Callable:
    """The learning rate at an optimizer step (0-based), over the whole run."""
    peak, floor, warmup = float(c.lr), float(c.lr) * float(c.min_lr_ratio), min(int(c.warmup), total)
    decay_steps = max(1, round(total * float(c.decay_fraction)))

    def schedule(step):
        s = mx.array(step, dtype=mx.float32) if not isinstance(step, mx.array) else step.astype(mx.float32)
        warm = mx.minimum((s + 1) / warmup, 1.0) if warmup > 0 else mx.array(1.0)
        if c.schedule == "cosine":
            t = mx.clip((s - warmup) / max(1, total - warmup), 0.0, 1.0)
            lr = floor + (peak - floor) * 0.5 * (1 + mx.cos(math.pi * t))
        elif c.schedule == "wsd":
            t = mx.clip((s - (total - decay_steps)) / decay_steps, 0.0, 1.0)
            lr = peak - (peak - floor) * t
        else:
            lr = mx.array(peak)
        return lr * warm

    return schedule


def plot_losses(history: list, path: Path, phases: Optional[list] = None) -> None:
    """loss.png: training loss and each validation set's loss against the step; ``phases`` ([(name,
    steps)]) marks where each phase starts."""
    import matplotlib  # imported here: a second to import, needed only when a curve is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    train_pts = [(r["step"], r["loss"]) for r in history if "loss" in r]
    if train_pts:
        ax.plot(*zip(*train_pts), label="train", lw=1.2)
    names = sorted({k for r in history for k in r if k.startswith("val_") and k.endswith("_loss") and k != "val_loss"})
    for k in names:
        pts = [(r["step"], r[k]) for r in history if k in r]
        ax.plot(*zip(*pts), marker="o", ms=3, lw=1, label=k[4:-5] + " (val)")
    start = 0
    for name, steps in phases or []:
        if start:
            ax.axvline(start, color="grey", ls=":", lw=1)
        ax.annotate(name, (start, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8, color="grey")
        start += steps
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


class PretrainStore:
    """What a pretraining checkpoint holds (the training arrays) and publishes (a loadable model folder)."""

    WEIGHTS = "weights.safetensors"

    def __init__(self, raw: dict, train_cfg, tokenizer_dir: Path, mup: Optional[M.Mup], settings: dict):
        self.raw, self.train_cfg, self.tokenizer_dir = raw, train_cfg, Path(tokenizer_dir)
        self.mup, self.settings = mup, settings

    def save(self, folder: Path, model) -> None:
        mx.save_safetensors(str(Path(folder) / self.WEIGHTS), dict(tree_flatten(model.parameters())))

    def restore(self, folder: Path, model) -> None:
        model.load_weights(str(Path(folder) / self.WEIGHTS))

    def publish(self, out_dir: Path, model) -> None:
        """The model folder in ``out_dir``: every file written beside it first, then renamed into place."""
        params = dict(tree_flatten(model.parameters()))
        if self.mup is not None:
            params = M.fold_mup(params, self.train_cfg, self.mup)
        params = mlx_to_hf(self.raw["model_type"], params)
        mx.eval(list(params.values()))
        stage = Path(out_dir) / ".publish.tmp"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        try:
            save_weights(stage, params, fmt="pt")
            (stage / "config.json").write_text(json.dumps(self.raw, indent=2))
            eos = [self.raw[k] for k in ("eos_token_id",) if k in self.raw]
            end = self.settings.get("end_token_id")
            (stage / "generation_config.json").write_text(json.dumps(
                {"bos_token_id": self.raw.get("bos_token_id"), "eos_token_id": eos + ([end] if end is not None else [])}))
            (stage / "pretrain.yaml").write_text(yaml.safe_dump(self.settings["config"], sort_keys=False))
            copy_tokenizer_files(self.tokenizer_dir, stage)
            history = []
            metrics = Path(out_dir) / METRICS
            if metrics.exists():
                history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            if history:
                plot_losses(history, stage / "loss.png", self.settings.get("phases"))
            for f in sorted(stage.iterdir()):
                os.replace(f, Path(out_dir) / f.name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


@dataclass
class Prepared:
    """A run ready to train: the model, data and everything ``train`` takes."""

    config: PretrainConfig
    model: object
    tokenizer: object
    batches: PD.PretrainBatches
    val: dict
    args: TrainArgs
    optimizer: object
    store: PretrainStore
    phases: list
    steps: list
    windows: dict
    mup: Optional[M.Mup]


def _tokenizer(c: PretrainConfig, sources: dict, cache: Path, say: Callable) -> tuple[Path, object, dict]:
    """The tokenizer folder, the tokenizer and its ids: the given folder, or one trained on the sources (cached)."""
    t = c.tokenizer
    if "path" in t:
        folder = Path(t["path"]).expanduser()
        tok = load_tokenizer(folder)
        ids = {"vocab_size": tok.vocab_size, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
               "pad_token_id": tok.eos_token_id, "end_token_id": tok.convert_tokens_to_ids("<|end|>")}
        return folder, tok, ids
    names = list(t.get("sources") or sources)
    vocab = int(t.get("vocab_size", 2048))
    spec = {"vocab_size": vocab, "sources": {n: sources[n].spec() for n in names}, "version": 1}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache / "tokenizers" / key
    if not (folder / "ids.json").exists():
        say(f"training a {vocab}-token BPE tokenizer on {', '.join(names)}")
        texts = (d for n in names for d in sources[n].documents(PD.ContentOnly()))
        ids = train_tokenizer(texts, folder, vocab, force=True)
        (folder / "ids.json").write_text(json.dumps(ids))
    return folder, load_tokenizer(folder), json.loads((folder / "ids.json").read_text())


def init_model(raw: dict, base_width: Optional[int] = None, init_std: float = 0.02, seed: int = 0):
    """A freshly initialised model for a config.json mapping: (model, Mup or None). With ``base_width`` the
    model trains under muP (its config scales attention by 1/head_dim and divides the logits)."""
    cfg = parse_config(raw, "the model config")
    mup = M.Mup(int(base_width), cfg.hidden_size) if base_width else None
    model = build_model(M.mup_config(cfg, mup) if mup else cfg)
    M.init_params(model, init_std, mup, seed=seed)
    return model, mup


def train_args(c: PretrainConfig, steps: list[int]) -> TrainArgs:
    """The trainer's settings for a run of ``steps[i]`` optimizer steps in phase i (validated at each
    phase's end too)."""
    total = sum(steps)
    ends = tuple(itertools.accumulate(steps))
    return TrainArgs(iters=total, val_at=ends, batch_size=c.batch_size, grad_accum=c.grad_accum, learning_rate=c.lr,
                     warmup=min(c.warmup, total), weight_decay=c.weight_decay, val_every=c.val_every,
                     val_batches=c.val_batches, save_every=c.save_every, report_every=c.report_every,
                     grad_clip=c.grad_clip, seed=c.seed, compile=c.compile)


def make_pretrain_optimizer(c: PretrainConfig, total: int, mup: Optional[M.Mup]):
    """AdamW in muP/decay groups (``mup.make_optimizer``) under the run's learning-rate schedule."""
    return M.make_optimizer(make_schedule(c, total), c.weight_decay, mup)


def prepare(c: PretrainConfig, resume: bool = False, force: bool = False, say: Callable = lambda m: None,
            progress: Optional[Callable[[str, int], None]] = None) -> Prepared:
    """Check everything, then build the tokenizer, the token caches, the model and the batches."""
    sources, phases = check_config(c)
    check_output(c, resume, force)
    cache = Path(c.cache_dir).expanduser() if c.cache_dir else cache_dir() / "pretrain"
    used = [n for n in sources if any(p.mix.get(n, 0) > 0 for p in phases)]
    problems = PD.empty_sources([sources[n] for n in used])
    if problems:
        raise Phi3MLXError.many(problems)
    group = mx.distributed.init()
    # several processes (mlx.launch): the first trains the tokenizer and fills the token caches, the others
    # wait for it and then read them
    if group.rank() != 0:
        mx.eval(mx.distributed.all_sum(mx.array(0.0), group=group))
    tok_dir, tokenizer, ids = _tokenizer(c, sources, cache, say)
    tok_key = PD.tokenizer_key(tok_dir)
    streams = {n: PD.tokenize_source(sources[n], tokenizer, tok_key, int(ids["eos_token_id"]), cache, progress)
               for n in used}
    if group.rank() == 0 and group.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(0.0), group=group))
    windows = {}
    for n in used:
        stream = streams[n]
        w = PD.Windows(stream, c.seq_len)
        if stream.docs == 0 or len(stream.tokens) <= stream.docs:
            problems.append(f"source {n!r} is empty: it holds no text")
        elif w.n_train < 1:
            problems.append(f"source {n!r} has {len(stream.tokens)} tokens, too few for one training window of "
                            f"seq_len + 1 = {c.seq_len + 1} tokens besides its validation part; add text or "
                            "lower seq_len")
        windows[n] = w
    raw = c.model_dict(vocab_size=int(ids["vocab_size"]), ids=ids)
    if int(raw["vocab_size"]) < int(ids["vocab_size"]):
        problems.append(f"model.vocab_size {raw['vocab_size']} is smaller than the tokenizer's {ids['vocab_size']}")
    if problems:
        raise Phi3MLXError.many(problems)

    model, mup = init_model(raw, c.base_width if c.mup else None, c.init_std, c.seed)
    train_cfg = model.config
    tokens_per_step = c.seq_len * c.batch_size * c.grad_accum
    steps = PD.phase_steps(phases, tokens_per_step)
    total = sum(steps)
    batches = PD.PretrainBatches(windows, phases, steps, c.batch_size, c.grad_accum, seed=c.seed)
    val = {p.name: PD.validation_batches(windows, p, c.batch_size, c.val_batches) for p in phases}
    args = train_args(c, steps)
    optimizer = make_pretrain_optimizer(c, total, mup)
    settings = {"config": c.resolved(), "end_token_id": ids.get("end_token_id"),
                "phases": [(p.name, n) for p, n in zip(phases, steps)]}
    store = PretrainStore(raw, train_cfg, tok_dir, mup, settings)
    return Prepared(c, model, tokenizer, batches, val, args, optimizer, store, phases, steps, windows, mup)


def run(p: Prepared, resume: bool = False, report: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Train a prepared run; the model folder is published in ``p.config.out`` at every checkpoint."""
    def annotate(step: int) -> dict:
        return {"phase": p.phases[p.batches.phase_at(step)].name}

    out = Path(p.config.out)
    if not resume and mx.distributed.init().rank() == 0:
        remove_run_files(out, RUN_FILES)
    return train(p.model, sft_loss, p.batches, p.args, out, {}, val_batches=p.val, resume=resume, report=report,
                 optimizer=p.optimizer, store=p.store, annotate=annotate,
                 meta={"config": fingerprint(p.config)})
