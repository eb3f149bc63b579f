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

import statistics
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

from .errors import Phi3MLXError

OURS = "phi3mlx"
MLX_LM = "mlx-lm"
WARMUP_TOKENS = 2


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0].strip() if text else ""
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _params_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


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
        self.weights_bytes = _params_bytes(model)
        self.sync_streams = list(sync_streams)
        self.runs: List[dict] = []

    def synchronize(self) -> None:
        mx.synchronize()
        for s in self.sync_streams:
            mx.synchronize(s)


def _ours(model) -> _Engine:
    from .generate import generate_step

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
        raise Phi3MLXError(f"--compare-mlx-lm needs mlx-lm, which cannot be imported ({_first_line(e)})") from None
    try:  # the model only: the benchmark feeds token ids, and mlx-lm cannot read every tokenizer (tiktoken)
        model, _config = mlx_lm.utils.load_model(Path(path))
    except Exception as e:
        raise Phi3MLXError(f"mlx-lm cannot load {path} ({_first_line(e)})") from None

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
    engine.synchronize()
    mx.clear_cache()
    active0 = mx.get_active_memory()
    mx.reset_peak_memory()
    tokens: List[int] = []
    t_first = None
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
        engine.synchronize()
    process_peak = mx.get_peak_memory()
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
        "peak_gb": (engine.weights_bytes + max(0, process_peak - active0)) / 1e9,
        "process_peak_gb": process_peak / 1e9,
        "tokens": tokens,
    }


def _summary(engine: _Engine) -> dict:
    runs = engine.runs
    decode = [r["decode_tps"] for r in runs if r["decode_tps"] is not None]
    return {
        "prefill_tps": max(r["prefill_tps"] for r in runs),
        "prefill_tps_median": statistics.median(r["prefill_tps"] for r in runs),
        "decode_tps": max(decode) if decode else None,
        "decode_tps_median": statistics.median(decode) if decode else None,
        "peak_gb": max(r["peak_gb"] for r in runs),
        "process_peak_gb": max(r["process_peak_gb"] for r in runs),
        "weights_gb": engine.weights_bytes / 1e9,
        "tokens": runs[0]["tokens"],
        "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs],
    }


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


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
    from phi3mlx.hub import resolve

    from .models import read_model_config
    from .loader import load
    from .quant import estimate_memory
    from .weights import folder_bytes

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
            raise Phi3MLXError(f"mlx-lm failed while generating ({_first_line(ex)})") from None

    for e in engines:
        say(f"warming up {e.name}")
        run(e, min(gen_tokens, WARMUP_TOKENS))
    for i in range(repeats):
        order = engines if i % 2 == 0 else engines[::-1]
        for e in order:
            say(f"run {i + 1}/{repeats}: {e.name}")
            e.runs.append(run(e, gen_tokens))

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
        "ratio_prefill": _ratio(ours["prefill_tps"], ref["prefill_tps"]) if ref else None,
        "ratio_decode": _ratio(ours["decode_tps"], ref["decode_tps"]) if ref else None,
        "tokens_agree": agree,
        "warnings": warnings,
    }


def _fmt(x: Optional[float], spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def format_ratio_line(res: dict) -> str:
    return f"ratio prefill {_fmt(res['ratio_prefill'], '.2f', 'x')} decode {_fmt(res['ratio_decode'], '.2f', 'x')}"


def print_report(res: dict, console=None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False, soft_wrap=True)
    console.print(f"model: {res['path']}")
    console.print(f"size on disk: {res['disk_bytes'] / 1e9:.3f} GB")
    console.print(f"device: {res['device']}")
    for line in res["memory_lines"]:
        console.print(f"memory: {line}")
    console.print(f"prompt: {res['prompt_tokens']} random tokens (seed {res['seed']}), generate {res['gen_tokens']} "
                  f"tokens greedily; best of {res['repeats']} run(s) per engine, engines alternating")
    for w in res["warnings"]:
        console.print(f"warning: {w}")

    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("engine", no_wrap=True)
    table.add_column("prefill tok/s", justify="right", no_wrap=True)
    table.add_column("prefill s", justify="right", no_wrap=True)
    table.add_column("decode tok/s", justify="right", no_wrap=True)
    table.add_column("peak GB", justify="right", no_wrap=True)
    for name, r in res["engines"].items():
        best_prefill_s = min(x["prefill_s"] for x in r["runs"])
        table.add_row(name, _fmt(r["prefill_tps"]), _fmt(best_prefill_s, ".3f"), _fmt(r["decode_tps"]),
                      _fmt(r["peak_gb"], ".3f"))
    if res["ratio_prefill"] is not None:
        table.add_row("ours / mlx-lm", _fmt(res["ratio_prefill"], ".2f", "x"), "",
                      _fmt(res["ratio_decode"], ".2f", "x"), "", style="bold")
    console.print(table)
    if res["tokens_agree"] is not None:
        console.print(f"greedy tokens agree: {res['tokens_agree']}/{res['gen_tokens']}")
    # Plain, grep-friendly lines.
    for name, r in res["engines"].items():
        console.print(f"{name} prefill {_fmt(r['prefill_tps'])} tok/s decode {_fmt(r['decode_tps'])} tok/s "
                      f"peak {_fmt(r['peak_gb'], '.3f')} GB")
    if res["ratio_prefill"] is not None:
        console.print(format_ratio_line(res))


def main(args) -> None:
    """Entry point for ``phi3mlx bench`` (``args`` from the CLI parser)."""
    import sys

    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    progress = (lambda msg: err.print(f"[dim]{msg}…[/dim]")) if sys.stderr.isatty() else None
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
