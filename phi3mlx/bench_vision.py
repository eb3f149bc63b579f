"""``phi3mlx bench --image``: image encoding, prefill and decode with images, against mlx-vlm.

Both engines get the same inputs: one drawn test image (landscape, so that a row holds several
crops) preprocessed by our processor, the prompt ``<|user|>\\n<|image_1|>\\nDescribe the image.``
in the chat template, greedy decoding of ``gen_tokens`` tokens.

* image encode = vision tower + merge + separators + projector for the image, synchronised;
* prefill = time to the first token (image encoding included), i.e. what a user waits;
* decode tok/s = (gen_tokens - 1) / time from the first token to the last;
* peak memory as in ``phi3mlx bench`` (the engine's weights + what MLX held above them in its run).

Engines alternate between repeats and the best run of each is reported. mlx-vlm (a benchmark-only
extra: ``pip install -e ".[bench-vlm]"``) runs its own phi3_v model on the same folder through its
``generate_step``. Without ``--model`` the benchmark writes a Phi-3-vision-shaped folder with random
weights to a temporary folder: the full CLIP ViT-L/14-336 tower and projector, and a small decoder
(mlx-vlm's phi3_v always builds ViT-L/14-336, so a smaller tower would not load there).

The report also says how far mlx-vlm's image rows are from ours (its sub-crops of a row come out
in another order, see README) and whether the first greedy tokens agree.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image, ImageDraw

from .benchkit import (MemoryWatch, add_ratio_row, best_and_median, engine_table, first_line, fmt, fmt_gb,
                       params_bytes, progress_printer, ratio, ratio_line, report_console, run_alternating,
                       time_stream)
from .errors import Phi3MLXError
from .generate import generate_step
from .loader import load
from .models import build_model, parse_config, place_rows
from .processor import Processor
from .tiny import write_phi3_tokenizer
from .weights import save_weights

MLX_VLM = "mlx-vlm"
OURS = "phi3mlx"
PROMPT = "<|user|>\n<|image_1|>\nDescribe the image.<|end|>\n<|assistant|>\n"


def bench_image(w: int = 1000, h: int = 420, seed: int = 0) -> Image.Image:
    """A drawn landscape picture (two crops per row at 4 crops)."""
    rng = np.random.default_rng(seed)
    small = (rng.random((8, 16, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    d = ImageDraw.Draw(img)
    for i in range(8):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        d.rectangle([x, y, x + 80, y + 50], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        d.text((x + 5, y + 5), f"box {i}", fill=(0, 0, 0))
    return img


def make_bench_folder(out: Path, hidden: int = 1024, layers: int = 4, seed: int = 0) -> Path:
    """A phi3_v folder with random float32 weights: ViT-L/14-336 tower, projector, a small decoder."""
    cfg = {
        "model_type": "phi3_v", "architectures": ["Phi3VForCausalLM"], "vocab_size": 32064, "hidden_size": hidden,
        "intermediate_size": 2 * hidden, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "sliding_window": 4096,
        "tie_word_embeddings": False,
        "img_processor": {"name": "clip_vision_model", "model_name": "openai/clip-vit-large-patch14-336",
                          "image_dim_out": 1024, "num_img_tokens": 144},
        "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                       "use_hd_transform": True, "with_learnable_separator": True},
    }
    model = build_model(parse_config(cfg))
    mx.random.seed(seed)
    flat = {k: v if "norm" in k else mx.random.normal(v.shape) * 0.02  # norms (LayerNorm, RMSNorm) as initialised
            for k, v in tree_flatten(model.parameters())}
    out.mkdir(parents=True, exist_ok=True)
    save_weights(out, flat)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    write_phi3_tokenizer(out)
    (out / "preprocessor_config.json").write_text(
        '{"num_crops": 4, "image_processor_type": "Phi3VImageProcessor", "num_img_tokens": 144}\n')
    return out


class _Engine:
    def __init__(self, name: str, model, encode: Callable, stream: Callable):
        self.name, self.model = name, model
        self.encode, self.stream = encode, stream
        self.weights_bytes = params_bytes(model)
        self.runs: list = []


def _ours(model, inputs) -> _Engine:
    ids = inputs["input_ids"][0].tolist()

    def encode():
        feats = model.encode_images(inputs["pixel_values"], inputs["image_sizes"])
        rows = place_rows([ids], feats)
        mx.eval(rows)
        return rows

    def stream(n):
        rows = encode()
        for tok, _ in generate_step(ids, model, max_tokens=n, image_rows=rows):
            yield tok

    return _Engine(OURS, model, encode, stream)


def _mlx_vlm(path: Path, inputs) -> _Engine:
    try:
        from mlx_vlm.generate.ar import generate_step as vlm_step
        from mlx_vlm.utils import load as vlm_load
    except ImportError:
        raise Phi3MLXError('--compare-mlx-vlm needs mlx-vlm: pip install -e ".[bench-vlm]"') from None
    try:
        model, _ = vlm_load(str(path))
    except Exception as e:  # noqa: BLE001
        raise Phi3MLXError(f"mlx-vlm cannot load {path} ({first_line(e)})") from None
    ids = mx.array(inputs["input_ids"])
    pv = mx.array(inputs["pixel_values"])
    sizes = mx.array(inputs["image_sizes"])

    def encode():
        embeds = model.get_input_embeddings(ids, pv, image_sizes=sizes).inputs_embeds
        mx.eval(embeds)
        return embeds

    def stream(n):
        for tok, _ in vlm_step(ids, model, pv, None, max_tokens=n, temperature=0.0, image_sizes=sizes):
            yield int(tok.item() if hasattr(tok, "item") else tok)

    return _Engine(MLX_VLM, model, encode, stream)


def _timed(e: _Engine, gen_tokens: int) -> dict:
    mx.synchronize()
    t0 = time.perf_counter()
    e.encode()
    encode_s = time.perf_counter() - t0
    with MemoryWatch() as mem:
        toks, t0, t_first, t_end = time_stream(e.stream(gen_tokens), gen_tokens)
    if t_first is None:
        raise Phi3MLXError(f"{e.name} produced no tokens")
    return {"encode_s": encode_s, "prefill_s": t_first - t0,
            "decode_tps": (len(toks) - 1) / max(t_end - t_first, 1e-9) if len(toks) > 1 else None,
            "peak_gb": mem.peak_gb(e.weights_bytes), "tokens": toks}


def run_image_bench(model_path: Optional[str] = None, num_crops: int = 4, gen_tokens: int = 16, repeats: int = 2,
                    compare_mlx_vlm: bool = True, progress: Optional[Callable[[str], None]] = None) -> dict:
    say = progress or (lambda m: None)
    if gen_tokens < 2 or repeats < 1 or num_crops < 1:
        raise Phi3MLXError(f"--gen-tokens must be at least 2, --repeats and --num-crops at least 1 "
                           f"(got {gen_tokens}, {repeats}, {num_crops})")
    tmp = None
    if model_path is None:
        tmp = tempfile.TemporaryDirectory(prefix="phi3mlx-bench-vision-")
        say("writing a random Phi-3-vision-shaped folder (ViT-L/14-336 tower, small decoder)")
        path = make_bench_folder(Path(tmp.name) / "model")
    else:
        path = Path(model_path)
    try:
        say(f"loading {path} (phi3mlx)")
        model, proc = load(str(path))
        if not isinstance(proc, Processor):
            raise Phi3MLXError(f"bench --image needs a vision model folder (phi3_v); {path} is {model.model_type}")
        inputs = proc(PROMPT, [bench_image()], num_crops=num_crops)
        engines = [_ours(model, inputs)]
        if compare_mlx_vlm:
            say(f"loading {path} (mlx-vlm)")
            engines.append(_mlx_vlm(path, inputs))
        for e in engines:
            say(f"warming up {e.name}")
            _timed(e, 2)
        run_alternating(engines, repeats, lambda e: _timed(e, gen_tokens), say)
        rows_diff = None
        if len(engines) == 2:
            ours_rows = np.array(engines[0].encode())
            theirs = np.array(engines[1].encode())[0]
            where = inputs["input_ids"][0] < 0
            rows_diff = float(np.abs(theirs[where] - ours_rows).max())
    finally:
        if tmp is not None:
            tmp.cleanup()
    res = {"path": str(path) if tmp is None else "(random Phi-3-vision-shaped folder)",
           "num_crops": num_crops, "image_sizes": inputs["image_sizes"].tolist(),
           "image_tokens": inputs["num_img_tokens"], "prompt_tokens": int(inputs["input_ids"].shape[1]),
           "gen_tokens": gen_tokens, "repeats": repeats, "device": str(mx.default_device()), "engines": {},
           "rows_max_diff": rows_diff}
    for e in engines:
        res["engines"][e.name] = {
            "encode_s": min(r["encode_s"] for r in e.runs),
            "prefill_s": min(r["prefill_s"] for r in e.runs),
            "decode_tps": best_and_median(r["decode_tps"] for r in e.runs)[0],
            "peak_gb": max(r["peak_gb"] for r in e.runs),
            "tokens": e.runs[0]["tokens"],
        }
    if MLX_VLM in res["engines"]:
        a, b = res["engines"][OURS], res["engines"][MLX_VLM]
        res["ratio_encode"] = ratio(b["encode_s"], a["encode_s"])  # speed ratio: theirs time / ours
        res["ratio_prefill"] = ratio(b["prefill_s"], a["prefill_s"])
        res["ratio_decode"] = ratio(a["decode_tps"], b["decode_tps"])
        res["ratio_memory"] = ratio(a["peak_gb"], b["peak_gb"])
        res["first_token_agrees"] = a["tokens"][:1] == b["tokens"][:1]
    return res


def print_image_report(res: dict, console=None) -> None:
    console = console or report_console()
    console.print(f"model: {res['path']}")
    console.print(f"device: {res['device']}")
    console.print(f"image: padded {res['image_sizes'][0]} with num_crops {res['num_crops']}: {res['image_tokens'][0]} "
                  f"positions; prompt {res['prompt_tokens']} tokens; {res['gen_tokens']} tokens greedily; best of "
                  f"{res['repeats']} run(s) per engine, engines alternating")
    table = engine_table(("engine", "image encode s", "prefill s", "decode tok/s", "peak GB"))
    for name, r in res["engines"].items():
        table.add_row(name, fmt(r["encode_s"], ".3f"), fmt(r["prefill_s"], ".3f"), fmt(r["decode_tps"]),
                      fmt_gb(r["peak_gb"]))
    if "ratio_encode" in res:
        add_ratio_row(table, "ours vs mlx-vlm (speed x; memory ours/theirs)", fmt(res["ratio_encode"], ".2f", "x"),
                      fmt(res["ratio_prefill"], ".2f", "x"), fmt(res["ratio_decode"], ".2f", "x"),
                      fmt(res["ratio_memory"], ".2f", "x"))
    console.print(table)
    if res.get("rows_max_diff") is not None:
        console.print(f"image rows: mlx-vlm differs from ours by up to {res['rows_max_diff']:.3g} "
                      f"(first greedy token {'agrees' if res['first_token_agrees'] else 'differs'})")
    if "ratio_encode" in res:
        console.print(ratio_line("ratio", [("encode", res["ratio_encode"]), ("prefill", res["ratio_prefill"]),
                                           ("decode", res["ratio_decode"]), ("memory", res["ratio_memory"])]))


def main(args, default_model: str) -> None:
    """``phi3mlx bench --image``; without --model (``default_model``, a text model) a random folder is made."""
    model = None if args.model == default_model else args.model
    res = run_image_bench(model, num_crops=args.num_crops or 4, gen_tokens=args.gen_tokens, repeats=args.repeats,
                          compare_mlx_vlm=args.compare_mlx_vlm, progress=progress_printer())
    print_image_report(res)
