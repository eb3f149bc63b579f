"""KV caches: every cache the project uses, in one place.

``LayerCache`` is one layer's keys and values, shapes (B, K, T, D) with K key/value heads:

* plain: grows with the sequence, allocated in steps of 256 positions;
* window (``window=W``, sliding-window models such as Phi-3-mini-4k, W = 2047): a query at position
  i sees keys i - W + 1 .. i, so keys older than the last W - 1 positions are never read again and
  are dropped. The cache holds at most ``W - 1 + max(new tokens of one pass, min(256, W / 4))``
  positions, however long the generation runs;
* quantized (``bits`` 4 or 8): keys and values stored as MLX affine-quantized (packed, scales, biases)
  triples, ``group_size`` values per group. Combines with the window.

``ModelCache`` is a model's list of layer caches plus what makes them reusable: the token ids they
hold (so a prefix can be re-encoded), which LongRoPE factor set encoded them, trimming (drop the
last n positions: chat turns reuse the common prefix), repair after an interrupted pass, and
save/load to a safetensors file tagged with the model's identity (prompt caches).

This module is below the models: re-encoding takes the model as an argument.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import mlx.core as mx

from .config import ModelConfig
from .errors import Phi3MLXError

CACHE_FORMAT = "phi3mlx-prompt-cache-1"

class LayerCache:
    """One layer's keys and values (see the module docstring)."""

    step = 256

    def __init__(self, window: Optional[int] = None, bits: Optional[int] = None, group_size: int = 64):
        self.window, self.bits, self.group_size = window, bits, group_size
        self.keys: Optional[List[mx.array]] = None  # 1 float array or 3 quantized parts, (B, K, capacity, ...)
        self.values: Optional[List[mx.array]] = None
        self.start = 0  # absolute position of the first stored key
        self.offset = 0  # absolute position after the last stored key (= tokens seen)

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def length(self) -> int:
        """Positions stored (offset - start)."""
        return self.offset - self.start

    def _parts(self, x: mx.array) -> List[mx.array]:
        if self.bits is None:
            return [x]
        return list(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def _fetch(self, parts: List[mx.array], n: int):
        out = [a[..., :n, :] for a in parts]
        return out[0] if self.bits is None else tuple(out)

    def _grow(self, L: int) -> int:
        """Room to add for L new positions: steps of 256 (window caches: at most a quarter window, so
        the cache never holds more than window - 1 + max(L, window / 4) positions)."""
        if self.window is None:
            return -(-L // self.step) * self.step
        return max(L, min(self.step, max(1, self.window // 4)))

    def _drop(self, L: int) -> int:
        """How many of the oldest stored positions storing L more drops: none while the buffer has room;
        when it must grow, a window cache keeps only what a query at offset or later can see."""
        if self.keys is None or self.window is None or self.length + L <= self.keys[0].shape[2]:
            return 0
        return max(0, self.length - (self.window - 1))

    def update_and_fetch(self, k: mx.array, v: mx.array):
        """Store k, v (B, K, L, D) at positions offset..offset+L-1; return every stored key and value.

        Float caches return arrays (B, K, T', D); quantized ones (packed, scales, biases) tuples. The
        returned keys are contiguous positions ending at the new offset: the first is at
        ``offset + L - T'`` (0 unless the window dropped old ones)."""
        L = k.shape[2]
        kp, vp = self._parts(k), self._parts(v)
        n = self.length
        if self.keys is None:
            cap = self._grow(L)
            self.keys = [mx.zeros(a.shape[:2] + (cap,) + a.shape[3:], a.dtype) for a in kp]
            self.values = [mx.zeros(a.shape[:2] + (cap,) + a.shape[3:], a.dtype) for a in vp]
        elif n + L > self.keys[0].shape[2]:
            drop = self._drop(L)
            keep = n - drop
            cap = keep + self._grow(L)

            def regrow(parts):
                return [mx.concatenate([a[..., drop:n, :], mx.zeros(a.shape[:2] + (cap - keep,) + a.shape[3:], a.dtype)],
                                       axis=2) for a in parts]

            self.keys, self.values = regrow(self.keys), regrow(self.values)
            self.start += drop
            n = keep
        for buf, new in ((self.keys, kp), (self.values, vp)):
            for a, b in zip(buf, new):
                a[..., n : n + L, :] = b
        self.offset += L
        return self._fetch(self.keys, n + L), self._fetch(self.values, n + L)

    def key_start(self, L: int) -> int:
        """Absolute position of the first key ``update_and_fetch`` returns for L new positions."""
        return self.start + self._drop(L)

    def can_trim(self, n: int) -> bool:
        """Whether dropping the last n positions leaves every key a later query may need."""
        new = self.offset - n
        if n < 0 or new < self.start:
            return False
        return self.window is None or self.start == 0 or new - (self.window - 1) >= self.start

    def trim(self, n: int) -> None:
        if not self.can_trim(n):
            raise ValueError(f"cannot trim {n} positions from this cache")
        self.offset -= n
        if self.offset == 0:
            self.reset()

    def reset(self) -> None:
        self.keys = self.values = None
        self.start = self.offset = 0

    @property
    def state(self) -> List[mx.array]:
        """The stored arrays (for mx.eval and saving)."""
        if self.keys is None:
            return []
        n = self.length
        return [a[..., :n, :] for a in self.keys + self.values]

    def set_state(self, arrays: Sequence[mx.array], start: int, offset: int) -> None:
        half = len(arrays) // 2
        self.keys, self.values = list(arrays[:half]), list(arrays[half:])
        self.start, self.offset = start, offset


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k


def image_positions(ids: Sequence[int]) -> int:
    """How many of ``ids`` are image positions (negative ids, vision models)."""
    return sum(1 for t in ids if t < 0)


class ModelCache(list):
    """The layer caches of one model plus the token ids they hold.

    ``long_rope`` records which LongRoPE factor set encoded the cached keys (None while empty);
    the model re-encodes the prefix when a pass needs the other set (``Model.__call__``).
    """

    def __init__(self, layers: Sequence[LayerCache], identity: Union[None, dict, Callable[[], dict]] = None):
        super().__init__(layers)
        self._identity = identity  # a dict, or a function computing it when a file is written
        self.long_rope: Optional[bool] = None
        self._ids: List[mx.array] = []  # (B, L) id arrays in the order they were fed, possibly lazy
        self._list: Optional[List[int]] = None  # the ids as a list, once read (reading evaluates them)
        self._rows: List[mx.array] = []  # image rows fed for the negative ids (vision models), in order

    @property
    def identity(self) -> dict:
        if callable(self._identity):
            self._identity = self._identity()
        return self._identity or {}

    @property
    def offset(self) -> int:
        return self[0].offset if len(self) else 0

    @property
    def max_length(self) -> int:
        """Most positions any layer stores now."""
        return max((c.length for c in self), default=0)

    def record(self, inputs: mx.array, image_rows: Optional[mx.array] = None) -> None:
        """Called by the model for every pass: the ids whose keys were just stored (and the image rows
        that stood for their negative ids, so that a re-encode can feed them again)."""
        self._ids.append(inputs)
        self._list = None
        if len(self._ids) > 64:
            self._ids = [mx.concatenate(self._ids, axis=1)]
        if image_rows is not None:
            self._rows.append(image_rows)

    @property
    def image_rows(self) -> Optional[mx.array]:
        """The image rows of the held negative ids, in order (None without images)."""
        if not self._rows:
            return None
        if len(self._rows) > 1:
            self._rows = [mx.concatenate(self._rows, axis=0)]
        return self._rows[0]

    def _keep(self, ids: List[int]) -> None:
        """Hold ``ids`` (a prefix of what is held) and the image rows of their negative ids."""
        rows = self.image_rows
        n_img = image_positions(ids)
        self._ids = [mx.array([ids])] if ids else []
        self._list = list(ids)
        self._rows = [rows[:n_img]] if rows is not None and n_img else []

    def hold(self, ids: List[int], image_rows: Optional[mx.array] = None) -> None:
        """Record ``ids`` (and the image rows of their negative ids) as what the positions now stored
        hold (after ``set_state`` of each layer)."""
        self._ids = [mx.array([ids])] if ids else []
        self._list = list(ids)
        self._rows = [image_rows] if image_rows is not None else []

    @property
    def token_ids(self) -> List[int]:
        """The ids the cache holds (first row of the batch), in order. Kept as a list once read (or given
        by ``hold``), so that looking through a pool of caches waits for no computation."""
        if self._list is None:
            if not self._ids:
                return []
            ids = mx.concatenate(self._ids, axis=1) if len(self._ids) > 1 else self._ids[0]
            self._ids = [ids]
            self._list = ids[0].tolist()
        return list(self._list)

    def copy(self) -> "ModelCache":
        """An independent cache holding the same positions (later updates of either leave the other as is)."""
        layers = []
        for c in self:
            n = LayerCache(c.window, c.bits, c.group_size)
            if c.keys is not None:
                n.set_state(c.state, c.start, c.offset)  # slices: new arrays, the buffers are not shared
            layers.append(n)
        out = ModelCache(layers, self._identity)
        out.long_rope = self.long_rope
        out._ids = list(self._ids)
        out._list = self._list  # never changed in place: replaced
        out._rows = list(self._rows)
        return out

    def reset(self) -> None:
        for c in self:
            c.reset()
        self._ids = []
        self._list = None
        self._rows = []
        self.long_rope = None

    def repair(self) -> None:
        """After a pass was interrupted (Ctrl-C) part way: bring every layer back to what all hold."""
        ids = self.token_ids
        n = min([c.offset for c in self] + [len(ids)])
        for c in self:
            if c.offset > n:
                if not c.can_trim(c.offset - n):
                    self.reset()
                    return
                c.trim(c.offset - n)
        self._keep(ids[:n])
        if n == 0:
            self.long_rope = None

    def trim(self, n: int, model=None) -> None:
        """Drop the last n positions. A window cache that no longer holds what later queries need is
        rebuilt from its token ids by running ``model`` again (exact, but costs a prefill)."""
        if n <= 0:
            return
        ids = self.token_ids
        if n >= len(ids):
            self.reset()
            return
        if all(c.can_trim(n) for c in self):
            for c in self:
                c.trim(n)
            self._keep(ids[: len(ids) - n])
            return
        if model is None:
            raise ValueError("trimming this window cache needs the model to re-encode it")
        self._keep(ids[: len(ids) - n])
        self.reencode(model, model.config.rope.uses_long(len(ids) - n))  # the set the shorter sequence takes

    def reencode(self, model, long_rope: bool, step: int = 2048) -> None:
        """Run the held ids through ``model`` again (for example with the long LongRoPE factors)."""
        ids = self.token_ids
        rows = self.image_rows
        self.reset()
        self.long_rope = long_rope
        self.extend(model, ids, step, long_rope, image_rows=rows)

    def extend(self, model, ids: Sequence[int], step: int = 2048, long_rope: Optional[bool] = None,
               progress: Optional[Callable[[int], None]] = None, image_rows: Optional[mx.array] = None) -> None:
        """Run ``ids`` through ``model`` into this cache, ``step`` at a time (each chunk evaluated, MLX's
        buffer cache cleared after it). ``long_rope`` None takes the LongRoPE set the whole extended
        sequence needs, for every chunk; ``progress(done)`` is called after each chunk. ``image_rows``:
        the embeddings of the negative ids (image positions), in order."""
        if long_rope is None:
            long_rope = model.config.rope.uses_long(self.offset + len(ids))
        at = 0
        for s in range(0, len(ids), step):
            chunk = ids[s : s + step]
            rows = None
            if image_rows is not None:
                k = image_positions(chunk)
                rows, at = (image_rows[at : at + k] if k else None), at + k
            model(mx.array(chunk)[None], cache=self, long_rope=long_rope, image_rows=rows)
            mx.eval([c.state for c in self])
            if progress is not None:
                progress(min(s + step, len(ids)))
            mx.clear_cache()

    # ---------------------------------------------------------------------------------- files

    def save(self, path: str | os.PathLike, metadata: Optional[dict] = None) -> None:
        """Write the cache to a safetensors file (temp file, then rename)."""
        path = Path(path)
        if not len(self) or self.offset == 0:
            raise Phi3MLXError("the prompt cache is empty: nothing to save")
        arrays = {}
        layers = []
        for i, c in enumerate(self):
            for j, a in enumerate(c.state):
                arrays[f"layer.{i}.{j}"] = a
            layers.append({"start": c.start, "offset": c.offset, "parts": len(c.state)})
        if self.image_rows is not None:
            arrays["image_rows"] = self.image_rows
        first = self[0]
        meta = {
            "format": CACHE_FORMAT,
            "identity": self.identity,
            "layers": layers,
            "token_ids": self.token_ids,
            "long_rope": self.long_rope,
            "window": first.window,
            "bits": first.bits,
            "group_size": first.group_size,
            "metadata": metadata or {},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".partial.safetensors", dir=path.parent)
        os.close(fd)
        try:
            mx.save_safetensors(tmp, arrays, metadata={"phi3mlx": json.dumps(meta)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, identity: dict) -> "ModelCache":
        """Read a cache written by ``save``; it must come from a model with the same ``identity``."""
        path = Path(path)
        if not path.is_file():
            raise Phi3MLXError(f"prompt cache not found: {path}")
        try:
            arrays, file_meta = mx.load(str(path), return_metadata=True)
            meta = json.loads(file_meta["phi3mlx"])
            if meta.get("format") != CACHE_FORMAT:
                raise ValueError("unknown format")
        except Exception as e:  # noqa: BLE001  (any unreadable file is the same user mistake)
            raise Phi3MLXError(f"{path} is not a phi3mlx prompt cache ({type(e).__name__})") from None
        if meta["identity"] != identity:
            diff = sorted(k for k in set(identity) | set(meta["identity"])
                          if identity.get(k) != meta["identity"].get(k))
            raise Phi3MLXError(f"{path} was saved from a different model (differs in {', '.join(diff)})")
        layers = []
        for i, info in enumerate(meta["layers"]):
            c = LayerCache(meta["window"], meta["bits"], meta["group_size"])
            c.set_state([arrays[f"layer.{i}.{j}"] for j in range(info["parts"])], info["start"], info["offset"])
            layers.append(c)
        cache = cls(layers, identity)
        cache.long_rope = meta["long_rope"]
        ids = meta["token_ids"]
        cache._ids = [mx.array([ids])] if ids else []
        cache._list = list(ids)
        cache._rows = [arrays["image_rows"]] if "image_rows" in arrays else []
        n_image = image_positions(ids)
        n_rows = arrays["image_rows"].shape[0] if "image_rows" in arrays else 0
        if n_image != n_rows:
            raise Phi3MLXError(f"{path} is damaged: {n_image} image positions but {n_rows} image rows")
        return cache

# ------------------------------------------------------------------------------ construction

def check_kv_quant(head_dim: int, bits: int, group_size: Optional[int]) -> int:
    """Validate KV-cache quantization settings; return the group size to use."""
    if group_size is None:
        group_size = 64 if head_dim % 64 == 0 else 32
    problems = []
    if bits not in (4, 8):
        problems.append(f"kv_bits must be 4 or 8, got {bits}")
    if group_size not in (32, 64, 128) or head_dim % group_size:
        problems.append(f"kv_group_size must be 32, 64 or 128 and divide the head size {head_dim}, got {group_size}")
    if problems:
        raise Phi3MLXError.many(problems)
    if not _kv_quant_supported(head_dim, bits, group_size):
        raise Phi3MLXError(
            f"--kv-bits {bits} with group size {group_size} (head size {head_dim}) is not implemented by MLX on "
            f"{mx.default_device()}; use a float KV cache here" + (" or another --kv-group-size" if head_dim % 64 == 0 else ""))
    return group_size

_KV_PROBED: dict = {}

def _kv_quant_supported(head_dim: int, bits: int, group_size: int) -> bool:
    """Whether this device's quantized_matmul handles attention over such a cache (MLX's CUDA backend,
    for one, lacks some group sizes): tried once per setting on tiny inputs shaped as the attention's
    two products (4 query heads sharing 1 KV head; 1 and 3 queries; 3 keys) in the float types models
    run in. Only "not implemented" answers count."""
    key = (str(mx.default_device()), head_dim, bits, group_size)
    if key not in _KV_PROBED:
        ok = True
        for dtype in (mx.float32, mx.bfloat16, mx.float16):
            for L in (1, 3):
                kq = [mx.expand_dims(t, 2) for t in
                      mx.quantize(mx.ones((1, 1, 3, head_dim), dtype=dtype), group_size=group_size, bits=bits)]
                q = mx.ones((1, 1, 4, L, head_dim), dtype=dtype)
                try:
                    s = mx.quantized_matmul(q, *kq, transpose=True, group_size=group_size, bits=bits)
                    mx.eval(mx.quantized_matmul(mx.softmax(s, axis=-1), *kq, transpose=False,
                                                group_size=group_size, bits=bits))
                except (RuntimeError, ValueError) as e:
                    msg = str(e).lower()
                    if "no implementation" in msg or "not supported" in msg or "not implemented" in msg:
                        ok = False
                    else:
                        raise
        _KV_PROBED[key] = ok
    return _KV_PROBED[key]

def config_identity(cfg: ModelConfig) -> dict:
    """What a cache must agree on with the model that reads it (weights are checked separately)."""
    return dict(model_type=cfg.model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                sliding_window=cfg.sliding_window, rope=cfg.rope.kind, rope_theta=cfg.rope.theta)

def make_cache(cfg: ModelConfig, kv_bits: Optional[int] = None, kv_group_size: Optional[int] = None,
               window: bool = True, identity: Union[None, dict, Callable[[], dict]] = None) -> ModelCache:
    """A ModelCache for a model with this config: a window cache where the model has a sliding window
    shorter than its context (``window`` False keeps every key), quantized with ``kv_bits``."""
    group = None
    if kv_bits is not None:
        group = check_kv_quant(cfg.head_dim, kv_bits, kv_group_size)
    w = cfg.sliding_window if window and cfg.sliding_window and cfg.sliding_window < cfg.context_length else None
    layers = [LayerCache(w, kv_bits, group or 64) for _ in range(cfg.num_hidden_layers)]
    return ModelCache(layers, identity or config_identity(cfg))


class SlotBatch:
    """The keys and values of a batch of sequences, one buffer per layer (rows, K, capacity, D): row r
    holds its sequence's positions 0 .. lengths[r] - 1 from the start (a window model keeps them all;
    the window is applied by the mask). One decoding step writes each row's new key at its own
    position with a single scatter per layer and reads every row with one attention call over the
    whole buffer (the positions beyond a row's length are masked), where per-sequence caches need
    per-row operations; the step is a pure function of the buffers (``SlotStore``), so it compiles.

    Float caches that never dropped a key only (``loadable``). ``add`` appends a sequence from its
    ModelCache (an empty one too), ``extend`` the rows of another SlotBatch (prompts prefilled together,
    ``Model.prefill_slots``); ``take`` removes row r and gives it back as one, ``take_rows`` several at
    once. A step (``Model.decode_slots``) puts its updated buffers back in ``keys``/``values``, then
    ``advance()`` moves every row on by one.
    """

    step = 64  # positions per growth: every join and leave copies the buffers, so they are kept short

    def __init__(self, n_layers: int, kv: Optional[tuple] = None):
        """``kv``: (kv heads, head dim, dtype) of a row, for adding empty caches to an empty batch."""
        self.keys: List[Optional[mx.array]] = [None] * n_layers
        self.values: List[Optional[mx.array]] = [None] * n_layers
        self.lengths: List[int] = []
        self.kv = kv
        self._positions: Optional[mx.array] = None

    @staticmethod
    def loadable(cache: "ModelCache") -> bool:
        return all(c.bits is None and c.start == 0 for c in cache)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys[0] is not None else 0

    @staticmethod
    def _pad(a: mx.array, cap: int) -> mx.array:
        """``a`` (rows, K, n, D) with zero positions appended up to ``cap``."""
        return mx.concatenate([a, mx.zeros(a.shape[:2] + (cap - a.shape[2],) + a.shape[3:], a.dtype)], axis=2)

    def _room(self, need: int) -> int:
        """Positions a buffer holding ``need`` has: ``need`` rounded up to whole steps."""
        return -(-need // self.step) * self.step

    def _grow(self, need: int) -> None:
        cap = self._room(need)
        for store in (self.keys, self.values):
            for i, a in enumerate(store):
                if a is not None and a.shape[2] < cap:
                    store[i] = self._pad(a, cap)

    def add(self, cache: "ModelCache") -> None:
        """Append ``cache``'s sequence (batch 1; it may be empty) as the last row."""
        n = cache.offset
        if self.rows:
            self._grow(max(n + 1, self.capacity))
        cap = max(self.capacity, self._room(n + 1))
        for i, layer in enumerate(cache):
            for store, part in ((self.keys, layer.keys), (self.values, layer.values)):
                part = part[0][:, :, :n] if part is not None else self._empty(store[i])
                row = self._pad(part, cap)  # (1, K, cap, D)
                store[i] = row if store[i] is None else mx.concatenate([store[i], row], axis=0)
        self.lengths.append(n)
        self._positions = None

    def _empty(self, like: Optional[mx.array]) -> mx.array:
        """A row holding no positions, (1, K, 0, D), shaped as ``like``'s rows or as ``kv`` says."""
        if like is not None:
            return mx.zeros((1, like.shape[1], 0, like.shape[3]), like.dtype)
        if self.kv is None:
            raise ValueError("an empty cache joins an empty SlotBatch made without kv=(heads, head_dim, dtype)")
        K, D, dtype = self.kv
        return mx.zeros((1, K, 0, D), dtype)

    def extend(self, other: "SlotBatch") -> None:
        """Append every row of ``other`` (which is left as it is), in its order: one copy of the buffers."""
        if not other.rows:
            return
        if not self.rows:
            self.keys, self.values = list(other.keys), list(other.values)
        else:
            cap = max(self.capacity, other.capacity)
            for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
                for i, (a, b) in enumerate(zip(mine, theirs)):
                    a = a if a.shape[2] == cap else self._pad(a, cap)
                    b = b if b.shape[2] == cap else self._pad(b, cap)
                    mine[i] = mx.concatenate([a, b], axis=0)
        self.lengths += other.lengths
        self._positions = None

    def take(self, r: int, cache: "ModelCache", n: Optional[int] = None) -> "ModelCache":
        """Remove row r, putting its first ``n`` positions (default: all it has) into the empty ``cache``
        (same layout as loaded)."""
        self.take_rows([(r, cache, n)])
        return cache

    def take_rows(self, picks: Sequence[tuple]) -> None:
        """Remove several rows at once: ``picks`` (row, empty cache, n or None), each row's first n
        positions (default: all it has) put into its cache. The rows that stay are gathered once, however
        many leave."""
        for r, _, n in picks:
            if not 0 <= r < self.rows or (n is not None and not 0 <= n <= self.lengths[r]):
                raise ValueError(f"row {r} has {self.lengths[r] if 0 <= r < self.rows else 'no'} positions, "
                                 f"cannot take {n}")
        if len({r for r, _, _ in picks}) != len(picks):
            raise ValueError(f"rows {[r for r, _, _ in picks]} are taken more than once")
        for r, cache, n in picks:
            n = self.lengths[r] if n is None else n
            for i, layer in enumerate(cache):  # copies: a view would keep the whole batch buffer alive
                layer.set_state([mx.contiguous(self.keys[i][r : r + 1, :, :n]),
                                 mx.contiguous(self.values[i][r : r + 1, :, :n])], 0, n)
        gone = {r for r, _, _ in picks}
        keep = [j for j in range(self.rows) if j not in gone]
        self.lengths = [self.lengths[j] for j in keep]
        # the rest, in buffers no longer than the longest remaining row needs (one copy either way)
        cap = min(self.capacity, self._room(max(self.lengths, default=0) + 1))
        idx = mx.array(keep) if keep else None
        for store in (self.keys, self.values):
            for i, a in enumerate(store):
                store[i] = a[:, :, :cap][idx] if keep else None
        self._positions = None

    def positions(self) -> mx.array:
        """(rows,) int32: the position each row's next token takes."""
        if self._positions is None:
            self._positions = mx.array(self.lengths, dtype=mx.int32)
        return self._positions

    def prepare(self, n: int = 1) -> None:
        """Room for ``n`` more positions in every row (call before a step)."""
        if max(self.lengths, default=0) + n > self.capacity:
            self._grow(max(self.lengths) + n)

    def advance(self, counts: Optional[Sequence[int]] = None) -> None:
        """Move every row on by one position (a step), or row b by ``counts[b]`` (a prefill)."""
        self.lengths = [n + (1 if counts is None else c) for n, c in zip(self.lengths, counts or self.lengths)]
        self._positions = None


class SlotStore:
    """The buffers of one SlotBatch step as a pure function sees them: ``keys``/``values`` one
    (rows, K, C, D) array per layer and ``positions`` (rows,) the position each row's first new key
    takes. ``layer(i).update_and_fetch(k, v)`` puts the step's k, v (rows, K, L, D) at positions
    positions[b] .. positions[b] + L - 1 (one scatter) and returns the whole buffers, positions beyond
    a row's own included (the step's mask hides them); ``keys``/``values`` then hold the updated
    buffers. With ``span``, only the first ``span`` positions are returned (those beyond are nobody's)."""

    def __init__(self, keys: Sequence[mx.array], values: Sequence[mx.array], positions: mx.array,
                 span: Optional[int] = None):
        self.keys, self.values, self.positions, self.span = list(keys), list(values), positions, span

    def layer(self, i: int) -> "SlotLayer":
        return SlotLayer(self, i)


class SlotLayer:
    """Layer i of a SlotStore, as the attention sees it."""

    def __init__(self, store: SlotStore, i: int):
        self.store, self.i = store, i

    def update_and_fetch(self, k: mx.array, v: mx.array):
        st, i = self.store, self.i
        B, K, L, D = k.shape
        at = st.positions.reshape(B, 1, 1, 1)
        if L > 1:
            at = at + mx.arange(L, dtype=at.dtype).reshape(1, 1, L, 1)  # (B, 1, L, 1)
        idx = mx.broadcast_to(at, (B, K, L, D))
        st.keys[i] = mx.put_along_axis(st.keys[i], idx, k.astype(st.keys[i].dtype), axis=2)
        st.values[i] = mx.put_along_axis(st.values[i], idx, v.astype(st.values[i].dtype), axis=2)
        if st.span is not None and st.span < st.keys[i].shape[2]:
            return st.keys[i][:, :, : st.span], st.values[i][:, :, : st.span]
        return st.keys[i], st.values[i]
