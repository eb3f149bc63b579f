"""Generation, in three layers: ``generate_step`` -> ``stream_generate`` -> ``generate``.

``generate_step`` owns the KV cache, chunked prompt processing and the LongRoPE switch:

LongRoPE models use the short rotary factors while the whole sequence fits in
``original_max_position_embeddings`` (4096 for Phi-3) and the long factors beyond it, for every
position of the pass. A cache filled with short-factor keys is therefore wrong once the sequence
grows past the threshold. When that first happens during decoding, the cache is rebuilt: the whole
sequence so far is processed again with the long factors, so every later token equals what a full
forward pass over the sequence would give (Hugging Face transformers does the same by re-prefilling).
A prompt that is already longer than the threshold is processed with the long factors from the start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Generator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from .errors import Phi3MLXError


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0):
    """logprobs (1, V) -> token (1,). Greedy when temperature is 0."""
    from mlx_lm.sample_utils import make_sampler as _make

    return _make(temp=temperature, top_p=top_p if 0.0 < top_p < 1.0 else 0.0, min_p=min_p, top_k=max(0, top_k))


def make_logits_processors(repetition_penalty: Optional[float] = None, repetition_context_size: int = 20):
    if repetition_penalty is None or repetition_penalty == 1.0:
        return []
    if repetition_penalty <= 0:
        raise Phi3MLXError(f"repetition penalty must be positive, got {repetition_penalty}")
    from mlx_lm.sample_utils import make_repetition_penalty

    return [make_repetition_penalty(repetition_penalty, repetition_context_size)]


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
    for one, lacks some group sizes): tried once per setting on tiny inputs, for decoding (1 query) and
    prefill (3 queries), in the float types models run in. Only "not implemented" answers count."""
    key = (str(mx.default_device()), head_dim, bits, group_size)
    if key not in _KV_PROBED:
        from .models.decoder import quantized_attention

        ok = True
        for dtype in (mx.float32, mx.bfloat16, mx.float16):
            for L in (1, 3):  # 4 query heads sharing 1 quantized KV head, L queries, 3 keys, causal
                k = mx.quantize(mx.ones((1, 1, 3, head_dim), dtype=dtype), group_size=group_size, bits=bits)
                try:
                    mx.eval(quantized_attention(mx.ones((1, 4, L, head_dim), dtype=dtype), k, k, 1.0,
                                                "causal" if L > 1 else None, group_size, bits))
                except (RuntimeError, ValueError) as e:
                    msg = str(e).lower()
                    if "no implementation" in msg or "not supported" in msg or "not implemented" in msg:
                        ok = False
                    else:
                        raise
        _KV_PROBED[key] = ok
    return _KV_PROBED[key]


def _check_prompt(prompt_ids: Sequence[int], model) -> None:
    n = len(prompt_ids)
    if n == 0:
        raise Phi3MLXError("the prompt is empty")
    ctx = model.config.context_length
    if n > ctx:
        raise Phi3MLXError(f"the prompt has {n} tokens but the model's context is {ctx} tokens")


