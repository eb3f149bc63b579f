"""Continuous batching: many requests decoded together on one model, each with its own cache and rules.

``Engine(model, tokenizer)`` owns the model on one thread. ``submit(request)`` queues a ``Request``
(or raises ``QueueFull``); the engine thread loops:

1. admit queued requests into free slots (at most ``max_batch`` active). A joining request takes a
   copy of the longest matching prefix from the prefix pool (caches of finished requests, keyed by
   the token ids they hold: a shared system prompt or a growing conversation is not recomputed);
2. prefill: the joining requests run at most ``prefill_chunk`` prompt tokens per loop between them,
   so a long prompt never stalls the others for long; the last prompt token gives the first logits.
   Where the SlotBatch takes them (below), the prompts whose rest fits run together as rows of one
   pass straight into new rows of the batch (``model.prefill_slots``: right-padded, each continuing
   its own cached prefix; grouped by LongRoPE set and by length, so padding stays bounded);
3. decode: one batched forward pass over every active sequence, then each request's own sampler,
   stop ids, stop strings, ``max_tokens`` and the model's context. After its prefill a sequence is a
   row of the ``SlotBatch`` (models whose layers all attend densely, float caches): one buffer per
   layer for every row, so a step is one scatter and one attention call per layer
   (``model.decode_slots``). Otherwise (Phi-3-small's blocksparse layers, ``kv_bits``, a row whose
   LongRoPE set differs from the batch's) it decodes in the ragged batch: projections batched,
   attention per sequence over its own cache (``model.decode_batch``).

The SlotBatch's steps are pipelined as generate_step's are: step t+1 is built from step t's tokens
while they are still being computed (``mx.async_eval``), and step t's tokens are then read, checked
and sent while step t+1 runs, so the Python work of a step overlaps the next step's compute. A row
whose step-t token ends it has had that token written one position past what it holds; it leaves the
batch with only the positions it holds, and its step-t+1 result is dropped.

A request leaves the batch when its token is read and ends it (the next step may already be running)
or, before the next step is built, when it is cancelled (``Request.cancel()``, e.g. a client that
disconnected); the rows leaving in one round are taken out together (``SlotBatch.take_rows``), and
their caches join the prefix pool (bounded in entries and tokens).
Each request's output arrives through its ``emit`` callback (called on the engine thread): ``Delta``
events, then one ``Done``.

On MLX's CPU backend with OpenBLAS, a small model is served with one BLAS thread (``blas_threads``):
its matmuls take microseconds, so a second BLAS thread gains little, while OpenBLAS keeps it spinning
between calls on a core the engine and HTTP threads need (measured here: with the built-in model, a
second BLAS thread took about 70% of a core and the server's tokens/s at 16 streams was 5-20% lower).
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from .cache import ModelCache, SlotBatch, common_prefix, image_positions
from .errors import Phi3MLXError
from .generate import Sampling, image_prompt, make_sampler, reuse_prefix


class OpenBLAS:
    """The thread count of the OpenBLAS this process runs MLX's CPU matmuls with, where it has one (MLX's
    Linux CPU build with OpenBLAS loaded, e.g. through ``LD_PRELOAD``); ``find()`` is None otherwise."""

    def __init__(self, lib):
        self._get, self._set = lib.openblas_get_num_threads, lib.openblas_set_num_threads
        self._get.restype, self._set.restype = ctypes.c_int, None
        self._set.argtypes = [ctypes.c_int]

    @classmethod
    def find(cls) -> Optional["OpenBLAS"]:
        libs = [None]  # the process's global symbols (LD_PRELOAD: what MLX's BLAS calls bind to) first
        try:
            with open("/proc/self/maps") as f:
                loaded = sorted({line.split()[-1] for line in f if "blas" in line.rsplit("/", 1)[-1]})
        except OSError:
            loaded = []
        if not any("mlx" in path for path in loaded):  # else MLX calls its own bundled BLAS, not this one
            libs += loaded
        for name in libs:
            try:
                lib = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_NOW) if name else ctypes.CDLL(None)
                if hasattr(lib, "openblas_set_num_threads") and hasattr(lib, "openblas_get_num_threads"):
                    return cls(lib)
            except OSError:
                continue
        return None

    @property
    def threads(self) -> int:
        return int(self._get())

    @threads.setter
    def threads(self, n: int) -> None:
        self._set(int(n))


_blas_lock = threading.Lock()
_blas_users = 0  # running engines that set the count
_blas_before = 0  # the count before the first of them


def _blas_acquire(lib: "OpenBLAS", n: int) -> None:
    global _blas_users, _blas_before
    with _blas_lock:
        if _blas_users == 0:
            _blas_before = lib.threads
        _blas_users += 1
        lib.threads = n


def _blas_release(lib: "OpenBLAS") -> None:
    global _blas_users
    with _blas_lock:
        _blas_users -= 1
        if _blas_users == 0:
            lib.threads = _blas_before


SMALL_MODEL_BYTES = 32 * 2**20  # weights up to this size: a step's matmuls are too small to share out


def small_model(model) -> bool:
    """Whether ``model``'s weights total at most ``SMALL_MODEL_BYTES``: a step whose fixed costs (MLX's
    per-operation scheduling, Python) weigh more than its arithmetic."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters())) <= SMALL_MODEL_BYTES


