"""Phi-3-vision and Phi-3.5-vision parts (model_type "phi3_v"): CLIP tower, HD merge, projector.

The language model is the plain Phi-3 decoder. The image embedding module sits where the checkpoint
has it, ``model.vision_embed_tokens``, with the checkpoint's names:

* ``img_processor.vision_model``: a CLIP ViT (ViT-L/14 at 336 px, quick-GELU, pre-LayerNorm); the
  features are the hidden states after all but the last ``-layer_idx - 1`` encoder layers
  (``hidden_states[-2]``: the last layer is never run), class token dropped.
* 2x2 merge: each crop's 24x24 patch features (C channels) become 12x12 of 4C, the four neighbours
  in (row, column) order along the channels.
* The sub-crops are reassembled into the image's grid (rows of crops, each crop's 12 rows), a
  ``sub_GN`` column appended after every row; then ``glb_GN``; then the global view with ``sub_GN``
  after each of its rows (``hd_transform_order`` "sub_glb").
* ``img_projection``: Linear(4C -> hidden), GELU (exact), Linear(hidden -> hidden): ``.0`` and ``.2``.

The tower's sizes are CLIP ViT-L/14-336's unless config.json carries a ``vision_config`` object (as
mlx-vlm reads it), which is how small test checkpoints describe a smaller tower.

Shapes: n images, K crops (global + sub-crops), S = 336 pixels, P patches per crop (576),
C tower channels (1024), g merged grid side (12), H language-model hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import ModelConfig, Section

CLIP_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu")


@dataclass
class VisionSection(Section):
    """phi3_v's own config fields (``img_processor``, ``embd_layer``, optional ``vision_config``)."""

    image_dim_out: int = 1024
    num_img_tokens: int = 144
    layer_idx: int = -2
    clip: dict = field(default_factory=lambda: dict(CLIP_L14_336))

    @property
    def grid(self) -> int:
        """Merged patches per crop side (12 for ViT-L/14 at 336 px)."""
        return self.clip["image_size"] // self.clip["patch_size"] // 2

    @classmethod
    def parse(cls, cfg: dict, fields: dict, problems: list) -> "VisionSection":
        ip = cfg.get("img_processor")
        el = cfg.get("embd_layer")
        if not isinstance(ip, dict):
            problems.append(f"'img_processor' must be an object (a phi3_v config has one), got {ip!r}")
            ip = {}
        if not isinstance(el, dict):
            problems.append(f"'embd_layer' must be an object (a phi3_v config has one), got {el!r}")
            el = {}
        if ip and ip.get("name", "clip_vision_model") != "clip_vision_model":
            problems.append(f"img_processor.name {ip.get('name')!r} is not supported (expected 'clip_vision_model')")
        if ip and ip.get("type_feature", "patch") != "patch":
            problems.append(f"img_processor.type_feature {ip.get('type_feature')!r} is not supported (expected 'patch')")
        wants = {"use_hd_transform": True, "with_learnable_separator": True, "hd_transform_order": "sub_glb",
                 "projection_cls": "mlp"}
        for k, v in wants.items():
            if el and el.get(k, v) != v:
                problems.append(f"embd_layer.{k} {el.get(k)!r} is not supported (expected {v!r})")
        clip = dict(CLIP_L14_336)
        vc = cfg.get("vision_config")
        if vc is not None and not isinstance(vc, dict):
            problems.append(f"'vision_config' must be an object, got {vc!r}")
        elif vc:
            for k in clip:
                if k in vc and vc[k] is not None:
                    clip[k] = vc[k]
        for k, v in clip.items():
            if k == "layer_norm_eps":
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
            elif k == "hidden_act":
                ok = v == "quick_gelu"
            else:
                ok = isinstance(v, int) and not isinstance(v, bool) and v > 0
            if not ok:
                problems.append(f"vision_config.{k} {v!r} is not supported"
                                + (" (expected 'quick_gelu')" if k == "hidden_act" else " (expected a positive number)"))
        out = cls(clip=clip)
        ok_sizes = all(isinstance(clip[k], int) and clip[k] > 0 for k in
                       ("hidden_size", "num_attention_heads", "image_size", "patch_size", "num_hidden_layers"))
        if ok_sizes:
            if clip["hidden_size"] % clip["num_attention_heads"]:
                problems.append(f"vision_config.hidden_size {clip['hidden_size']} is not divisible by "
                                f"num_attention_heads {clip['num_attention_heads']}")
            side = clip["image_size"] // clip["patch_size"]
            if clip["image_size"] != 336 or clip["image_size"] % clip["patch_size"] or side % 2:
                problems.append(f"vision_config: image_size {clip['image_size']} / patch_size {clip['patch_size']} "
                                "must be 336 px in an even number of patches")
        dim = ip.get("image_dim_out", clip["hidden_size"])
        if dim != clip["hidden_size"]:
            problems.append(f"img_processor.image_dim_out {dim!r} differs from the tower's hidden_size {clip['hidden_size']}")
        out.image_dim_out = clip["hidden_size"]
        layer_idx = ip.get("layer_idx", -2)
        n = clip["num_hidden_layers"] if isinstance(clip["num_hidden_layers"], int) else 0
        if not isinstance(layer_idx, int) or isinstance(layer_idx, bool) or not -n - 1 <= layer_idx <= n:
            problems.append(f"img_processor.layer_idx {layer_idx!r} is outside the tower's {n} layers")
            layer_idx = -2
        out.layer_idx = layer_idx
        if ok_sizes and not problems:
            want = out.grid * out.grid
            got = ip.get("num_img_tokens", want)
            if got != want:
                problems.append(f"img_processor.num_img_tokens {got!r} does not match the tower ({want} per crop)")
            out.num_img_tokens = want
        return out


