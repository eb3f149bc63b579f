"""The processor of the vision models: a prompt with ``<|image_N|>`` placeholders plus images -> inputs.

As the checkpoints' own ``Phi3VProcessor``: the prompt is split on the placeholders and each text
chunk is tokenized on its own (so a chunk after an image starts with the BOS and the leading-space
marker, as the original gives); placeholder N becomes ``num_img_tokens[N - 1]`` copies of the id -N,
the positions whose embeddings the vision tower supplies. Images are numbered 1..n in the order
given; each must appear exactly once.

``Processor`` also is the model's tokenizer for text-only use (every ``BaseTokenizer`` method is its
tokenizer's), so commands that take a tokenizer take a processor as well.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .config import read_json_object
from .errors import Phi3MLXError
from .image import CLIP_MEAN, CLIP_STD, ImageInput, preprocess
from .tokenizer import BaseTokenizer, StreamingDetokenizer

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
PREPROCESSOR_FILE = "preprocessor_config.json"
DEFAULT_NUM_CROPS = 16  # Phi-3-vision's processor setting; a folder's preprocessor_config.json wins


@dataclass
class ProcessorSettings:
    num_crops: int = DEFAULT_NUM_CROPS
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD

    @classmethod
    def read(cls, folder: Path) -> "ProcessorSettings":
        f = Path(folder) / PREPROCESSOR_FILE
        if not f.exists():
            return cls()
        raw = read_json_object(f)
        problems = []
        n = raw.get("num_crops", DEFAULT_NUM_CROPS)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            problems.append(f"num_crops must be a positive integer, got {n!r}")
        vals = {}
        for k, default in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
            v = raw.get(k, default)
            if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
                problems.append(f"{k} must be three numbers, got {v!r}")
            elif k == "image_std" and any(x <= 0 for x in v):
                problems.append(f"{k} must be positive, got {v!r}")
            else:
                vals[k] = tuple(float(x) for x in v)
        if problems:
            raise Phi3MLXError.many(problems, f"{f}: ")
        return cls(n, vals["image_mean"], vals["image_std"])

    def write(self, folder: Path) -> None:
        (Path(folder) / PREPROCESSOR_FILE).write_text(json.dumps({
            "num_crops": self.num_crops, "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "image_processor_type": "Phi3VImageProcessor", "num_img_tokens": 144}, indent=2) + "\n")


def image_order(text: str, n_images: int) -> list[int]:
    """The image numbers of ``text``'s placeholders in order; every problem named at once."""
    tags = [int(m) for m in IMAGE_TAG.findall(text)]
    problems = []
    dup = sorted({t for t in tags if tags.count(t) > 1})
    if dup:
        problems.append("each image placeholder may appear once: " + ", ".join(f"<|image_{t}|>" for t in dup) + " repeats")
    beyond = sorted({t for t in tags if t < 1 or t > n_images})
    if beyond:
        have = f"only {n_images} image{'s' if n_images != 1 else ''} given" if n_images else "no image given"
        problems.append(", ".join(f"<|image_{t}|>" for t in beyond) + f" in the prompt but {have}")
    unused = [i for i in range(1, n_images + 1) if i not in tags]
    if unused:
        problems.append(", ".join(f"image {i}" for i in unused) + " given but the prompt has no "
                        + ", ".join(f"<|image_{i}|>" for i in unused))
    if problems:
        raise Phi3MLXError.many(problems)
    return tags


def keyed_ids(ids: Sequence[int], keys: Sequence[int]) -> list[int]:
    """The processor's ids with image N's positions (-N) as -keys[N - 1] (ids that name an image's
    content in a cache, or a data set's image table)."""
    return [-keys[-t - 1] if t < 0 else t for t in ids]


class Processor(BaseTokenizer):
    """Text and images -> ``input_ids``, ``pixel_values``, ``image_sizes``, ``num_img_tokens``."""

    def __init__(self, tokenizer: BaseTokenizer, settings: ProcessorSettings = ProcessorSettings(), grid: int = 12):
        self.tokenizer = tokenizer
        self.settings = settings
        self.grid = grid
        self.stop_ids = tokenizer.stop_ids

    def __call__(self, text: str, images: Optional[Sequence[ImageInput]] = None, num_crops: Optional[int] = None) -> dict:
        images = list(images or [])
        image_order(text, len(images))  # placeholder problems before any image is read
        batch = self.preprocess(images, num_crops) if images else None
        ids = self.tokenize(text, batch.num_img_tokens if batch is not None else [])
        out = {"input_ids": np.asarray([ids], dtype=np.int64)}
        if batch is not None:
            out.update(pixel_values=batch.pixel_values, image_sizes=batch.image_sizes, num_img_tokens=batch.num_img_tokens)
        else:
            out.update(pixel_values=None, image_sizes=None, num_img_tokens=[])
        return out

    def preprocess(self, images: Sequence[ImageInput], num_crops: Optional[int] = None):
        """Images -> ``ImageBatch`` (pixel_values, image_sizes, num_img_tokens) with this model's settings."""
        crops = self.settings.num_crops if num_crops is None else num_crops
        return preprocess(images, crops, self.grid, self.settings.image_mean, self.settings.image_std)

    def tokenize(self, text: str, num_img_tokens: Sequence[int]) -> list[int]:
        """The ids of ``text``: each chunk between placeholders tokenized on its own (with the BOS),
        placeholder N as ``num_img_tokens[N - 1]`` copies of -N."""
        order = image_order(text, len(num_img_tokens))
        ids: list[int] = []
        chunks = IMAGE_TAG.split(text)[::2]  # the text between placeholders (split also returns the numbers)
        for k, chunk in enumerate(chunks):
            ids.extend(self.tokenizer.encode(chunk, add_special_tokens=True))
            if k < len(order):
                n = order[k]
                ids.extend([-n] * num_img_tokens[n - 1])
        return ids

    # the tokenizer's interface ------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kw):
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt, tokenize, **kw)

    def convert_tokens_to_ids(self, token):
        return self.tokenizer.convert_tokens_to_ids(token)

    def token_bytes(self, token: int) -> bytes:
        return self.tokenizer.token_bytes(token)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.tokenizer.eos_token_id

    @property
    def bos_token_id(self) -> Optional[int]:
        return self.tokenizer.bos_token_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def detokenizer(self) -> StreamingDetokenizer:
        return self.tokenizer.detokenizer()

    def save(self, folder: Path):
        self.tokenizer.save(folder)
        self.settings.write(folder)