def blas_threads(model, requested: Optional[int] = None) -> Optional[int]:
    """The BLAS thread count to serve ``model`` with, or None to leave the process's as it is: what was
    ``requested`` (a positive number), else (automatic) 1 for a model of at most ``SMALL_MODEL_BYTES``
    of weights on the CPU backend. Only OpenBLAS's count can be set (``OpenBLAS``)."""
    if requested is not None:
        if requested < 1:
            raise Phi3MLXError(f"the BLAS thread count must be 1 or more, got {requested}")
        return requested
    if mx.default_device() != mx.cpu:
        return None
    return 1 if small_model(model) else None


def _covers(a: ModelCache, b: ModelCache) -> bool:
    """Whether cache ``a`` serves every request that ``b`` serves: ``a`` holds ``b``'s ids and then
    perhaps more, encoded with the same LongRoPE set, and can be cut back to ``b``'s length without a
    prefill (a window cache past its window cannot)."""
    held, ids = a.token_ids, b.token_ids
    n = len(ids)
    return (a.long_rope == b.long_rope and len(held) >= n and held[:n] == ids
            and all(layer.can_trim(len(held) - n) for layer in a))


class QueueFull(Exception):
    """The engine's queue is at its limit."""


@dataclass
class TokenLogprob:
    token: int
    text: str
    logprob: float
    top: List[tuple]  # [(token id, text, logprob, utf-8 bytes)] most likely first
    bytes: List[int] = field(default_factory=list)  # the token's UTF-8 bytes (a byte-fallback token: its byte)
    offset: int = 0  # characters of the generated text before this token's text


@dataclass
class Delta:
    text: str
    logprobs: List[TokenLogprob] = field(default_factory=list)


@dataclass
class Done:
    finish_reason: str  # "stop" (end token or stop string), "length" (max_tokens or context), "cancelled", "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    error: Optional[str] = None
    bad_request: bool = False  # the error is the request's (its prompt), not the server's


@dataclass
class Request:
    """One generation. ``ids``: the prompt's token ids; or ``text`` with ``images`` for a vision model
    (tokenized and encoded on the engine thread). ``emit(event)`` receives Delta and Done events."""

    emit: Callable[[object], None]
    ids: Optional[List[int]] = None
    text: Optional[str] = None
    images: Sequence = ()
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    logprobs: Optional[int] = None  # None: no logprobs; k: the chosen token's and the k most likely
    _cancelled: bool = False

    def cancel(self) -> None:
        self._cancelled = True


class _Slot:
    """A request being served: its cache, sampler, detokenizer and stop state."""

    def __init__(self, req: Request, ids: List[int], rows, cache: ModelCache, todo: List[int], tokenizer):
        self.req, self.ids, self.cache = req, ids, cache
        self.todo = todo  # prompt ids still to prefill (the last one gives the first logits)
        self.rows = rows  # image rows of todo's negative ids
        self.cached = len(ids) - len(todo)
        self.long = None  # the LongRoPE set of the prompt (None until the prefill starts)
        self.sampler = make_sampler(req.temperature, req.top_p, 0, 0.0, req.seed)
        self.detok = tokenizer.detokenizer()
        self.text = ""  # generated text so far
        self.sent = 0  # characters of it already emitted
        self.pending_lp: List[TokenLogprob] = []
        self.n = 0
        self.last: Optional[int] = None  # the last token handed over (the next one to feed, outside a pipeline)
        self.prefilled = False  # its whole prompt has run: it decodes
        self.first: Optional[tuple] = None  # in the batch: (token (1,), log-probabilities) of its prompt, not read yet
        self.done = False
        self.in_batch = False  # a row of the engine's SlotBatch (its cache's positions live there)
        self.held: List[int] = []  # in the batch: the ids its row holds
        self.long_cur: Optional[bool] = None  # in the batch: the LongRoPE set its row was encoded with
        self.held_rows = None  # in the batch: the image rows of its negative ids (vision models)