# ------------------------------------------------------------------------------------ CLIP tower


def quick_gelu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(1.702 * x)


class ClipAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=True)
        self.k_proj = nn.Linear(dim, dim, bias=True)
        self.v_proj = nn.Linear(dim, dim, bias=True)
        self.out_proj = nn.Linear(dim, dim, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, D = x.shape
        # (B, L, D) -> (B, heads, L, D / heads)
        q, k, v = (p(x).reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(B, L, D))


class ClipMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def __call__(self, x):
        return self.fc2(quick_gelu(self.fc1(x)))


class ClipLayer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        d, eps = c["hidden_size"], c["layer_norm_eps"]
        self.self_attn = ClipAttention(d, c["num_attention_heads"])
        self.layer_norm1 = nn.LayerNorm(d, eps=eps)
        self.mlp = ClipMLP(d, c["intermediate_size"])
        self.layer_norm2 = nn.LayerNorm(d, eps=eps)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.layers = [ClipLayer(c) for _ in range(c["num_hidden_layers"])]


class ClipEmbeddings(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        d, p = c["hidden_size"], c["patch_size"]
        self.class_embedding = mx.zeros((d,))
        # MLX layout (out, kh, kw, in); Hugging Face stores (out, in, kh, kw): see maps.py
        self.patch_embedding = nn.Conv2d(c["num_channels"], d, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding((c["image_size"] // p) ** 2 + 1, d)

    def __call__(self, pixels: mx.array) -> mx.array:
        """(N, S, S, 3) channels-last pixels -> (N, 1 + P, C)."""
        x = self.patch_embedding(pixels)  # (N, S/p, S/p, C)
        N, C = x.shape[0], x.shape[-1]
        x = x.reshape(N, -1, C)
        cls = mx.broadcast_to(self.class_embedding.astype(x.dtype), (N, 1, C))
        x = mx.concatenate([cls, x], axis=1)
        return x + self.position_embedding(mx.arange(x.shape[1])).astype(x.dtype)  # (a lookup: it may be quantized)


class ClipVisionTransformer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.embeddings = ClipEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])  # (sic: the checkpoint's name)
        self.encoder = ClipEncoder(c)
        self.post_layernorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])  # unused for features

    def hidden_state(self, pixels: mx.array, layer_idx: int) -> mx.array:
        """``hidden_states[layer_idx]`` of transformers' CLIPVisionModel: index 0 is the embeddings
        after pre_layrnorm, index i the output of encoder layer i."""
        n = len(self.encoder.layers)
        upto = layer_idx if layer_idx >= 0 else n + 1 + layer_idx
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers[:upto]:
            x = layer(x)
        return x


class ClipVisionModel(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.vision_model = ClipVisionTransformer(c)


# ------------------------------------------------------------------------------- image embedding


class ImageEmbedding(nn.Module):
    """``model.vision_embed_tokens``: pixels -> rows of language-model embeddings, one list entry per image."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        sec: VisionSection = cfg.section
        self.layer_idx = sec.layer_idx
        self.g = sec.grid
        C = sec.image_dim_out
        self.img_processor = ClipVisionModel(sec.clip)
        self.glb_GN = mx.zeros((1, 1, 4 * C))
        self.sub_GN = mx.zeros((1, 1, 1, 4 * C))
        self.img_projection = [nn.Linear(4 * C, cfg.hidden_size), nn.GELU(), nn.Linear(cfg.hidden_size, cfg.hidden_size)]

    def crop_features(self, crops: mx.array) -> mx.array:
        """(N, 3, S, S) normalised crops -> merged features (N, g, g, 4C)."""
        dtype = self.img_processor.vision_model.embeddings.patch_embedding.weight.dtype
        x = self.img_processor.vision_model.hidden_state(crops.transpose(0, 2, 3, 1).astype(dtype), self.layer_idx)
        x = x[:, 1:]  # class token dropped: (N, P, C)
        N, P, C = x.shape
        g = self.g
        # (N, 2g, 2g, C) -> (N, g, 2, g, 2, C) -> (N, g, g, 2, 2, C) -> (N, g, g, 4C)
        x = x.reshape(N, g, 2, g, 2, C).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(N, g, g, 4 * C)

    def _with_newlines(self, grid: mx.array) -> mx.array:
        """(rows, cols, 4C) -> (rows * (cols + 1), 4C): sub_GN after every row."""
        R = grid.shape[0]
        sep = mx.broadcast_to(self.sub_GN[0].astype(grid.dtype), (R, 1, grid.shape[-1]))
        return mx.concatenate([grid, sep], axis=1).reshape(-1, grid.shape[-1])

    def __call__(self, pixel_values, image_sizes) -> List[mx.array]:
        """pixel_values (n, K, 3, S, S), image_sizes (n, 2) padded (h, w) -> n arrays (T_i, H).

        Only the crops an image uses go through the tower (the zero padding crops never do)."""
        sizes = np.asarray(image_sizes).reshape(-1, 2).tolist()
        pv = mx.array(pixel_values) if not isinstance(pixel_values, mx.array) else pixel_values
        S = pv.shape[-1]
        used = [1 + (h // S) * (w // S) for h, w in sizes]
        crops = mx.concatenate([pv[i, :k] for i, k in enumerate(used)], axis=0)  # (sum K_i, 3, S, S)
        feats = self.crop_features(crops)
        out, at = [], 0
        g = self.g
        for (h, w), k in zip(sizes, used):
            rows, cols = h // S, w // S
            f = feats[at : at + k]
            at += k
            glb = self._with_newlines(f[0])  # (g * (g + 1), 4C)
            # (rows * cols, g, g, 4C) -> (rows, cols, g, g, 4C) -> (rows, g, cols, g, 4C) -> (rows g, cols g, 4C)
            sub = f[1:].reshape(rows, cols, g, g, -1).transpose(0, 2, 1, 3, 4).reshape(rows * g, cols * g, -1)
            x = mx.concatenate([self._with_newlines(sub), self.glb_GN[0].astype(f.dtype), glb], axis=0)
            for layer in self.img_projection:
                x = layer(x)
            out.append(x)
        return out


def vision_part(cfg: ModelConfig) -> Optional[nn.Module]:
    return ImageEmbedding(cfg)


def place_rows(ids: Sequence[Sequence[int]], per_image: Sequence[mx.array]) -> mx.array:
    """The rows for a prompt's image positions, in prompt order: positions of image N hold id -N.

    ids: (B, L) with negative ids at image positions; per_image[N - 1]: (T_N, H). Returns (sum, H),
    row-major over the batch, which ``Model.__call__`` scatters into the embeddings."""
    order = []
    for row in ids:
        seen = set()
        for t in row:
            if t < 0 and t not in seen:
                seen.add(t)
                order.append(-int(t) - 1)
    return mx.concatenate([per_image[i] for i in order], axis=0) if order else None
