"""The Phi-3 decoder, built from a ModelConfig and its variant's parts (see ``phi3mlx.models``).

Parameter names equal the Hugging Face checkpoint's (and mlx-lm's for the same model_type):
``model.embed_tokens``, ``model.layers.N.self_attn.qkv_proj``, ``...o_proj``,
``model.layers.N.mlp.gate_up_proj``, ``...down_proj``, ``input_layernorm``,
``post_attention_layernorm``, ``model.norm``, ``lm_head``.

Shapes: B batch, L new tokens, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..cache import ModelCache, SlotBatch, SlotStore, config_identity, make_cache
from ..config import ModelConfig
from .attention import Attention, FusedQKV, Pass, SlotPass


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up as one fused kernel (about 5% of a prefill saved on the CPU)."""
    return nn.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU with a fused gate_up projection: [gate | up] along the output axis."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, x):
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(swiglu(gate, up))


def _no_mask_maker(cfg: ModelConfig, layer_idx: int):
    return None


def _no_head_bias(cfg: ModelConfig) -> bool:
    return False


def _logits_as_is(cfg: ModelConfig, logits: mx.array) -> mx.array:
    return logits


@dataclass(frozen=True)
class Parts:
    """What a variant plugs into the decoder. Every field has the plain Phi-3 part as default."""

    projection: type = FusedQKV  # attention projection (see models/attention.py)
    mask_maker: Callable = _no_mask_maker  # (cfg, layer_idx) -> None (shared causal/window mask) or attend fn
    mlp: type = MLP  # built as mlp(cfg, layer_idx), called as mlp(x)
    mlp_attr: str = "mlp"  # the decoder-layer attribute (weight-name part) holding the MLP
    head_bias: Callable = _no_head_bias  # (cfg) -> whether lm_head has a bias
    logits: Callable = _logits_as_is  # (cfg, logits) -> logits: what the variant does to the output
    vision: Optional[Callable] = None  # (cfg) -> the image embedding module ``model.vision_embed_tokens``


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "layer":
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
    return nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, parts: Parts, layer_idx: int = 0):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, parts.projection, parts.mask_maker(cfg, layer_idx))
        self.mlp_attr = parts.mlp_attr
        setattr(self, self.mlp_attr, parts.mlp(cfg, layer_idx))
        self.input_layernorm = make_norm(cfg)
        self.post_attention_layernorm = make_norm(cfg)

    def __call__(self, x, p: Pass, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), p, cache)
        return h + getattr(self, self.mlp_attr)(self.post_attention_layernorm(h))


class Phi3Model(nn.Module):
    def __init__(self, cfg: ModelConfig, parts: Parts):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, parts, i) for i in range(cfg.num_hidden_layers)]
        self.norm = make_norm(cfg)
        if parts.vision is not None:
            self.vision_embed_tokens = parts.vision(cfg)


def _checkpointed(layer: nn.Module, h: mx.array, *args) -> mx.array:
    """``layer(h, *args)`` under mx.checkpoint; only arrays cross it (masks, caches, flags are closed over)."""

    def inner(params, h):
        layer.update(params)
        return layer(h, *args)

    return mx.checkpoint(inner)(layer.trainable_parameters(), h)


