"""Generation, in three layers: ``generate_step`` -> ``stream_generate`` -> ``generate``.

``generate_step`` feeds a prompt through the model in chunks and yields one token at a time; the
KV cache (``phi3mlx.cache``) and the model own everything else. LongRoPE models use the short
rotary factors while the whole sequence fits in ``original_max_position_embeddings`` (4096 for
Phi-3) and the long factors beyond it; when a pass crosses that threshold the model re-encodes the
cached prefix with the long factors (the cache knows its token ids), so every token equals what a
full forward pass over the sequence so far would give.

``make_sampler`` and ``make_logits_processors`` build the sampling parts; a seed gives a
reproducible stream without touching MLX's global random state.

Vision models (phi3_v): ``stream_generate(..., images=[...])`` runs the processor and the vision tower
once (``image_prompt``); the prompt's image positions carry negative ids that name the image's
content (``image_key``), so a cache prefix is reused only where the same images stand, and the
cache keeps the image rows for any re-encode.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Generator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from .cache import ModelCache, common_prefix, image_positions
from .errors import Phi3MLXError
from .models import place_rows
from .processor import IMAGE_TAG, Processor, keyed_ids

Sampler = Callable[[mx.array], mx.array]


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def check_sampling(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> None:
    problems = []
    if not temperature >= 0:
        problems.append(f"temperature must be 0 (greedy) or more, got {temperature}")
    if not 0 <= top_p <= 1:
        problems.append(f"top_p must be in [0, 1], got {top_p}")
    if top_k < 0:
        problems.append(f"top_k must be 0 (off) or more, got {top_k}")
    if not 0 <= min_p <= 1:
        problems.append(f"min_p must be in [0, 1], got {min_p}")
    if problems:
        raise Phi3MLXError.many(problems)


NEG_INF = float("-inf")


def top_k_filter(logprobs: mx.array, k: int) -> mx.array:
    """Keep the k most likely tokens. logprobs (B, V)."""
    if k >= logprobs.shape[-1]:
        return logprobs
    drop = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., k:]
    return mx.put_along_axis(logprobs, drop, mx.array(NEG_INF, logprobs.dtype), axis=-1)


def min_p_filter(logprobs: mx.array, min_p: float) -> mx.array:
    """Drop tokens less likely than min_p times the most likely one."""
    top = logprobs.max(axis=-1, keepdims=True)
    return mx.where(logprobs < top + math.log(min_p), NEG_INF, logprobs)


def top_p_filter(logprobs: mx.array, top_p: float) -> mx.array:
    """Keep the smallest set of most likely tokens holding top_p of the probability (the top one always),
    as a threshold: every token at least as likely as the least likely one of that set (a tie at the
    edge keeps both). logprobs (B, V)."""
    rising = mx.sort(logprobs, axis=-1)  # (B, V), the most likely token last
    below = mx.cumsum(mx.exp(rising.astype(mx.float32)), axis=-1)  # [i]: the mass of the i + 1 least likely
    # tokens, summed in float32 (a bfloat16 sum would lose the small ones)
    dropped = mx.minimum((below <= 1.0 - top_p).sum(axis=-1, keepdims=True), logprobs.shape[-1] - 1)  # (B, 1)
    edge = mx.take_along_axis(rising, dropped, axis=-1)  # (B, 1), the least likely token kept
    return mx.where(logprobs >= edge, logprobs, NEG_INF)


class Sampling:
    """A sampler: logprobs (B, V) -> tokens (B,); greedy when temperature is 0.

    Sampling filters the log-probabilities (top-p, min-p, top-k), divides them by the temperature
    and takes the argmax after adding Gumbel noise: a draw from the softmax, as
    ``mx.random.categorical`` makes it. With a ``seed`` the noise comes from the sampler's own key
    (split once per call), so the same seed gives the same stream and MLX's global random state is
    never touched. The parts are open so a batch of rows can be sampled in one go: rows whose
    ``filters`` are equal are filtered together, each row adds its own ``noise``."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: Optional[int] = None):
        check_sampling(temperature, top_p, top_k, min_p)
        self.temperature = temperature
        self.filters = (top_p if 0.0 < top_p < 1.0 else None, min_p if min_p > 0.0 else None,
                        top_k if top_k > 0 else None)  # equal tuples filter alike
        self._key = mx.random.key(seed) if seed is not None else None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def filter(self, logprobs: mx.array) -> mx.array:
        top_p, min_p, top_k = self.filters
        if top_p is not None:
            logprobs = top_p_filter(logprobs, top_p)
        if min_p is not None:
            logprobs = min_p_filter(logprobs, min_p)
        if top_k is not None:
            logprobs = top_k_filter(logprobs, top_k)
        return logprobs

    def noise(self, shape: tuple) -> mx.array:
        """Standard Gumbel noise of ``shape`` (float32): from the sampler's key, or MLX's global state."""
        if self._key is None:
            return mx.random.gumbel(shape=shape)
        self._key, sub = mx.random.split(self._key)
        return mx.random.gumbel(shape=shape, key=sub)

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self.greedy:
            return greedy(logprobs)
        return mx.argmax(self.filter(logprobs) * (1.0 / self.temperature) + self.noise(logprobs.shape), axis=-1)

    @staticmethod
    def draw(samplers: Sequence["Sampling"], logprobs: mx.array) -> mx.array:
        """Row i of ``logprobs`` (n, V) drawn by ``samplers[i]``, all sampling with equal ``filters``: one
        filter pass for every row, each row's own temperature (in the rows' dtype, rounding as the scalar
        does alone) and noise, so each row gets what ``samplers[i]`` called on it alone gives."""
        inv_t = mx.array([1.0 / m.temperature for m in samplers], dtype=logprobs.dtype)[:, None]
        noise = mx.concatenate([m.noise((1, logprobs.shape[-1])) for m in samplers])
        return mx.argmax(samplers[0].filter(logprobs) * inv_t + noise, axis=-1)


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: Optional[int] = None) -> Sampler:
    """logprobs (B, V) -> tokens (B,). Greedy when temperature is 0 (see ``Sampling``)."""
    return Sampling(temperature, top_p, top_k, min_p, seed)


