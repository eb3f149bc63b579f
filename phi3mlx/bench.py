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
                       fmt, params_bytes, progress_printer, ratio, ratio_line, report_console,
                       run_alternating)
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


def _mlx_lm(path: Path) -> _Engine:
    try:
        import mlx_lm
        import mlx_lm.utils
        from mlx_lm.generate import generate_step, generation_stream
    except Exception as e:  # not installed or broken install
        raise Phi3MLXError(f"--compare-mlx-lm needs mlx-lm, which cannot be imported ({first_line(e)})") from None
    try:  # the model only: the benchmark feeds token ids, and mlx-lm cannot read every tokenizer (tiktoken)
        model, _config = mlx_lm.utils.load_model(Path(path))
    except Exception as e:
        raise Phi3MLXError(f"mlx-lm cannot load {path} ({first_line(e)})") from None

    def stream(ids: List[int], n: int) -> Iterator[int]:
        prompt = mx.array(ids, dtype=mx.uint32)
        gen = generate_step(prompt, model, max_tokens=n)  # greedy (argmax) sampler by default
        try:
            for tok, _ in gen:
                yield int(tok)
        finally:
            gen.close()

    return _Engine(MLX_LM, model, stream, sync_streams=[generation_stream])


def _timed_run(engine: _Engine, ids: List[int], gen_tokens: int) -> dict:
    tokens: List[int] = []
    t_first = None
    with MemoryWatch(engine.synchronize) as mem:
        it = engine.stream(ids, gen_tokens)
        t0 = time.perf_counter()
        try:
            for tok in it:
                tokens.append(tok)
                if t_first is None:
                    t_first = time.perf_counter()
                if len(tokens) >= gen_tokens:
                    break
            t_end = time.perf_counter()
        finally:
            it.close()
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

    table = engine_table(("engine", "prefill tok/s", "prefill s", "decode tok/s", "peak GB"))
    for name, r in res["engines"].items():
        best_prefill_s = min(x["prefill_s"] for x in r["runs"])
        table.add_row(name, fmt(r["prefill_tps"]), fmt(best_prefill_s, ".3f"), fmt(r["decode_tps"]),
                      fmt(r["peak_gb"], ".3f"))
    if res["ratio_prefill"] is not None:
        add_ratio_row(table, "ours / mlx-lm", fmt(res["ratio_prefill"], ".2f", "x"), "",
                      fmt(res["ratio_decode"], ".2f", "x"), "")
    console.print(table)
    if res["tokens_agree"] is not None:
        console.print(f"greedy tokens agree: {res['tokens_agree']}/{res['gen_tokens']}")
    # Plain, grep-friendly lines.
    for name, r in res["engines"].items():
        console.print(f"{name} prefill {fmt(r['prefill_tps'])} tok/s decode {fmt(r['decode_tps'])} tok/s "
                      f"peak {fmt(r['peak_gb'], '.3f')} GB")
    if res["ratio_prefill"] is not None:
        console.print(format_ratio_line(res))


def main(args) -> None:
    """Entry point for ``phi3mlx bench`` (``args`` from the CLI parser)."""
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
