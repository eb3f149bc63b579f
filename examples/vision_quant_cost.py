"""What quantizing the vision tower costs: image rows and logits of a 4-bit folder against float.

    python examples/vision_quant_cost.py [--model FLOAT_VISION_FOLDER] [--bits 4] [--num-crops 4]

Converts the folder twice, ``-q`` (the language model quantized, the vision tower and projector float:
the default) and ``-q --quantize-vision``, and compares each with the float model on one drawn image:
the relative error of the image rows (||rows - float|| / ||float||) and of the last position's logits.
Without ``--model`` it uses a random Phi-3-vision-shaped folder (ViT-L/14-336 tower, small decoder):
random weights say how much quantization noise reaches the decoder, not how answers change.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from phi3mlx.bench_vision import PROMPT, bench_image, make_bench_folder
from phi3mlx.convert.hf_to_mlx import convert
from phi3mlx.loader import load
from phi3mlx.models import place_rows


def outputs(folder: Path, image, num_crops: int):
    model, proc = load(str(folder))
    inputs = proc(PROMPT, [image], num_crops=num_crops)
    feats = model.encode_images(inputs["pixel_values"], inputs["image_sizes"])
    ids = inputs["input_ids"]
    rows = place_rows(ids.tolist(), feats)
    logits = model(mx.array(ids), image_rows=rows, last_only=True)
    return np.array(rows.astype(mx.float32)), np.array(logits.astype(mx.float32))[0, -1]


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a float phi3_v folder (default: a random ViT-L-shaped one)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--num-crops", type=int, default=4)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = Path(a.model) if a.model else make_bench_folder(tmp / "float")
        image = bench_image()
        base_rows, base_logits = outputs(src, image, a.num_crops)
        print(f"model: {a.model or 'random Phi-3-vision-shaped folder'}; {a.bits}-bit, group 64")
        print(f"{'variant':34s} {'image rows rel. err':>20s} {'logits rel. err':>16s} {'top-1 same':>10s}")
        for name, qv in (("-q (vision float)", False), ("-q --quantize-vision", True)):
            out = tmp / name.replace(" ", "_")
            convert(str(src), str(out), quantize=True, q_bits=a.bits, quantize_vision=qv, show_progress=False)
            rows, logits = outputs(out, image, a.num_crops)
            same = int(np.argmax(logits) == np.argmax(base_logits))
            print(f"{name:34s} {rel(rows, base_rows):20.4f} {rel(logits, base_logits):16.4f} {same:10d}")


if __name__ == "__main__":
    main()