class Model(nn.Module):
    """Phi-3 causal LM. ``model(ids)`` with ids (B, L) returns logits (B, L, V).

    ``checkpoint_layers``: recompute each layer's activations in the backward pass (gradient
    checkpointing: less memory, more compute), only in training mode.
    """

    def __init__(self, cfg: ModelConfig, parts: Parts = Parts()):
        super().__init__()
        self.config = cfg
        self.parts = parts
        self.model_type = cfg.model_type
        self.checkpoint_layers = False
        self.model = Phi3Model(cfg, parts)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=parts.head_bias(cfg))

    @property
    def layers(self):
        return self.model.layers

    def __call__(
        self,
        inputs: mx.array,
        cache: Optional[ModelCache] = None,
        *,
        long_rope: Optional[bool] = None,
        last_only: bool = False,
        image_rows: Optional[mx.array] = None,
    ) -> mx.array:
        """Run the decoder over ``inputs`` (B, L), continuing ``cache`` if given.

        long_rope: which LongRoPE factor set to use; None takes the set a full forward pass over the
        whole sequence so far would use (long once offset + L > original_max_position_embeddings).
        A cache whose prefix was encoded with the other set is re-encoded first, so every pass is exact.
        last_only: return logits for the last position only, shape (B, 1, V).
        image_rows: (n, hidden) embeddings for the n negative ids of ``inputs`` (image positions of the
        vision models, row-major over the batch; see ``encode_images``), in place of the lookup.
        """
        cfg = self.config
        B, L = inputs.shape
        if cache is None:
            p = Pass(0, L, cfg.rope.uses_long(L) if long_rope is None else long_rope, 0, cfg.sliding_window)
        else:
            p = self._pass(cache, inputs, long_rope, image_rows)
        h = self.embed(inputs, image_rows)  # (B, L, hidden)
        for i, layer in enumerate(self.model.layers):
            if self.checkpoint_layers and cache is None:
                h = _checkpointed(layer, h, p)
            else:
                h = layer(h, p, cache[i] if cache is not None else None)
        if last_only:
            h = h[:, -1:]
        return self._head(h)

    def _pass(self, cache: ModelCache, inputs: mx.array, long_rope: Optional[bool], image_rows=None) -> Pass:
        """The Pass of ``inputs`` (B, L) continuing ``cache``, which records them (a prefix encoded with
        the other LongRoPE set is re-encoded first)."""
        cfg = self.config
        L = inputs.shape[1]
        offset = cache.offset
        if long_rope is None:
            long_rope = cfg.rope.uses_long(offset + L)
        if offset and cache.long_rope is not None and cache.long_rope != long_rope and cfg.rope.kind == "longrope":
            cache.reencode(self, long_rope)
        cache.long_rope = long_rope
        cache.record(inputs, image_rows)
        return Pass(offset, L, long_rope, cache[0].key_start(L), cfg.sliding_window)

    def _head(self, h: mx.array) -> mx.array:
        cfg = self.config
        h = self.model.norm(h)
        if cfg.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(h)
        else:
            logits = self.lm_head(h)
        if cfg.logit_divisor != 1.0:  # muP
            logits = logits.astype(mx.float32) / cfg.logit_divisor
        return self.parts.logits(cfg, logits)

    def decode_batch(self, tokens: mx.array, caches: list) -> mx.array:
        """One decoding step of B independent sequences: ``tokens`` (B,) the next token of each, ``caches``
        their B ModelCaches (any lengths). Projections, MLPs and the head run as one batched pass;
        attention runs per sequence over its own cache, at its own positions, so each row equals what
        ``model(tokens[i:i+1, None], cache=caches[i])`` gives. Returns logits (B, V)."""
        rows = tokens.reshape(-1, 1)  # (B, 1)
        passes = [self._pass(c, rows[i : i + 1], None) for i, c in enumerate(caches)]
        h = self.embed(rows)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, passes, [c[i] for c in caches])
        return self._head(h)[:, -1, :]

    @property
    def slot_ready(self) -> bool:
        """Whether every layer attends densely (the SlotBatch decoding path; not Phi-3-small's blocksparse)."""
        return all(layer.self_attn.mask_maker is None for layer in self.model.layers)

    def decode_slots(self, tokens: mx.array, batch, long_rope: bool, compiled: bool = False) -> mx.array:
        """One decoding step of every row of ``batch`` (a ``SlotBatch``): ``tokens`` (B,) at the rows'
        positions, with the LongRoPE set ``long_rope``; logits (B, V). Each row's result equals its own
        decoding over its own cache, up to float rounding of the masked reduction. ``compiled``: run the
        step as one compiled graph (``mx.compile``; traced once per batch shape, capacity and LongRoPE
        set, then reused)."""
        batch.prepare()
        if compiled:
            step = self._compiled_slot_step(long_rope, (batch.rows, batch.capacity))
        else:
            step = partial(self.slot_step, long_rope=long_rope)
        logits, batch.keys, batch.values = step(tokens, batch.positions(), batch.keys, batch.values)
        batch.advance()
        return logits

    def slot_step(self, tokens: mx.array, positions: mx.array, keys: list, values: list, long_rope: bool):
        """The pure step behind ``decode_slots``: ``tokens`` (B,) at ``positions`` (B,) int32, over
        buffers ``keys``/``values`` (one (B, K, C, D) per layer) -> (logits (B, V), the updated keys,
        values). Row b attends to its positions 0 .. positions[b] (within the sliding window).
        Compiled, a trace is reused for every call with the same shapes and ``long_rope``: what Python
        decides while tracing (the config, ``training``, adapter settings) is fixed into it, so change
        none of that on a model being served (the weights themselves are read at every call)."""
        h, keys, values = self._slot_pass(tokens.reshape(-1, 1), positions, keys, values, long_rope)
        return self._head(h)[:, -1, :], keys, values

    def _slot_pass(self, tokens: mx.array, positions: mx.array, keys: list, values: list, long_rope: bool,
                   span: Optional[int] = None):
        """The layers over SlotBatch buffers: ``tokens`` (B, L), row b's at positions positions[b] ..
        positions[b] + L - 1, each attending to its row's positions up to its own (within the window),
        among the first ``span`` (default: all) -> (hidden (B, L, hidden), the updated keys, values)."""
        L = tokens.shape[1]
        C = span or keys[0].shape[2]
        ar = mx.arange(C)
        at = positions[:, None] if L == 1 else positions[:, None] + mx.arange(L, dtype=positions.dtype)  # (B, L)
        mask = ar[None, None, :] <= at[:, :, None]  # (B, L, C)
        w = self.config.sliding_window
        if w is not None and w < self.config.context_length:
            mask = mask & (at[:, :, None] - ar[None, None, :] < w)
        p = SlotPass(positions, long_rope, mask[:, None])  # mask (B, 1, L, C)
        store = SlotStore(keys, values, positions, span)
        h = self.embed(tokens)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, p, store.layer(i))
        return h, store.keys, store.values

    def prefill_slots(self, tokens: mx.array, counts: Sequence[int], batch, long_rope: bool) -> mx.array:
        """Several prompts in one pass, each continuing its row of ``batch`` (a ``SlotBatch``): ``tokens``
        (B, L) right-padded, row b's first ``counts[b]`` real. Each row's length then grows by its count
        (the padding's keys lie beyond it, masked until overwritten). Returns the logits (B, V) of each
        row's last real token; each equals its prompt's own pass over its own cache, up to float rounding
        of the masked reduction."""
        B, L = tokens.shape
        if len(counts) != B or not all(1 <= c <= L for c in counts):
            raise ValueError(f"counts {list(counts)} do not fit tokens of shape {tokens.shape}")
        batch.prepare(L)
        h, batch.keys, batch.values = self._slot_pass(tokens, batch.positions(), batch.keys, batch.values, long_rope,
                                                      span=max(batch.lengths) + L)  # only what rows hold
        last = mx.array([c - 1 for c in counts]).reshape(B, 1, 1)
        h = mx.take_along_axis(h, last, axis=1)  # (B, 1, hidden): each row's last real token
        batch.advance(counts)
        return self._head(h)[:, 0, :]

    def slot_batch(self) -> SlotBatch:
        """An empty SlotBatch for this model's caches (keys and values in the activations' dtype, which the
        embedding gives: a float32 norm beside half-precision weights must not widen the batch)."""
        cfg = self.config
        dtype = self.embed(mx.zeros((1, 1), mx.int32)).dtype  # read from the graph: nothing is computed
        return SlotBatch(len(self.model.layers), kv=(cfg.num_key_value_heads, cfg.head_dim, dtype))

    max_slot_traces = 64  # shapes a compiled step keeps traced; past that it starts afresh

    def _compiled_slot_step(self, long_rope: bool, shape: tuple):
        """The compiled step for ``long_rope``, about to run at ``shape`` (rows, capacity). Each shape is a
        trace MLX keeps (about 0.1 MB per layer): once ``max_slot_traces`` shapes have been traced, the
        compiled function is replaced by a fresh one, whose traces reuse the memory the old ones freed."""
        steps = self.__dict__.setdefault("_slot_steps", {})  # not a parameter: kept out of the module tree
        fn, shapes = steps.get(long_rope, (None, set()))
        if fn is None or (shape not in shapes and len(shapes) >= self.max_slot_traces):
            # the weights are inputs (read at every call), not constants frozen into the traced graph
            fn, shapes = mx.compile(partial(self.slot_step, long_rope=long_rope), inputs=self.state), set()
            steps[long_rope] = (fn, shapes)
        shapes.add(shape)
        return fn

    def embed(self, inputs: mx.array, image_rows: Optional[mx.array] = None) -> mx.array:
        """The first layer's input (B, L, hidden): token embeddings (with ``image_rows``, the negative ids'
        rows are those), times the config's embedding multiplier (Phi-3-small's muP)."""
        if image_rows is None:
            h = self.model.embed_tokens(inputs)
        else:
            where = np.nonzero(np.array(inputs) < 0)
            if len(where[0]) != image_rows.shape[0]:
                raise ValueError(f"{len(where[0])} image positions but {image_rows.shape[0]} image rows")
            h = self.model.embed_tokens(mx.maximum(inputs, 0))
            h[mx.array(where[0]), mx.array(where[1])] = image_rows.astype(h.dtype)
        m = self.config.embedding_multiplier
        return h * m if m != 1.0 else h

    @property
    def takes_images(self) -> bool:
        """Whether the model has a vision tower (phi3_v)."""
        return hasattr(self.model, "vision_embed_tokens")

    def encode_images(self, pixel_values, image_sizes) -> list:
        """Vision models: pixel_values (n, crops, 3, 336, 336) and padded image_sizes (n, 2) -> one
        (positions, hidden) array per image (see ``models/vision.py``)."""
        if not self.takes_images:
            raise ValueError(f"{self.model_type} has no vision tower")
        return self.model.vision_embed_tokens(pixel_values, image_sizes)

    def make_cache(self, kv_bits: Optional[int] = None, kv_group_size: Optional[int] = None) -> ModelCache:
        """A KV cache for this model (a window cache for sliding-window models; ``kv_bits`` 4 or 8
        stores keys and values quantized)."""
        return make_cache(self.config, kv_bits, kv_group_size, identity=self.identity)

    def identity(self) -> dict:
        """What a saved prompt cache must match: the config's shape and a fingerprint of every weight
        (the first values of each array: a fine-tuned or fused model differs from its base)."""
        ident = config_identity(self.config)
        probes = [v.reshape(-1)[:64].astype(mx.float32).sum() * (i + 1)
                  for i, (_, v) in enumerate(tree_flatten(self.parameters()))]
        ident["weights"] = round(float(mx.stack(probes).sum()), 3) if probes else 0.0
        return ident
