"""Image input of the Phi-3 vision models: reading images and the HD dynamic-crop transform.

Pillow and numpy only (no torch at run time). For an image and ``num_crops`` (16 for Phi-3-vision, 4
for multi-frame use of Phi-3.5-vision), as the checkpoints' own processor does:

1. RGB; a portrait image is transposed (so width >= height), handled as landscape, transposed back.
2. The 336-px grid grows while it fits: the largest ``scale`` with ``scale * ceil(scale / ratio) <=
   num_crops`` (ratio = width / height); resized bilinearly (Pillow's, antialiased) to
   ``scale * 336`` wide, height ``int(width / ratio)``, then padded with white to a multiple of 336,
   centred (the odd pixel at the bottom).
3. ``/ 255`` and normalised with the OpenAI CLIP mean/std (float32).
4. The global view is a **bicubic resize of the normalised float tensor** to 336 x 336, as torch's
   ``interpolate(mode="bicubic", align_corners=False)`` computes it (A = -0.75, edge pixels
   repeated, no antialiasing), not Pillow's bicubic.
5. Crops in row-major order, global first, zero-padded to ``num_crops + 1``.

``image_sizes`` are the padded (height, width); the number of positions an image takes in the prompt
is ``image_tokens(h, w)``.
"""

from __future__ import annotations

import io
import math
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import Phi3MLXError

CROP = 336
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_IMAGE_BYTES = 64 * 1024**2  # a downloaded image larger than this is refused

ImageInput = Union[str, os.PathLike, Image.Image]


def read_image(src: ImageInput) -> Image.Image:
    """A Pillow image from a path, an http(s) URL or an image; one-line errors for what cannot be read."""
    if isinstance(src, Image.Image):
        return src
    s = str(src)
    if s.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(s, timeout=30) as r:
                data = r.read(MAX_IMAGE_BYTES + 1)
        except Exception as e:  # URLError, timeouts, HTTP errors
            raise Phi3MLXError(f"cannot download the image {s}: {getattr(e, 'reason', e)}") from None
        if len(data) > MAX_IMAGE_BYTES:
            raise Phi3MLXError(f"the image {s} is larger than {MAX_IMAGE_BYTES // 1024**2} MB")
        return _decode(io.BytesIO(data), s)
    p = Path(s).expanduser()
    if not p.exists():
        raise Phi3MLXError(f"image not found: {s}")
    if p.is_dir():
        raise Phi3MLXError(f"{s} is a folder, not an image")
    return _decode(p, s)