def generate_step(
    prompt_ids: Union[Sequence[int], mx.array],
    model,
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: int = 20,
    seed: Optional[int] = None,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable]] = None,
    cache: Optional[list] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: Optional[int] = None,
    prefill_step_size: int = 2048,
    prompt_progress: Optional[Callable[[int, int], None]] = None,
) -> Generator[Tuple[int, mx.array], None, None]:
    """Yield ``(token_id, logprobs)`` one token at a time, ``max_tokens`` of them.

    Never stops on end tokens (that is ``stream_generate``'s job). ``cache`` may be a cache from
    ``model.make_cache()`` that already holds a prefix; ``prompt_ids`` then continue it.
    ``kv_bits`` (4 or 8) stores the KV cache quantized, with ``kv_group_size`` values per group
    (default 64, or 32 where the head size is not a multiple of 64, as Phi-3's 96).
    """
    ids = [int(t) for t in (prompt_ids.tolist() if isinstance(prompt_ids, mx.array) else prompt_ids)]
    _check_prompt(ids, model)
    if prefill_step_size < 1 or max_tokens < 0:
        raise Phi3MLXError(f"prefill_step_size must be >= 1 and max_tokens >= 0 (got {prefill_step_size}, {max_tokens})")
    if seed is not None:
        mx.random.seed(seed)
    sampler = sampler or make_sampler(temperature, top_p, top_k, min_p)
    processors = list(logits_processors or []) + make_logits_processors(repetition_penalty, repetition_context_size)
    rope = model.config.rope
    if kv_bits is not None:
        kv_group_size = check_kv_quant(model.config.head_dim, kv_bits, kv_group_size)
    if cache is None:
        cache = model.make_cache(kv_bits, kv_group_size)
    elif rope.kind == "longrope" and cache[0].offset and not rope.uses_long(cache[0].offset) and rope.uses_long(
        cache[0].offset + len(ids) + max_tokens
    ):
        # The cached prefix holds short-factor keys and its tokens are not known here, so it could
        # not be re-encoded when the sequence crosses the LongRoPE threshold.
        raise Phi3MLXError(
            f"a cache holding {cache[0].offset} tokens cannot be continued past "
            f"{rope.original_max_position_embeddings} tokens (LongRoPE switch); pass the whole prompt without a cache"
        )
    ctx = model.config.context_length
    progress = prompt_progress or (lambda done, total: None)
    generated: List[mx.array] = []  # tokens fed back so far, kept lazy (shape (1,) each)
    state = {"long": None}

    def prefill(tokens: List[int], long: bool) -> mx.array:
        """Process tokens[:-1] in chunks, return logits (1, V) for the last one."""
        total = len(tokens)
        done = 0
        progress(0, total)
        while total - done > 1:
            n = min(prefill_step_size, total - done - 1)
            model(mx.array(tokens[done : done + n])[None], cache=cache, long_rope=long)
            mx.eval([c.state for c in cache])
            done += n
            progress(done, total)
            mx.clear_cache()
        return model(mx.array(tokens[done:])[None], cache=cache, long_rope=long, last_only=True)[:, -1, :]

    def sample(logits: mx.array) -> Tuple[mx.array, mx.array]:
        if processors:
            hist = mx.concatenate([mx.array(ids)] + generated)
            for p in processors:
                logits = p(hist, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs.squeeze(0)

    def first_step() -> Tuple[mx.array, mx.array]:
        offset = cache[0].offset
        long = rope.uses_long(offset + len(ids))
        state["long"] = long
        return sample(prefill(ids, long))

    def next_step(y: mx.array) -> Tuple[mx.array, mx.array]:
        # y may still be computing: the next step is queued before its value is read.
        generated.append(y)
        total = cache[0].offset + 1
        if rope.uses_long(total) and not state["long"]:
            # Cross the LongRoPE threshold: rebuild the cache with the long factors.
            for c in cache:
                c.keys = c.values = None
                c.offset = 0
            state["long"] = True
            seq = ids + [int(t.item()) for t in generated]
            return sample(prefill(seq, True))
        logits = model(y[None], cache=cache, long_rope=state["long"])[:, -1, :]
        return sample(logits)

    if max_tokens == 0:
        return
    y, logprobs = first_step()
    mx.async_eval(y, logprobs)
    n = 0
    while True:
        if n + 1 < max_tokens and cache[0].offset < ctx:  # room for one more token
            next_y, next_logprobs = next_step(y)
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


@dataclass
class GenerationResponse:
    text: str
    token: Optional[int]
    logprobs: Optional[mx.array]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: Optional[str] = None  # "stop", "length" or None while running


def _prompt_ids(tokenizer, prompt) -> List[int]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise Phi3MLXError("the prompt is empty")
        return tokenizer.encode(prompt)
    if isinstance(prompt, mx.array):
        return [int(t) for t in prompt.tolist()]
    return [int(t) for t in prompt]


def stream_generate(model, tokenizer, prompt, max_tokens: int = 256, **kwargs) -> Generator[GenerationResponse, None, None]:
    """Yield text pieces with their token id and running stats; stop on any end token.

    ``prompt`` is a string (encoded as is: apply the chat template first for chat models) or a
    list of token ids. Other keyword arguments go to ``generate_step``.
    """
    ids = _prompt_ids(tokenizer, prompt)
    detok = tokenizer.detokenizer()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps = 0.0
    n = 0
    for n, (tok, logprobs) in enumerate(generate_step(ids, model, max_tokens=max_tokens, **kwargs), start=1):
        if n == 1:
            prompt_time = time.perf_counter() - tic
            prompt_tps = len(ids) / max(prompt_time, 1e-9)
            tic = time.perf_counter()
        gen_tps = (n - 1) / max(time.perf_counter() - tic, 1e-9) if n > 1 else 0.0
        stats = dict(
            prompt_tokens=len(ids),
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=gen_tps,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
        )
        if tok in tokenizer.stop_ids:
            yield GenerationResponse(detok.finalize(), tok, logprobs, finish_reason="stop", **stats)
            return
        piece = detok.add(tok)
        if n == max_tokens:
            yield GenerationResponse(piece + detok.finalize(), tok, logprobs, finish_reason="length", **stats)
            return
        yield GenerationResponse(piece, tok, logprobs, **stats)
    if n < max_tokens:  # the context filled up
        yield GenerationResponse(detok.finalize(), None, None, len(ids), prompt_tps, n, 0.0,
                                 mx.get_peak_memory() / 1e9, finish_reason="length")


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
        print(format_stats(last))
    return text


def format_stats(r: GenerationResponse) -> str:
    return (
        f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | "
        f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
        f"peak memory: {r.peak_memory_gb:.3f} GB"
    )