def make_logits_processors(repetition_penalty: Optional[float] = None, repetition_context_size: int = 20) -> list:
    """Processors (history, logits) -> logits, applied in order before sampling."""
    if repetition_penalty is None or repetition_penalty == 1.0:
        return []
    if repetition_penalty <= 0:
        raise Phi3MLXError(f"repetition penalty must be positive, got {repetition_penalty}")

    def penalize(history: mx.array, logits: mx.array) -> mx.array:
        """Tokens among the last repetition_context_size: positive logits divided by the penalty,
        negative ones multiplied (less likely either way)."""
        recent = history[-repetition_context_size:]
        if recent.size == 0:
            return logits
        seen = mx.take(logits, recent, axis=-1)
        seen = mx.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        logits = mx.array(logits)
        logits[..., recent] = seen
        return logits

    return [penalize]


def _ids(prompt_ids: Union[Sequence[int], mx.array]) -> List[int]:
    return [int(t) for t in (prompt_ids.tolist() if isinstance(prompt_ids, mx.array) else prompt_ids)]


def generate_step(
    prompt_ids: Union[Sequence[int], mx.array],
    model,
    *,
    max_tokens: int = 256,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[List[Callable]] = None,
    cache: Optional[ModelCache] = None,
    prefill_step_size: int = 2048,
    prompt_progress: Optional[Callable[[int, int], None]] = None,
    image_rows: Optional[mx.array] = None,
) -> Generator[Tuple[int, mx.array], None, None]:
    """Yield ``(token_id, logprobs)`` one token at a time, at most ``max_tokens`` of them (fewer only
    when the model's context fills up). Greedy without a ``sampler``.

    Never stops on end tokens (that is ``stream_generate``'s job). ``cache`` (``model.make_cache()``)
    may already hold a prefix: ``prompt_ids`` then continue it, and the cache keeps the new tokens.
    ``image_rows``: the embeddings of the prompt's negative ids (image positions), in order.
    """
    ids = _ids(prompt_ids)
    if not ids:
        raise Phi3MLXError("the prompt is empty")
    if prefill_step_size < 1 or max_tokens < 0:
        raise Phi3MLXError(f"prefill_step_size must be >= 1 and max_tokens >= 0 (got {prefill_step_size}, {max_tokens})")
    n_image = image_positions(ids)
    if n_image != (0 if image_rows is None else image_rows.shape[0]):
        raise Phi3MLXError(f"the prompt has {n_image} image positions but "
                           f"{0 if image_rows is None else image_rows.shape[0]} image rows were given")
    cache = model.make_cache() if cache is None else cache
    ctx = model.config.context_length
    if cache.offset + len(ids) > ctx:
        held = f" (after {cache.offset} cached)" if cache.offset else ""
        raise Phi3MLXError(f"the prompt has {len(ids)} tokens{held} but the model's context is {ctx} tokens")
    sampler = sampler or greedy
    processors = list(logits_processors or [])
    progress = prompt_progress or (lambda done, total: None)
    generated: List[mx.array] = []  # tokens fed back so far, kept lazy (shape (1,) each)
    # what processors see as history: the cached prefix too, so a cache changes nothing about the result
    history = mx.array([t for t in (cache.token_ids if processors and cache.offset else []) + ids
                        if t >= 0])  # image positions (negative ids) are no tokens to penalise

    def sample(logits: mx.array) -> Tuple[mx.array, mx.array]:
        if processors:
            hist = mx.concatenate([history] + generated)
            for p in processors:
                logits = p(hist, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs.squeeze(0)

    def prefill() -> mx.array:
        """Process ids[:-1] in chunks, return logits (1, V) for the last one. The whole prompt takes
        the factor set its full length needs (no re-encoding midway)."""
        long = model.config.rope.uses_long(cache.offset + len(ids))
        progress(0, len(ids))
        head_rows = last_rows = None
        if image_rows is not None:
            k = image_positions(ids[:-1])
            head_rows = image_rows[:k] if k else None
            last_rows = image_rows[k:] if ids[-1] < 0 else None
        cache.extend(model, ids[:-1], prefill_step_size, long, lambda done: progress(done, len(ids)), head_rows)
        return model(mx.array(ids[-1:])[None], cache=cache, long_rope=long, last_only=True,
                     image_rows=last_rows)[:, -1, :]

    if max_tokens == 0:
        return
    y, logprobs = sample(prefill())
    mx.async_eval(y, logprobs)
    n = 0
    while True:
        if n + 1 < max_tokens and cache.offset < ctx:  # room for one more token
            # queue the next step before reading this one (y may still be computing)
            generated.append(y)
            next_y, next_logprobs = sample(model(y[None], cache=cache)[:, -1, :])
            mx.async_eval(next_y, next_logprobs)
        else:
            next_y = next_logprobs = None
        if n == 0:
            mx.eval(y)
            progress(len(ids), len(ids))
        yield int(y.item()), logprobs
        n += 1
        if next_y is None:
            break
        if n % 256 == 0:
            mx.clear_cache()
        y, logprobs = next_y, next_logprobs


def reuse_prefix(model, cache: ModelCache, ids: Sequence[int]) -> List[int]:
    """Keep the part of ``cache`` that ``ids`` start with and return the ids still to process.

    The cache is trimmed to the longest common prefix of its token ids and ``ids`` (at least one id
    is always left to process, for the next token's logits). Used by chat turns and prompt caches.
    """
    held = cache.token_ids
    k = min(common_prefix(held, ids), len(ids) - 1)
    cache.trim(len(held) - k, model)
    return list(ids[k:])


def image_key(pixels: np.ndarray, size) -> int:
    """A positive id (< 2**30) naming an image's content: its preprocessed pixels and padded size."""
    h = zlib.crc32(np.ascontiguousarray(pixels).tobytes())
    h = zlib.crc32(np.asarray(size, dtype=np.int64).tobytes(), h)
    return 1 + h % (2**30 - 1)


@dataclass
class ImagePrompt:
    ids: List[int]  # image positions hold -image_key(image)
    rows: Optional[mx.array]  # (image positions, hidden), in prompt order
    num_img_tokens: List[int]
    seconds: float  # preprocessing and vision tower


def image_prompt(model, processor, prompt: str, images: Sequence, num_crops: Optional[int] = None) -> ImagePrompt:
    """A prompt with ``<|image_N|>`` placeholders and its images -> ids and image rows for the decoder."""
    if not model.takes_images or not isinstance(processor, Processor):
        raise Phi3MLXError(f"this model ({model.model_type}) takes no images")
    tic = time.perf_counter()
    inputs = processor(prompt, images, num_crops=num_crops)
    ids = inputs["input_ids"][0].tolist()
    ctx = model.config.context_length
    if len(ids) > ctx:
        sizes = ", ".join(str(n) for n in inputs["num_img_tokens"])
        raise Phi3MLXError(f"the prompt with its {len(images)} image(s) takes {len(ids)} positions (images: {sizes}) "
                           f"but the model's context is {ctx}; use fewer images or --num-crops")
    rows = None
    if images:
        feats = model.encode_images(inputs["pixel_values"], inputs["image_sizes"])
        rows = place_rows([ids], feats)
        mx.eval(rows)
        keys = [image_key(inputs["pixel_values"][i], inputs["image_sizes"][i]) for i in range(len(images))]
        ids = keyed_ids(ids, keys)
    return ImagePrompt(ids, rows, list(inputs["num_img_tokens"]), time.perf_counter() - tic)


@dataclass
class GenerationResponse:
    text: str
    token: Optional[int]
    logprobs: Optional[mx.array]
    prompt_tokens: int  # the whole prompt, cached prefix included
    prompt_tps: float  # over the prompt tokens actually processed
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: Optional[str] = None  # "stop", "length", "context" (the context is full) or None while running
    cached_tokens: int = 0  # prompt tokens taken from the cache
    image_seconds: float = 0.0  # image preprocessing and vision tower (before the prompt is processed)


def _prompt_ids(tokenizer, prompt) -> List[int]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise Phi3MLXError("the prompt is empty")
        return tokenizer.encode(prompt)
    return _ids(prompt)


def stream_generate(
    model,
    tokenizer,
    prompt,
    max_tokens: int = 256,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: Optional[int] = None,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: int = 20,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[List[Callable]] = None,
    cache: Optional[ModelCache] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: Optional[int] = None,
    prefill_step_size: int = 2048,
    prompt_progress: Optional[Callable[[int, int], None]] = None,
    images: Optional[Sequence] = None,
    num_crops: Optional[int] = None,
    image_rows: Optional[mx.array] = None,
) -> Generator[GenerationResponse, None, None]:
    """Yield text pieces with their token id and running stats; stop on any end token.

    ``prompt`` is a string (encoded as is: apply the chat template first for chat models) or a list
    of token ids. Sampling settings build a sampler unless ``sampler`` is given. With ``cache`` (for
    example a loaded prompt cache), the part of it the prompt starts with is reused and the rest is
    dropped; the cache then holds the prompt and the answer.

    Vision models: ``images`` (paths, URLs or Pillow images) for the prompt's ``<|image_N|>``
    placeholders, ``tokenizer`` being the model's processor (``num_crops`` overrides its setting); or
    an id prompt whose negative ids are image positions with their ``image_rows``.
    """
    image_seconds = 0.0
    if images or (isinstance(prompt, str) and isinstance(tokenizer, Processor) and IMAGE_TAG.search(prompt)):
        if not isinstance(prompt, str):
            raise Phi3MLXError("a prompt with images must be text with <|image_N|> placeholders")
        ip = image_prompt(model, tokenizer, prompt, images, num_crops)
        prompt, image_rows, image_seconds = ip.ids, ip.rows, ip.seconds
    ids = _prompt_ids(tokenizer, prompt)
    if not ids:
        raise Phi3MLXError("the prompt is empty")
    if max_tokens < 0:
        raise Phi3MLXError(f"max_tokens must be 0 or more, got {max_tokens}")
    if max_tokens == 0:
        return
    if sampler is None:
        sampler = make_sampler(temperature, top_p, top_k, min_p, seed)
    processors = list(logits_processors or []) + make_logits_processors(repetition_penalty, repetition_context_size)
    if cache is None:
        cache = model.make_cache(kv_bits, kv_group_size)
    todo = reuse_prefix(model, cache, ids)
    cached = len(ids) - len(todo)
    todo_rows = None
    if image_rows is not None:
        k = image_positions(todo)
        todo_rows = image_rows[image_rows.shape[0] - k :] if k else None
    detok = tokenizer.detokenizer()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps = gen_tps = 0.0
    n = 0
    steps = generate_step(todo, model, max_tokens=max_tokens, sampler=sampler, logits_processors=processors,
                          cache=cache, prefill_step_size=prefill_step_size, prompt_progress=prompt_progress,
                          image_rows=todo_rows)

    def stats() -> dict:
        return dict(prompt_tokens=len(ids), prompt_tps=prompt_tps, generation_tokens=n, generation_tps=gen_tps,
                    peak_memory_gb=mx.get_peak_memory() / 1e9, cached_tokens=cached, image_seconds=image_seconds)

    for n, (tok, logprobs) in enumerate(steps, start=1):
        if n == 1:
            prompt_tps = len(todo) / max(time.perf_counter() - tic, 1e-9)
            tic = time.perf_counter()
        else:
            gen_tps = (n - 1) / max(time.perf_counter() - tic, 1e-9)
        if tok in tokenizer.stop_ids:
            yield GenerationResponse(detok.finalize(), tok, logprobs, finish_reason="stop", **stats())
            return
        piece = detok.add(tok)
        if n == max_tokens:
            yield GenerationResponse(piece + detok.finalize(), tok, logprobs, finish_reason="length", **stats())
            return
        yield GenerationResponse(piece, tok, logprobs, **stats())
    # fewer than max_tokens: the model's context filled up
    yield GenerationResponse(detok.finalize(), None, None, finish_reason="context", **stats())


def generate(model, tokenizer, prompt, max_tokens: int = 256, verbose: bool = False, **kwargs) -> str:
    """Return the completion of ``prompt`` as a string (see ``stream_generate``)."""
    text = ""
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs):
        text += last.text
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print(format_stats(last, model.config.context_length))
    return text


def format_stats(r: GenerationResponse, context: Optional[int] = None) -> str:
    cached = f" ({r.cached_tokens} from the cache)" if r.cached_tokens else ""
    images = f"images: {r.image_seconds:.2f} s | " if r.image_seconds else ""
    line = images + (
        f"prompt: {r.prompt_tokens} tokens{cached}, {r.prompt_tps:.1f} tok/s | "
        f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
        f"peak memory: {r.peak_memory_gb:.3f} GB"
    )
    if r.finish_reason == "context":
        line += f" | stopped: the context{f' of {context} tokens' if context else ''} is full"
    elif r.finish_reason == "length":
        line += " | stopped: --max-tokens reached"
    return line