def _decode(f, name: str) -> Image.Image:
    try:
        img = Image.open(f)
        img.load()
    except UnidentifiedImageError:
        raise Phi3MLXError(f"{name}: not an image in a format Pillow reads") from None
    except Image.DecompressionBombError:
        raise Phi3MLXError(f"{name}: the image has too many pixels (Pillow refuses over {2 * Image.MAX_IMAGE_PIXELS})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise Phi3MLXError(f"{name}: unreadable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return img


def _scaled_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(new_w, new_h) of a landscape image (width >= height) before padding."""
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * CROP)
    return new_w, int(new_w / ratio)


def hd_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """The padded (height, width) the HD transform gives an image of ``width`` x ``height``."""
    if width < 1 or height < 1:
        raise Phi3MLXError(f"the image is empty ({width}x{height} pixels)")
    w, h = (height, width) if width < height else (width, height)
    new_w, new_h = _scaled_size(w, h, num_crops)
    padded_h = int(math.ceil(new_h / CROP) * CROP)
    return (new_w, padded_h) if width < height else (padded_h, new_w)


def hd_transform(img: Image.Image, num_crops: int) -> Image.Image:
    """Resize and pad an RGB image to whole 336-px crops (see the module docstring)."""
    width, height = img.size
    if width < 1 or height < 1:
        raise Phi3MLXError(f"the image is empty ({width}x{height} pixels)")
    transposed = width < height
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    new_w, new_h = _scaled_size(*img.size, num_crops)
    if new_h < 1:
        raise Phi3MLXError(f"the image is too narrow ({width}x{height} pixels) for {num_crops} crops")
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    target = int(math.ceil(new_h / CROP) * CROP)
    padded = Image.new("RGB", (new_w, target), (255, 255, 255))
    padded.paste(img, (0, int((target - new_h) / 2)))
    return padded.transpose(Image.Transpose.TRANSPOSE) if transposed else padded


def _cubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix of torch's bicubic interpolation along one axis (align_corners=False,
    A = -0.75, source indices clamped to the edge). The source coordinate is computed in float32, as
    torch computes it for float32 input; the weights and sums in float64."""
    A = -0.75
    scale = np.float32(in_size) / np.float32(out_size)
    m = np.zeros((out_size, in_size), dtype=np.float64)
    for o in range(out_size):
        src = float(np.float32(scale * np.float32(o + 0.5)) - np.float32(0.5))
        i0 = math.floor(src)
        t = src - i0
        ws = (
            ((A * (t + 1) - 5 * A) * (t + 1) + 8 * A) * (t + 1) - 4 * A,
            ((A + 2) * t - (A + 3)) * t * t + 1,
            ((A + 2) * (1 - t) - (A + 3)) * (1 - t) * (1 - t) + 1,
            ((A * (2 - t) - 5 * A) * (2 - t) + 8 * A) * (2 - t) - 4 * A,
        )
        for k, wk in enumerate(ws):
            m[o, min(max(i0 - 1 + k, 0), in_size - 1)] += wk
    return m


def bicubic_resize(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(C, H, W) float -> (C, out_h, out_w) float32, as torch's bicubic interpolate (align_corners=False)."""
    wh = _cubic_weights(x.shape[1], out_h)
    ww = _cubic_weights(x.shape[2], out_w)
    out = np.einsum("oh,chw,pw->cop", wh, x.astype(np.float64), ww, optimize=True)
    return out.astype(np.float32)


def image_tokens(h: int, w: int, grid: int = 12) -> int:
    """Prompt positions of an image padded to (h, w): the sub-crop grid with a separator after each of
    its rows, one separator, the global view with a separator after each row (``grid`` = merged
    patches per crop side: 12 for CLIP ViT-L/14 at 336 px)."""
    rows, cols = h // CROP, w // CROP
    return (rows * cols + 1) * grid * grid + 1 + (rows + 1) * grid


@dataclass
class ImageBatch:
    pixel_values: np.ndarray  # (n_images, num_crops + 1, 3, 336, 336) float32
    image_sizes: np.ndarray  # (n_images, 2) padded (height, width), int64
    num_img_tokens: list  # prompt positions per image


def preprocess(images: Sequence[ImageInput], num_crops: int, grid: int = 12,
               mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> ImageBatch:
    """Images (paths, URLs or Pillow images) -> what the vision tower takes (see the module docstring)."""
    if num_crops < 1:
        raise Phi3MLXError(f"num_crops must be at least 1, got {num_crops}")
    mean32 = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    std32 = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    out = np.zeros((len(images), num_crops + 1, 3, CROP, CROP), dtype=np.float32)
    sizes, tokens = [], []
    for i, src in enumerate(images):
        img = read_image(src).convert("RGB")
        hd = hd_transform(img, num_crops)
        x = np.asarray(hd, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
        x = (x - mean32) / std32  # (3, h, w)
        h, w = x.shape[1:]
        rows, cols = h // CROP, w // CROP
        out[i, 0] = bicubic_resize(x, CROP, CROP)
        # (3, rows, 336, cols, 336) -> (rows, cols, 3, 336, 336): row-major crops
        crops = x.reshape(3, rows, CROP, cols, CROP).transpose(1, 3, 0, 2, 4).reshape(-1, 3, CROP, CROP)
        out[i, 1 : 1 + len(crops)] = crops
        sizes.append((h, w))
        tokens.append(image_tokens(h, w, grid))
    return ImageBatch(out, np.asarray(sizes, dtype=np.int64).reshape(-1, 2), tokens)
