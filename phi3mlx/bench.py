"""``phi3mlx bench``: prefill/decode speed and peak memory, optionally against mlx-lm.

How the numbers are taken (the same for both engines):

* The prompt is ``prompt_tokens`` random token ids from ``numpy.random.default_rng(seed)``; both
  engines get the same ids and decode greedily for ``gen_tokens`` tokens.
* Each engine first runs once untimed (warm-up: the same prompt, 2 tokens).
* Timed runs: ``repeats`` per engine, alternating the order (ours, mlx-lm, mlx-lm, ours, ...) so
  that drift (thermals, other load) hits both alike. Before each run the device is synchronized and
  MLX's buffer cache cleared; after it the generator is closed and the device synchronized again.
* prefill time = time until the first token is available (prompt processing plus one sampling
  step); prefill tok/s = prompt_tokens / prefill time.
* decode tok/s = (gen_tokens - 1) / time from the first token to the last.
* The **best** run of each engine is reported (the median is in ``run_bench``'s result too).
* peak memory = the engine's own weights + the largest extra memory MLX held during its run (KV
  cache, activations). Both engines live in one process, so the raw process peak would also count
  the other engine's weights; that raw peak is kept in the result as ``process_peak_gb``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import mlx.core as mx

from .benchkit import (MLX_LM, OURS, MemoryWatch, add_ratio_row, best_and_median, engine_table, first_line,
                       fmt, fmt_gb, params_bytes, progress_printer, ratio, ratio_line, report_console,
                       run_alternating, time_stream)
from . import kernels
from .chat import Chat
from .errors import Phi3MLXError
from .generate import generate_step
from .hub import resolve
from .loader import load
from .models import read_model_config
from .quant import estimate_memory
from .weights import folder_bytes

WARMUP_TOKENS = 2


def check_bench_args(prompt_tokens: int, gen_tokens: int, repeats: int, context_length: Optional[int] = None) -> None:
    """Raise ``Phi3MLXError`` (one line) for numbers a benchmark cannot run with."""
    problems = []
    if prompt_tokens <= 0:
        problems.append(f"--prompt-tokens must be a positive number, got {prompt_tokens}")
    if gen_tokens <= 0:
        problems.append(f"--gen-tokens must be a positive number, got {gen_tokens}")
    if repeats <= 0:
        problems.append(f"--repeats must be a positive number, got {repeats}")
    if not problems and context_length is not None:
        if prompt_tokens > context_length:
            problems.append(f"--prompt-tokens {prompt_tokens} is longer than the model's context "
                            f"({context_length} tokens)")
        elif prompt_tokens + gen_tokens > context_length:
            problems.append(f"--prompt-tokens {prompt_tokens} + --gen-tokens {gen_tokens} = "
                            f"{prompt_tokens + gen_tokens} tokens do not fit in the model's context "
                            f"({context_length} tokens)")
    if problems:
        raise Phi3MLXError.many(problems)


def random_prompt(n: int, vocab_size: int, seed: int = 0) -> List[int]:
    import numpy as np

    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab_size, size=n)]


# ---------------------------------------------------------------- engines


class _Engine:
    """One model and how to stream greedy tokens from it: ``stream(ids, n) -> iterator of ints``."""

    def __init__(self, name: str, model, stream: Callable[[List[int], int], Iterator[int]], sync_streams=()):
        self.name = name
        self.model = model
        self.stream = stream
        self.weights_bytes = params_bytes(model)
        self.sync_streams = list(sync_streams)
        self.runs: List[dict] = []

    def synchronize(self) -> None:
        mx.synchronize()
        for s in self.sync_streams:
            mx.synchronize(s)


def _ours(model) -> _Engine:
    def stream(ids: List[int], n: int) -> Iterator[int]:
        for tok, _ in generate_step(ids, model, max_tokens=n):
            yield tok

    return _Engine(OURS, model, stream)


def _import_mlx_lm():
    """(mlx_lm.utils, mlx_lm's generate_step, its generation stream); lazy: importing mlx_lm takes seconds."""
    try:
        import mlx_lm.utils
        from mlx_lm.generate import generate_step as mlx_lm_step
        from mlx_lm.generate import generation_stream
    except Exception as e:  # not installed or broken install
        raise Phi3MLXError(f"--compare-mlx-lm needs mlx-lm, which cannot be imported ({first_line(e)})") from None
    return mlx_lm.utils, mlx_lm_step, generation_stream


def _mlx_lm(path: Path) -> _Engine:
    mlx_lm_utils, mlx_lm_step, generation_stream = _import_mlx_lm()
    try:  # the model only: the benchmark feeds token ids, and mlx-lm cannot read every tokenizer (tiktoken)
        model, _config = mlx_lm_utils.load_model(Path(path))
    except Exception as e:
        raise Phi3MLXError(f"mlx-lm cannot load {path} ({first_line(e)})") from None

    def stream(ids: List[int], n: int) -> Iterator[int]:
        prompt = mx.array(ids, dtype=mx.uint32)
        gen = mlx_lm_step(prompt, model, max_tokens=n)  # greedy (argmax) sampler by default
        try:
            for tok, _ in gen:
                yield int(tok)
        finally:
            gen.close()

    return _Engine(MLX_LM, model, stream, sync_streams=[generation_stream])


def _timed_run(engine: _Engine, ids: List[int], gen_tokens: int) -> dict:
    with MemoryWatch(engine.synchronize) as mem:
        tokens, t0, t_first, t_end = time_stream(engine.stream(ids, gen_tokens), gen_tokens)
    if t_first is None:
        raise Phi3MLXError(f"{engine.name} produced no tokens")
    prefill_s = t_first - t0
    decode_s = t_end - t_first
    n_decode = len(tokens) - 1
    return {
        "prefill_s": prefill_s,
        "prefill_tps": len(ids) / max(prefill_s, 1e-9),
        "decode_s": decode_s,
        "decode_tps": n_decode / max(decode_s, 1e-9) if n_decode > 0 else None,
        "peak_gb": mem.peak_gb(engine.weights_bytes),
        "process_peak_gb": mem.process_peak_gb,
        "tokens": tokens,
    }


def _summary(engine: _Engine) -> dict:
    runs = engine.runs
    prefill, prefill_median = best_and_median(r["prefill_tps"] for r in runs)
    decode, decode_median = best_and_median(r["decode_tps"] for r in runs)
    return {
        "prefill_tps": prefill,
        "prefill_tps_median": prefill_median,
        "decode_tps": decode,
        "decode_tps_median": decode_median,
        "peak_gb": max(r["peak_gb"] for r in runs),
        "process_peak_gb": max(r["process_peak_gb"] for r in runs),
        "weights_gb": engine.weights_bytes / 1e9,
        "tokens": runs[0]["tokens"],
        "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs],
    }


# ---------------------------------------------------------------- public API


def run_bench(
    model_path,
    prompt_tokens: int = 512,
    gen_tokens: int = 64,
    repeats: int = 3,
    compare_mlx_lm: bool = False,
    *,
    adapter_path: Optional[str] = None,
    context: Optional[int] = None,
    seed: int = 0,
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Benchmark a model folder (or hub id / ``phi3mlx:tiny``); return the numbers.

    Result keys: ``path``, ``device``, ``disk_bytes``, ``memory_lines``, ``prompt_tokens``, ``gen_tokens``,
    ``repeats``, ``seed``, ``engines`` ({"phi3mlx": {...}, "mlx-lm": {...}}; each with
    ``prefill_tps``, ``decode_tps`` (best of the repeats), their ``*_median``, ``peak_gb``,
    ``process_peak_gb``, ``weights_gb``, ``tokens``, ``runs``), ``ratio_prefill`` and ``ratio_decode``
    (ours / mlx-lm; None without ``compare_mlx_lm``), ``tokens_agree`` (leading greedy tokens the two
    engines agree on) and ``warnings``.
    """
    say = progress or (lambda msg: None)
    check_bench_args(prompt_tokens, gen_tokens, repeats)
    if context is not None and context <= 0:
        raise Phi3MLXError(f"--context must be a positive number, got {context}")
    path = resolve(model_path)
    cfg = read_model_config(path)
    check_bench_args(prompt_tokens, gen_tokens, repeats, cfg.context_length)
    warnings = []
    total = prompt_tokens + gen_tokens
    if cfg.rope.kind == "longrope" and prompt_tokens <= cfg.rope.original_max_position_embeddings < total:
        warnings.append(
            f"prompt + generated tokens cross the LongRoPE threshold "
            f"({cfg.rope.original_max_position_embeddings}): phi3mlx re-processes the sequence with the long "
            "factors during decoding, so its decode time includes that re-prefill")

    say(f"loading {path} (phi3mlx)")
    model, _tok = load(str(path), adapter_path=adapter_path)
    engines = [_ours(model)]
    memory_lines = estimate_memory(model, cfg, context).lines()
    if compare_mlx_lm:
        say(f"loading {path} (mlx-lm)")
        engines.append(_mlx_lm(path))

    ids = random_prompt(prompt_tokens, cfg.vocab_size, seed)

    def run(e: _Engine, n: int) -> dict:
        try:
            return _timed_run(e, ids, n)
        except Phi3MLXError:
            raise
        except Exception as ex:
            if e.name != MLX_LM:
                raise
            raise Phi3MLXError(f"mlx-lm failed while generating ({first_line(ex)})") from None

    kernels.reset_used()
    for e in engines:
        say(f"warming up {e.name}")
        run(e, min(gen_tokens, WARMUP_TOKENS))
    run_alternating(engines, repeats, lambda e: run(e, gen_tokens), say)

    results = {e.name: _summary(e) for e in engines}
    ours, ref = results[OURS], results.get(MLX_LM)
    agree = None
    if ref is not None:
        agree = 0
        for a, b in zip(ours["tokens"], ref["tokens"]):
            if a != b:
                break
            agree += 1
    return {
        "path": str(path),
        "device": str(mx.default_device()),
        "disk_bytes": folder_bytes(path),
        "memory_lines": memory_lines,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "repeats": repeats,
        "seed": seed,
        "engines": results,
        "ratio_prefill": ratio(ours["prefill_tps"], ref["prefill_tps"]) if ref else None,
        "ratio_decode": ratio(ours["decode_tps"], ref["decode_tps"]) if ref else None,
        "tokens_agree": agree,
        "warnings": warnings,
        "kernels": {"backend": kernels.backend(), "enabled": kernels.enabled(), "used": kernels.used()},
    }


def format_ratio_line(res: dict) -> str:
    return ratio_line("ratio", [("prefill", res["ratio_prefill"]), ("decode", res["ratio_decode"])])


def print_report(res: dict, console=None) -> None:
    console = console or report_console()
    console.print(f"model: {res['path']}")
    console.print(f"size on disk: {res['disk_bytes'] / 1e9:.3f} GB")
    console.print(f"device: {res['device']}")
    for line in res["memory_lines"]:
        console.print(f"memory: {line}")
    console.print(f"prompt: {res['prompt_tokens']} random tokens (seed {res['seed']}), generate {res['gen_tokens']} "
                  f"tokens greedily; best of {res['repeats']} run(s) per engine, engines alternating")
    for w in res["warnings"]:
        console.print(f"warning: {w}")
    kinfo = res.get("kernels") or {}
    path = ", ".join(kinfo.get("used") or []) or "none (MLX ops)"
    why = "" if kinfo.get("used") else (" (--no-kernels)" if not kinfo.get("enabled", True) else
                                        "" if kinfo.get("backend") else " (no Metal or CUDA device)")
    console.print(f"phi3mlx custom kernels run: {path}{why}")

    table = engine_table(("engine", "prefill tok/s", "prefill s", "decode tok/s", "peak GB"))
    for name, r in res["engines"].items():
        best_prefill_s = min(x["prefill_s"] for x in r["runs"])
        table.add_row(name, fmt(r["prefill_tps"]), fmt(best_prefill_s, ".3f"), fmt(r["decode_tps"]),
                      fmt_gb(r["peak_gb"]))
    if res["ratio_prefill"] is not None:
        add_ratio_row(table, "ours / mlx-lm", fmt(res["ratio_prefill"], ".2f", "x"), "",
                      fmt(res["ratio_decode"], ".2f", "x"), "")
    console.print(table)
    if res["tokens_agree"] is not None:
        console.print(f"greedy tokens agree: {res['tokens_agree']}/{res['gen_tokens']}")
    # Plain, grep-friendly lines.
    for name, r in res["engines"].items():
        console.print(f"{name} prefill {fmt(r['prefill_tps'])} tok/s decode {fmt(r['decode_tps'])} tok/s "
                      f"peak {fmt_gb(r['peak_gb'])} GB")
    if res["ratio_prefill"] is not None:
        console.print(format_ratio_line(res))


def main(args) -> None:
    """Entry point for ``phi3mlx bench`` (``args`` from the CLI parser)."""
    if args.chat_turns:
        return print_chat_report(run_chat_bench(args.model, turns=args.chat_turns, adapter_path=args.adapter_path))
    if args.window_memory:
        return print_window_report(run_window_bench(args.model, compare_mlx_lm=args.compare_mlx_lm, seed=args.seed,
                                                    adapter_path=args.adapter_path))
    progress = progress_printer()
    res = run_bench(
        args.model,
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        repeats=args.repeats,
        compare_mlx_lm=args.compare_mlx_lm,
        adapter_path=args.adapter_path,
        context=args.context,
        seed=args.seed,
        progress=progress,
    )
    print_report(res)


# ----------------------------------------------------------------- chat turns and window-cache memory


def chat_turn_latency(model, tokenizer, turns: int = 6, words: int = 60, answer_tokens: int = 16,
                      keep_cache: bool = True) -> List[dict]:
    """Time to the first answer token of each turn of a scripted chat with equal-length messages.

    ``keep_cache`` False empties the cache before each turn, so the whole history is processed again
    (how chat worked before it kept its cache), for comparison."""
    chat = Chat(model, tokenizer, max_tokens=answer_tokens)
    vocab = "sea sky river stone light wind field tree cloud road".split()
    rows = []
    for t in range(turns):
        msg = " ".join(vocab[(t * 7 + i) % len(vocab)] for i in range(words))
        if not keep_cache:
            chat.cache.reset()
        first: List[float] = []
        mx.synchronize()
        tic = time.perf_counter()
        chat.ask(msg, lambda piece: first.append(time.perf_counter()) if not first else None)
        last = chat.last
        rows.append(dict(turn=t + 1, ttft_s=(first[0] if first else time.perf_counter()) - tic,
                         prompt_tokens=last.prompt_tokens, processed=last.prompt_tokens - last.cached_tokens))
    return rows


def run_chat_bench(model_path, turns: int = 6, words: int = 60, answer_tokens: int = 16,
                   adapter_path=None) -> dict:
    if turns < 2 or words < 1 or answer_tokens < 1:
        raise Phi3MLXError(f"--chat-turns must be at least 2 (got {turns})")
    model, tokenizer = load(model_path, adapter_path=adapter_path)
    chat_turn_latency(model, tokenizer, 1, words, 2)  # warm-up
    kept = chat_turn_latency(model, tokenizer, turns, words, answer_tokens, keep_cache=True)
    fresh = chat_turn_latency(model, tokenizer, turns, words, answer_tokens, keep_cache=False)
    return dict(path=str(model_path), kept=kept, fresh=fresh,
                last_over_second=kept[-1]["ttft_s"] / kept[1]["ttft_s"],
                fresh_last_over_second=fresh[-1]["ttft_s"] / fresh[1]["ttft_s"])


def print_chat_report(res: dict, console=None) -> None:
    console = console or report_console()
    console.print(f"model: {res['path']}; equal-length user messages; time to the first answer token per turn")
    console.print("columns: prompt tokens, tokens processed with the cache kept, first-token seconds with the "
                  "cache kept, and with the whole history processed again")
    table = engine_table(("turn", "prompt", "processed", "kept s", "re-run s"))
    for k, f in zip(res["kept"], res["fresh"]):
        table.add_row(str(k["turn"]), str(k["prompt_tokens"]), str(k["processed"]), fmt(k["ttft_s"], ".3f"),
                      fmt(f["ttft_s"], ".3f"))
    console.print(table)
    n = len(res["kept"])
    console.print(f"turn {n} / turn 2 first-token time: cache kept {res['last_over_second']:.2f}x, "
                  f"history re-processed {res['fresh_last_over_second']:.2f}x")


def _cache_bytes(cache) -> int:
    total = 0
    for c in cache:
        state = c.state
        arrays = state if isinstance(state, list) else [a for a in state if isinstance(a, mx.array)]
        total += sum(a.nbytes for a in arrays)
    return total


def run_window_bench(model_path, multiples=(1, 2, 4), prompt_tokens: int = 64, compare_mlx_lm: bool = False,
                     seed: int = 0, adapter_path=None) -> dict:
    """KV-cache size and peak memory after generating 1x, 2x and 4x a sliding-window model's window."""
    model, _ = load(model_path, adapter_path=adapter_path)
    cfg = model.config
    W = cfg.sliding_window
    if not W or W >= cfg.context_length:
        raise Phi3MLXError(f"--window-memory needs a model whose sliding window is shorter than its context "
                           f"({resolve(model_path)} has sliding_window {W}, context {cfg.context_length})")
    ids = random_prompt(prompt_tokens, cfg.vocab_size, seed)
    engines = [(OURS, model, model.make_cache, lambda m, c, n: generate_step(ids, m, max_tokens=n, cache=c))]
    if compare_mlx_lm:
        mlx_lm_utils, mlx_lm_step, _ = _import_mlx_lm()
        from mlx_lm.models.cache import make_prompt_cache  # lazy: importing mlx_lm takes seconds

        theirs, _ = mlx_lm_utils.load_model(Path(resolve(model_path)))
        engines.append((MLX_LM, theirs, lambda: make_prompt_cache(theirs),
                        lambda m, c, n: mlx_lm_step(mx.array(ids, dtype=mx.uint32), m, max_tokens=n, prompt_cache=c)))
    rows = []
    for mult in multiples:
        n = mult * W
        if prompt_tokens + n > cfg.context_length:
            break
        row = dict(multiple=mult, tokens=prompt_tokens + n)
        for name, m, make, run in engines:
            cache = make()
            mx.synchronize()
            mx.clear_cache()
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            for _ in run(m, cache, n):
                pass
            mx.synchronize()
            row[name] = dict(cache_mb=_cache_bytes(cache) / 1e6, extra_peak_mb=(mx.get_peak_memory() - base) / 1e6)
        rows.append(row)
    return dict(path=str(model_path), window=W, rows=rows, engines=[e[0] for e in engines])


def print_window_report(res: dict, console=None) -> None:
    console = console or report_console()
    console.print(f"model: {res['path']}; sliding window {res['window']}; greedy generation from a "
                  f"{res['rows'][0]['tokens'] - res['window']}-token prompt")
    cols = ["tokens"]
    for e in res["engines"]:
        cols += [f"{e} KV MB", f"{e} peak MB"]
    table = engine_table(cols)
    for r in res["rows"]:
        cells = [str(r["tokens"])]
        for e in res["engines"]:
            cells += [fmt(r[e]["cache_mb"]), fmt(r[e]["extra_peak_mb"])]
        table.add_row(*cells)
    console.print(table)
    first, last = res["rows"][0], res["rows"][-1]
    for e in res["engines"]:
        console.print(f"{e} KV cache at {last['tokens']} tokens / at {first['tokens']}: "
                      f"{last[e]['cache_mb'] / first[e]['cache_mb']:.2f}x")
