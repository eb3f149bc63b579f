"""An independent torch reference for the Phi-3 vision models, written from the definition.

* ``ref_preprocess``: the HD transform and normalisation as the checkpoints' processor does it
  (Pillow bilinear resize, white centred padding, ToTensor, Normalize), the global view through
  ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``, crops row-major.
* ``ref_image_features``: transformers' ``CLIPVisionModel`` (``hidden_states[-2]``, class token
  dropped), the 2x2 merge, sub-crop grid, ``sub_GN`` newlines, ``glb_GN``, the global grid, the
  projector; ``ref_embeds`` puts them into ``Phi3ForCausalLM``'s token embeddings.
* ``make_vision_checkpoint``: a tiny random phi3_v checkpoint in Hugging Face layout.
* Test images the tests draw themselves: a photo-like picture, a screenshot, a palette PNG.
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from .helpers import DATA, tiny_hf_config

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=336,
                 patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)


# --------------------------------------------------------------------------------- test images


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A photo-like picture: smooth colour fields, blurred shapes and sensor noise."""
    rng = np.random.default_rng(seed)
    small = (rng.random((max(2, h // 40), max(2, w // 40), 3)) * 255).astype(np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(3, max(4, min(w, h) // 3)))
        d.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    arr = np.asarray(img).astype(np.int16) + rng.integers(-8, 9, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def screenshot(w: int, h: int) -> Image.Image:
    """A screenshot-like picture: window bars, text lines, buttons on white."""
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, w, 28], fill=(40, 44, 52))
    for i, y in enumerate(range(40, h - 20, 22)):
        d.text((12, y), f"line {i}: the quick brown fox {i * 7}", fill=(20, 20, 20))
    d.rectangle([w - 110, h - 40, w - 10, h - 10], fill=(0, 120, 215), outline=(0, 0, 0))
    return img


def palette_png(path: Path, w: int = 257, h: int = 190) -> Path:
    img = photo(w, h, seed=5).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.save(path)
    return path


# --------------------------------------------------------------------------------- preprocessing


def ref_hd_transform(img: Image.Image, hd_num: int) -> Image.Image:
    width, height = img.size
    trans = width < height
    if trans:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        width, height = img.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    img = img.resize([new_w, new_h], Image.Resampling.BILINEAR)
    tar = int(np.ceil(new_h / 336) * 336)
    top = int((tar - new_h) / 2)
    img = ImageOps.expand(img, border=(0, top, 0, tar - new_h - top), fill=(255, 255, 255))
    if trans:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    return img


def ref_preprocess(torch, images, num_crops: int):
    """-> pixel_values (n, num_crops + 1, 3, 336, 336), image_sizes [[h, w]], num_img_tokens."""
    F = torch.nn.functional
    mean = torch.tensor(MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(STD, dtype=torch.float32)[:, None, None]
    out, sizes, tokens = [], [], []
    for img in images:
        hd = ref_hd_transform(img.convert("RGB"), num_crops)
        t = torch.from_numpy(np.array(hd)).permute(2, 0, 1).contiguous().float().div(255)
        t = (t - mean) / std
        glob = F.interpolate(t[None], size=(336, 336), mode="bicubic", align_corners=False)
        h, w = t.shape[1:]
        crops = t.reshape(1, 3, h // 336, 336, w // 336, 336).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, 336, 336)
        allc = torch.cat([glob, crops], 0)
        pad = torch.zeros(num_crops + 1 - allc.shape[0], 3, 336, 336)
        out.append(torch.cat([allc, pad], 0))
        sizes.append([h, w])
        tokens.append(int((h // 336 * w // 336 + 1) * 144 + 1 + (h // 336 + 1) * 12))
    return torch.stack(out), sizes, tokens


# --------------------------------------------------------------------------------- the model


def vision_config(name: str = "Phi-3-vision-128k-instruct", **overrides) -> dict:
    cfg = tiny_hf_config(name, **overrides)
    cfg["vision_config"] = dict(CLIP_TINY)
    cfg["img_processor"] = dict(cfg["img_processor"], image_dim_out=CLIP_TINY["hidden_size"])
    return cfg


def write_vision_tokenizer(folder: Path) -> None:
    src = DATA / "vision"
    with gzip.open(src / "tokenizer.json.gz", "rb") as f, open(folder / "tokenizer.json", "wb") as g:
        shutil.copyfileobj(f, g)
    for n in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / n, folder / n)


class RefVision:
    """The torch modules of a tiny phi3_v checkpoint and the reference forward."""

    def __init__(self, torch, transformers, cfg: dict, seed: int = 0):
        self.torch = torch
        torch.manual_seed(seed)
        lm_cfg = {k: v for k, v in cfg.items() if k not in ("img_processor", "embd_layer", "vision_config", "model_type")}
        rs = dict(lm_cfg["rope_scaling"])
        rs["type"] = "longrope"  # transformers' name for "su"
        lm_cfg["rope_scaling"] = rs
        self.lm = transformers.Phi3ForCausalLM(transformers.Phi3Config(**lm_cfg)).eval()
        vc = cfg["vision_config"]
        self.clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vc)).eval()
        C, H = vc["hidden_size"], cfg["hidden_size"]
        nn = torch.nn
        self.proj = nn.Sequential(nn.Linear(4 * C, H), nn.GELU(), nn.Linear(H, H)).eval()
        with torch.no_grad():  # large enough to matter next to the token embeddings
            for p in self.proj.parameters():
                p.normal_(0, 0.3)
        self.glb_GN = torch.randn(1, 1, 4 * C)
        self.sub_GN = torch.randn(1, 1, 1, 4 * C)
        self.C = C

    def state_dict(self) -> dict:
        sd = {k: v for k, v in self.lm.state_dict().items()}
        pre = "model.vision_embed_tokens."
        for k, v in self.clip.state_dict().items():  # the checkpoint's names: img_processor.vision_model.*
            if not k.endswith("position_ids"):
                sd[pre + "img_processor.vision_model." + k.removeprefix("vision_model.")] = v
        for k, v in self.proj.state_dict().items():
            sd[pre + "img_projection." + k] = v
        sd[pre + "glb_GN"] = self.glb_GN
        sd[pre + "sub_GN"] = self.sub_GN
        return {k: v.contiguous() for k, v in sd.items()}

    def save(self, folder: Path, cfg: dict, num_crops: int = 4) -> Path:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(cfg, indent=1))
        pp = json.loads((DATA / "vision" / "preprocessor_config.json").read_text())
        pp["num_crops"] = num_crops
        (folder / "preprocessor_config.json").write_text(json.dumps(pp))
        write_vision_tokenizer(folder)
        return folder

    def merge(self, feats, h_crop: int, w_crop: int):
        """(N, 576, C) -> (n_img, h_crop * 12, w_crop * 12, 4C), the 2x2 merge and grid reassembly."""
        N, L, C = feats.shape
        H = int(math.isqrt(L))
        n = N // (h_crop * w_crop)
        return (feats.reshape(N, H, H, C).reshape(N, H // 2, 2, H // 2, 2, C).permute(0, 1, 3, 2, 4, 5)
                .reshape(N, -1, 4 * C).reshape(n, h_crop, w_crop, H // 2, H // 2, -1).permute(0, 1, 3, 2, 4, 5)
                .reshape(n, h_crop * H // 2, w_crop * H // 2, 4 * C))

    def newline(self, x):
        n, h, w, d = x.shape
        return self.torch.cat([x, self.sub_GN.expand(n, h, -1, -1)], dim=2).reshape(n, -1, d)

    def image_features(self, pixel_values, image_sizes) -> list:
        """One (T_i, hidden) tensor per image."""
        torch = self.torch
        with torch.no_grad():
            n, K = pixel_values.shape[:2]
            hs = self.clip(pixel_values.flatten(0, 1), output_hidden_states=True).hidden_states[-2][:, 1:]
            feats = hs.reshape(n, K, -1, self.C)
            glb = self.newline(self.merge(feats[:, 0], 1, 1))
            out = []
            for i, (h, w) in enumerate(image_sizes):
                hc, wc = h // 336, w // 336
                sub = self.newline(self.merge(feats[i, 1 : 1 + hc * wc], hc, wc))
                x = torch.cat([sub.squeeze(0), self.glb_GN.squeeze(0), glb[i]], 0)
                out.append(self.proj(x))
            return out

    def embeds(self, ids, features: list):
        """Token embeddings with the image features at the positions of -N, image N's in order."""
        torch = self.torch
        with torch.no_grad():
            t = torch.tensor(ids)
            e = self.lm.model.embed_tokens(t.clamp_min(0))
            for k, f in enumerate(features):
                pos = (t == -(k + 1)).nonzero(as_tuple=True)
                e[pos] = f
            return e

    def logits(self, embeds):
        with self.torch.no_grad():
            return self.lm(inputs_embeds=embeds).logits.numpy()

    def greedy(self, embeds, n: int) -> list:
        torch = self.torch
        out = []
        with torch.no_grad():
            for _ in range(n):
                nxt = int(self.lm(inputs_embeds=embeds).logits[0, -1].argmax())
                out.append(nxt)
                embeds = torch.cat([embeds, self.lm.model.embed_tokens(torch.tensor([[nxt]]))], 1)
        return out