@dataclass
class _Flight:
    """A SlotBatch step whose tokens are being computed: ``rows`` the slots of its rows in order,
    ``toks`` (rows,) their next tokens, ``logprobs`` row index -> (V,) for the rows that sample or
    report log-probabilities."""

    rows: List["_Slot"]
    toks: mx.array
    logprobs: dict
    index: dict = field(default_factory=dict)  # id(slot) -> its row in this step

    def __post_init__(self):
        self.index = {id(s): i for i, s in enumerate(self.rows)}


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64, prefill_chunk: int = 512,
                 pool_entries: int = 8, pool_tokens: int = 65536, kv_bits: Optional[int] = None,
                 kv_group_size: Optional[int] = None, compiled: Optional[bool] = None,
                 blas: Optional[int] = None):
        """``blas``: the BLAS threads to run with while the engine runs (``blas_threads``; None: automatic;
        OpenBLAS only; the process's count is put back when the last running engine that set it stops)."""
        self.model, self.tokenizer = model, tokenizer
        self.blas_threads = blas_threads(model, blas)
        self._blas: Optional[OpenBLAS] = None  # set while this engine holds the process's BLAS count
        # SlotBatch steps as compiled graphs (``Model.decode_slots``): each batch size and buffer length is
        # traced once and kept (memory, and a pause per new shape that grows with the model), so by default
        # (None) only a small model's steps are compiled, whose traces are cheap and whose steps gain most
        self.compiled = small_model(model) if compiled is None else compiled
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.pool_entries, self.pool_tokens = pool_entries, pool_tokens
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self.context = model.config.context_length
        self._queue: "queue.Queue[Request]" = queue.Queue()
        self._active: List[_Slot] = []
        self._pool: List[ModelCache] = []  # most recently used last
        dense = model.slot_ready and kv_bits is None
        self.slots: Optional[SlotBatch] = model.slot_batch() if dense else None
        self._rows: List[_Slot] = []  # the SlotBatch's rows, in order
        self._leaving: List[tuple] = []  # (slot, whether its cache then joins the pool): rows to take out
        self._flight: Optional[_Flight] = None  # the SlotBatch step being computed
        self._wake = threading.Event()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.steps = 0  # decode steps run
        self.rows_decoded = 0  # sequences over all decode steps (rows_decoded / steps: the mean batch)
        self.overlapped = 0  # SlotBatch steps built while the step before them was still being computed
        self.max_seen_batch = 0
        self._listeners: List[Callable[[], None]] = []

    def on_round(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` on the engine thread after every round of the loop (admission, prefill and one
        decoding step; while idle, every 50 ms), e.g. to hand the round's events to another thread in
        one go."""
        self._listeners.append(fn)

    # ------------------------------------------------------------------------------ life cycle

    def start(self) -> "Engine":
        """Start the engine thread (again after ``stop``: the requests being decoded go on where they were,
        and queued requests and the prefix pool are kept)."""
        if self._thread is None:
            self._stop = False
            lib = OpenBLAS.find() if self.blas_threads is not None else None
            if lib is not None and self._blas is None:
                _blas_acquire(lib, self.blas_threads)
                self._blas = lib
            thread = threading.Thread(target=self._run, name="phi3mlx-engine", daemon=True)
            try:
                thread.start()
            except BaseException:
                self._put_blas_back()
                raise
            self._thread = thread
        return self

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        try:
            if self._thread is not None:
                self._thread.join()
                self._thread = None
        finally:
            self._put_blas_back()

    def _put_blas_back(self) -> None:
        """The process's BLAS count as it was before the first running engine set it (once no engine
        that set it runs any more)."""
        if self._blas is not None:
            _blas_release(self._blas)
            self._blas = None

    def submit(self, req: Request) -> None:
        if self._queue.qsize() >= self.max_queue:
            raise QueueFull(f"the server is busy ({self.max_queue} requests waiting); try again shortly")
        self._queue.put(req)
        self._wake.set()

    @property
    def load(self) -> dict:
        return {"active": len(self._active), "queued": self._queue.qsize(), "pooled": len(self._pool),
                "steps": self.steps, "rows_decoded": self.rows_decoded}

    # ------------------------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._settle(keep=True)

    def _settle(self, keep: bool = False) -> None:
        """Let a step still in flight finish, so that the thread may end, or MLX's cache be cleared, with
        nothing left computing. When idle its rows have all ended and it is dropped. When the engine
        stops (``keep``), what is pending is computed but kept: the batch's buffers, first tokens not read
        yet, and the step, whose tokens a restarted engine reads and feeds as if it had not stopped. A
        failure of that step is nobody's to report any more (when idle) or ends the batch's requests."""
        flight = self._flight
        pending = [s.first[0] for s in self._rows if s.first is not None]
        if keep:  # everything a restarted thread reads (MLX streams belong to a thread)
            pending += [a for a in self.slots.keys + self.slots.values if a is not None] if self.slots else []
            pending += [a for c in [s.cache for s in self._active] + self._pool for layer in c for a in layer.state]
        try:
            mx.eval(([flight.toks] + list(flight.logprobs.values()) if flight is not None else []) + pending)
        except Exception as e:  # noqa: BLE001
            if keep:
                self._fail(e)
            self._flight = None
            return
        if not keep or flight is None or all(s.done for s in flight.rows):
            self._flight = None

    def _loop(self) -> None:
        while not self._stop:
            self._admit()
            if not self._active:
                self._settle()
                self._round_done()
                mx.clear_cache()
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self._prefill()
                self._decode()
            except Exception as e:  # noqa: BLE001  (one bad step must not stop the server)
                self._fail(e)
            self._active = [s for s in self._active if not s.done]
            self._round_done()

    def _fail(self, e: Exception) -> None:
        """A step failed: the batch's rows may be half-updated, so every active request ends with the error."""
        if self.slots is not None:
            self.slots = self.model.slot_batch()
        self._rows, self._leaving = [], []
        self._flight = None
        for s in self._active:
            s.in_batch = False
            self._finish(s, "error", f"{type(e).__name__}: {e}")

    def _round_done(self) -> None:
        for fn in self._listeners:
            try:
                fn()
            except Exception:  # noqa: BLE001  (a listener's failure must not stop the engine)
                pass

    def _admit(self) -> None:
        while len(self._active) < self.max_batch:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                return
            if req._cancelled:
                req.emit(Done("cancelled", 0, 0, 0))
                continue
            try:
                self._active.append(self._slot(req))
            except Phi3MLXError as e:
                req.emit(Done("error", 0, 0, 0, str(e), bad_request=True))
            except Exception as e:  # noqa: BLE001  (one bad request must not stop the engine)
                req.emit(Done("error", 0, 0, 0, f"{type(e).__name__}: {e}"))

    def _slot(self, req: Request) -> _Slot:
        rows = None
        if req.text is not None:
            ip = image_prompt(self.model, self.tokenizer, req.text, list(req.images))
            ids, rows = ip.ids, ip.rows
        else:
            ids = list(req.ids)
        if not ids:
            raise Phi3MLXError("the prompt is empty")
        if len(ids) >= self.context:
            raise Phi3MLXError(f"the prompt has {len(ids)} tokens but the model's context is {self.context} tokens")
        cache = self._from_pool(ids)
        todo = reuse_prefix(self.model, cache, ids)
        if rows is not None:
            k = image_positions(todo)
            rows = rows[rows.shape[0] - k :] if k else None
        return _Slot(req, ids, rows, cache, todo, self.tokenizer)

    def _from_pool(self, ids: List[int]) -> ModelCache:
        """A copy of the pooled cache sharing the longest prefix with ``ids``, else a new cache."""
        best, best_k = None, 0
        for c in self._pool:
            k = common_prefix(c.token_ids, ids)
            if k > best_k:
                best, best_k = c, k
        if best is None:
            return self.model.make_cache(self.kv_bits, self.kv_group_size)
        self._pool.remove(best)
        self._pool.append(best)  # most recently used
        return best.copy()

    def _to_pool(self, cache: ModelCache) -> None:
        """Pool ``cache`` (most recently used). The pool keeps no entry that another one covers
        (``_covers``): a cache that a pooled one covers only refreshes that one, and one that covers
        pooled ones replaces them, so that identical requests (greedy ones asking the same again) do not
        crowd out the other prefixes."""
        if not cache.offset or cache.offset > self.pool_tokens:  # an oversized one would empty the pool
            return
        for c in self._pool:
            if _covers(c, cache):
                self._pool.remove(c)
                self._pool.append(c)
                return
        self._pool = [c for c in self._pool if not _covers(cache, c)]
        self._pool.append(cache)
        while len(self._pool) > self.pool_entries or sum(c.offset for c in self._pool) > self.pool_tokens:
            self._pool.pop(0)

    def _prefill(self) -> None:
        budget = self.prefill_chunk
        together: List[_Slot] = []  # whole rest of the prompt now, prefilled as rows of one pass
        for s in self._active:
            if s.prefilled or s.done or budget <= 0:
                continue
            if s.req._cancelled:
                self._finish(s, "cancelled")
                continue
            if s.long is None:
                s.long = self.model.config.rope.uses_long(s.cache.offset + len(s.todo))
            if len(s.todo) > budget:  # a long prompt: a chunk now, the rest in later rounds
                head = s.todo[:budget]
                k = image_positions(head)
                rows = None
                if s.rows is not None and k:
                    rows, s.rows = s.rows[:k], s.rows[k:]
                s.cache.extend(self.model, head, len(head), s.long, image_rows=rows)
                s.todo = s.todo[len(head) :]
                budget = 0
                continue
            if self._joins_together(s):
                together.append(s)
                budget -= len(s.todo)
                continue
            # the rest of the prompt in one pass; its last position's logits give the first token
            rows = s.rows if image_positions(s.todo) else None
            logits = self.model(mx.array(s.todo)[None], cache=s.cache, long_rope=s.long, last_only=True,
                                image_rows=rows)[:, -1, :]
            budget -= len(s.todo)
            s.todo, s.prefilled = [], True
            if self.slots is not None and SlotBatch.loadable(s.cache):
                toks, logprobs = self._pick([s], logits)  # read when the batch's next step is on its way
                self._join(s, (toks, logprobs.get(0)))
            else:
                self._take([s], logits)

        for group in self._groups(together):
            self._prefill_rows(group)

    def _joins_together(self, s: _Slot) -> bool:
        """Whether s's prompt can run as a row of a batched prefill into the SlotBatch: dense float
        caches, no image positions left to feed, and a cached prefix (if any) encoded with the LongRoPE
        set the prompt needs."""
        return (self.slots is not None and not image_positions(s.todo) and SlotBatch.loadable(s.cache)
                and (s.cache.offset == 0 or s.cache.long_rope == s.long
                     or self.model.config.rope.kind != "longrope"))

    pad_waste = 0.5  # a batched prefill computes at most this much padding per real prompt token (+ one row's)

    def _groups(self, slots: List[_Slot]) -> List[List[_Slot]]:
        """``slots`` as batched-prefill groups: one LongRoPE set each, prompts of similar lengths (sorted
        by length, a group grows while its padding stays within ``pad_waste``)."""
        groups: List[List[_Slot]] = []
        for long in (False, True):
            rows = sorted((s for s in slots if s.long == long), key=lambda s: len(s.todo))
            ones = [s for s in rows if len(s.todo) == 1]  # all cached but the last token: no pass of their own
            if ones:
                groups.append(ones)
            group: List[_Slot] = []
            for s in rows[len(ones) :]:
                n = len(s.todo)  # the longest so far: rows are sorted
                real = sum(len(x.todo) for x in group) + n
                if group and (len(group) + 1) * n > real * (1 + self.pad_waste) + n:
                    groups.append(group)
                    group = []
                group.append(s)
            if group:
                groups.append(group)
        return groups

    def _prefill_rows(self, group: List[_Slot]) -> None:
        """The rest of each prompt of ``group`` in one pass as new rows of the SlotBatch (each continuing
        its cached prefix); each row's last position gives its first token, read when the batch's next
        step is on its way. Rows with one prompt token left (the rest from the prefix pool) join without
        a pass: that token is their input to the batch's next step, whose output is their first token."""
        part = self.model.slot_batch()
        for s in group:
            part.add(s.cache)
        L = max(len(s.todo) for s in group)
        if L > 1:
            tokens = mx.array([s.todo + [0] * (L - len(s.todo)) for s in group])  # (B, L) right-padded
            logits = self.model.prefill_slots(tokens, [len(s.todo) for s in group], part, group[0].long)
            toks, logprobs = self._pick(group, logits)
        self.slots.extend(part)
        for i, s in enumerate(group):
            if L > 1:  # its whole prompt is in the batch; its first token comes from this pass
                s.held, s.first = list(s.ids), (toks[i : i + 1], logprobs.get(i))
            else:  # the batch holds all but its last prompt token, which the next step feeds
                s.held, s.last = list(s.ids[:-1]), s.todo[0]
            s.long_cur, s.held_rows = group[0].long, s.cache.image_rows
            s.cache.reset()
            s.todo, s.prefilled = [], True
            self._rows.append(s)
            s.in_batch = True

    def _join(self, s: _Slot, first: tuple) -> None:
        s.held = list(s.ids)  # after its prefill the cache holds exactly the prompt
        s.long_cur, s.held_rows = s.cache.long_rope, s.cache.image_rows
        self.slots.add(s.cache)
        s.cache.reset()
        self._rows.append(s)
        s.in_batch = True
        s.first = first

    def _leave(self, s: _Slot, pool: bool = False) -> None:
        """Take s's row out of the SlotBatch into its own cache again (with ``pool``, the cache then joins
        the prefix pool). Rows leaving in the same round go out together (``_take_out``), before the
        batch's next change."""
        self._leaving.append((s, pool))

    def _take_out(self) -> None:
        """Move the leaving rows out of the SlotBatch, each into its own cache: the positions it holds (a
        step in flight may have written one more, a token that ended it)."""
        if not self._leaving:
            return
        leaving, self._leaving = self._leaving, []
        for s, _ in leaving:
            s.cache.reset()
        self.slots.take_rows([(self._rows.index(s), s.cache, len(s.held)) for s, _ in leaving])
        gone = {id(s) for s, _ in leaving}
        self._rows = [s for s in self._rows if id(s) not in gone]
        for s, pool in leaving:
            s.cache.hold(s.held, s.held_rows)
            s.cache.long_rope = s.long_cur
            s.in_batch = False
            if pool:
                self._to_pool(s.cache)
        # their copies, not views of the batch
        mx.async_eval([a for s, _ in leaving for layer in s.cache for a in layer.state])

    def _decode(self) -> None:
        cancelled = [s for s in self._active if s.prefilled and not s.done and s.req._cancelled]
        long, leaving = self._rope_split()
        if any(s.in_batch for s in cancelled) or leaving or not self._rows:  # batch rows change outside the
            # pipeline: read what is pending first
            self._drain()
            long, leaving = self._rope_split()
        for s in cancelled:
            if not s.done:
                self._finish(s, "cancelled")
        for s in leaving:
            if s.in_batch and not s.done:
                self._leave(s)
        self._take_out()
        ragged = [s for s in self._active if s.prefilled and not s.done and not s.in_batch]
        rows = list(self._rows)
        if not rows and not ragged:
            return
        self.max_seen_batch = max(self.max_seen_batch, len(rows) + len(ragged))
        self.steps += 1
        self.rows_decoded += len(rows) + len(ragged)
        if ragged:
            self._take(ragged, self.model.decode_batch(mx.array([s.last for s in ragged]), [s.cache for s in ragged]))
        if rows:
            self._launch(rows, long)

    def _rope_split(self) -> tuple:
        """(the LongRoPE set of the batch's next step, the rows that must leave for it): the batch keeps
        one set, rows needing the long one leave unless all do."""
        if not self._rows:
            return False, []
        rope = self.model.config.rope
        long = all(rope.uses_long(n + 1) for n in self.slots.lengths)
        return long, [s for s, n in zip(self._rows, self.slots.lengths)
                      if rope.uses_long(n + 1) != long or (s.long_cur is not None and s.long_cur != long)]

    def _launch(self, rows: List[_Slot], long: bool) -> None:
        """Build the SlotBatch's next step from the tokens of the step before it and the first tokens of
        rows that just joined; read those first tokens, start computing the step, then read the step
        before it."""
        flight = self._flight
        in_flight = [s for s in rows if flight is not None and id(s) in flight.index]
        firsts = [s for s in rows if s.first is not None]
        known = [s for s in rows if (flight is None or id(s) not in flight.index) and s.first is None]
        # every row's input: [flight's tokens | each first token | the known last tokens], then in row order
        parts, at = [], {}
        if in_flight:
            parts.append(flight.toks)
            at.update((id(s), flight.index[id(s)]) for s in in_flight)
        base = len(flight.rows) if in_flight else 0
        for k, s in enumerate(firsts):
            parts.append(s.first[0])
            at[id(s)] = base + k
        if known:
            parts.append(mx.array([s.last for s in known], dtype=mx.uint32))
            at.update((id(s), base + len(firsts) + k) for k, s in enumerate(known))
            for s in known:
                s.held.append(s.last)
        order = [at[id(s)] for s in rows]
        tokens = parts[0] if len(parts) == 1 else mx.concatenate(parts)
        if order != list(range(tokens.shape[0])):
            tokens = tokens[mx.array(order)]
        for s in rows:
            s.long_cur = long
        logits = self.model.decode_slots(tokens, self.slots, long, self.compiled)
        nxt = _Flight(rows, *self._pick(rows, logits))
        if firsts:  # a new request's first token goes out before the step it feeds is computed
            self._land(None, firsts, fed=True)
        mx.async_eval([nxt.toks] + list(nxt.logprobs.values()))
        if flight is not None:
            self.overlapped += 1
            self._land(flight, [], fed=True)
        self._flight = nxt

    def _drain(self) -> None:
        """Read the step in flight and the pending first tokens, nothing fed after them."""
        self._land(self._flight, [s for s in self._rows if s.first is not None], fed=False)
        self._flight = None

    def _land(self, flight: Optional[_Flight], firsts: List[_Slot], fed: bool) -> None:
        """Hand each live row its token from ``flight`` and each of ``firsts`` its first token. With
        ``fed`` the next step already wrote these tokens into their rows, so a row now holds its token
        unless the token ended it."""
        got = []
        if flight is not None:
            got += [(s, i, flight) for i, s in enumerate(flight.rows) if not s.done]
        got += [(s, 0, s.first) for s in firsts if not s.done]
        if got:
            mx.eval(([flight.toks] if flight is not None else []) + [s.first[0] for s in firsts])
            flight_toks = flight.toks.tolist() if flight is not None else None
            for s, i, src in got:
                tok, lp = (flight_toks[i], flight.logprobs.get(i)) if src is flight else (int(src[0].item()), src[1])
                self._step(s, tok, lp)
                if fed and not s.done:
                    s.held.append(tok)
        for s in firsts:
            s.first = None
        self._take_out()  # the rows these tokens ended, together

    def _pick(self, slots: List[_Slot], logits: mx.array) -> tuple:
        """Each slot's next token from its row of ``logits`` (B, V), lazily: (tokens (B,), row -> log-
        probabilities). Greedy rows without logprobs share one argmax over the raw logits (the log-softmax
        is a per-row shift, so the pick is the same up to a tie the shift's rounding could create in low
        precision, and a vocabulary-wide exp is saved). The others get log-probabilities as generate_step
        computes them; those that sample are filtered together where their filters are equal, and each
        adds its own sampler's noise, so every row draws what its sampler alone would draw."""
        plain = [s.sampler.greedy and s.req.logprobs is None for s in slots]
        rest = [i for i, p in enumerate(plain) if not p]
        parts, where = [], [i for i, p in enumerate(plain) if p]  # where[k]: the row of the k-th part token
        if where:
            parts.append(mx.argmax(logits if not rest else logits[mx.array(where)], axis=-1))
        logprobs: dict = {}
        if rest:
            sub = logits if len(rest) == len(slots) else logits[mx.array(rest)]
            sub = sub - mx.logsumexp(sub, axis=-1, keepdims=True)  # (len(rest), V), same dtype as generate's
            groups: dict = {}
            for j, i in enumerate(rest):
                logprobs[i] = sub[j]
                smp = slots[i].sampler
                groups.setdefault((smp.greedy, smp.filters), []).append(j)
            for (greedy, _), js in groups.items():
                rows = sub if len(js) == len(rest) else sub[mx.array(js)]  # (n, V)
                parts.append(mx.argmax(rows, axis=-1) if greedy
                             else Sampling.draw([slots[rest[j]].sampler for j in js], rows))
                where += [rest[j] for j in js]
        toks = (parts[0] if len(parts) == 1 else mx.concatenate(parts)).astype(mx.uint32)
        if where != list(range(len(slots))):
            at = {i: k for k, i in enumerate(where)}
            toks = toks[mx.array([at[i] for i in range(len(slots))])]
        return toks, logprobs

    def _take(self, slots: List[_Slot], logits: mx.array) -> None:
        """Sample each slot's next token from its row of ``logits`` (B, V) now and hand it over."""
        toks, logprobs = self._pick(slots, logits)
        for i, (s, tok) in enumerate(zip(slots, toks.tolist())):
            self._step(s, tok, logprobs.get(i))

    def _step(self, s: _Slot, tok: int, logprobs: Optional[mx.array]) -> None:
        if tok in self.tokenizer.stop_ids:  # an end token: no text, not counted
            self._end(s, "stop")
            return
        s.n += 1
        piece = s.detok.add(tok)
        if s.req.logprobs is not None:
            s.pending_lp.append(self._logprob(tok, logprobs, s.req.logprobs, len(s.text)))
        s.text += piece
        if self._check_stop(s):
            return
        held = len(s.held) if s.in_batch else s.cache.offset  # positions the sequence holds
        if s.n >= s.req.max_tokens or held + 1 >= self.context:
            self._end(s, "length")
            return
        s.last = tok

    def _end(self, s: _Slot, reason: str) -> None:
        """The sequence ends by itself: the detokenizer's rest and held-back text go out (a stop string
        in them still wins), then it finishes with ``reason``."""
        s.text += s.detok.finalize()
        if not self._check_stop(s, final=True):
            self._finish(s, reason)

    def _logprob(self, tok: int, logprobs: mx.array, k: int, offset: int) -> TokenLogprob:
        top = []
        if k > 0:
            order = mx.argpartition(-logprobs, kth=k - 1)[:k]
            vals = logprobs[order]
            for i, v in zip(order.tolist(), vals.tolist()):
                text, raw = self._token_text(int(i))
                top.append((int(i), text, float(v), raw))
            top.sort(key=lambda x: -x[2])
        text, raw = self._token_text(tok)
        return TokenLogprob(tok, text, float(logprobs[tok].item()), top, raw, offset)

    def _token_text(self, tok: int) -> tuple:
        """A token's text for logprobs (its leading space kept; a lone byte of a longer character is
        U+FFFD) and its UTF-8 bytes as a list."""
        raw = self.tokenizer.token_bytes(tok)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _check_stop(self, s: _Slot, final: bool = False) -> bool:
        """Emit what can be sent; finish with "stop" at a stop string. Text that may be the start of
        a stop string is held back until it is decided."""
        stops = [x for x in s.req.stop if x]
        if stops:
            start = max(0, s.sent - max(len(x) for x in stops))
            hits = [j for j in (s.text.find(x, start) for x in stops) if j >= 0]
            if hits:
                self._emit(s, s.text[: min(hits)])
                self._finish(s, "stop")
                return True
        end = len(s.text)
        if stops and not final:
            for x in stops:
                for m in range(min(len(x) - 1, len(s.text) - s.sent), 0, -1):
                    if s.text.endswith(x[:m]):
                        end = min(end, len(s.text) - m)
                        break
        self._emit(s, s.text[:end])
        return False

    def _emit(self, s: _Slot, upto: str) -> None:
        if len(upto) > s.sent or s.pending_lp:
            s.req.emit(Delta(upto[s.sent :], s.pending_lp))
            s.sent = len(upto)
            s.pending_lp = []

    def _finish(self, s: _Slot, reason: str, error: Optional[str] = None) -> None:
        if s.done:
            return
        s.done = True
        if s.in_batch:  # its cache is filled (and pooled) when the row is taken out
            self._leave(s, pool=reason != "error")
        elif reason != "error":
            self._to_pool(s.cache)
        if s.pending_lp:
            self._emit(s, s.text[: s.sent])
        s.req.emit(Done(reason, len(s.ids), s.n, s.cached, error))
