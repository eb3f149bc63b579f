"""Phi-3-small: tiny f32 checkpoint vs an independent torch reference (dense attention + explicit mask)."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
import torch

from phi3mlx.loader import load_model

REAL = "/work/shared/reference/configs/Phi-3-small-8k-instruct.json"


def tiny_cfg(**kw):
    cfg = json.load(open(REAL))
    cfg.update(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
               ff_intermediate_size=512, torch_dtype="float32")
    cfg.update(kw)
    return cfg


def make_ckpt(tmp_path, cfg, seed=0):
    g = np.random.default_rng(seed)
    H, K, hid = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    D = hid // H
    ff, V = cfg["ff_intermediate_size"], cfg["vocab_size"]
    r = lambda *s, sc=0.05: (g.standard_normal(s) * sc).astype(np.float32)
    w = {"model.embed_tokens.weight": r(V, hid, sc=0.02),
         "model.final_layernorm.weight": 1 + r(hid, sc=0.1), "model.final_layernorm.bias": r(hid)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.update({
            p + "input_layernorm.weight": 1 + r(hid, sc=0.1), p + "input_layernorm.bias": r(hid),
            p + "post_attention_layernorm.weight": 1 + r(hid, sc=0.1), p + "post_attention_layernorm.bias": r(hid),
            p + "self_attn.query_key_value.weight": r((H + 2 * K) * D, hid, sc=0.3),
            p + "self_attn.query_key_value.bias": r((H + 2 * K) * D),
            p + "self_attn.dense.weight": r(hid, H * D), p + "self_attn.dense.bias": r(hid),
            p + "mlp.up_proj.weight": r(2 * ff, hid, sc=0.3), p + "mlp.up_proj.bias": r(2 * ff),
            p + "mlp.down_proj.weight": r(hid, ff), p + "mlp.down_proj.bias": r(hid),
        })
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {k: mx.array(v) for k, v in w.items()})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in w.items()}


def allowed(cfg, T):
    """(H, T, T) bool, straight from the definition."""
    H, bs = cfg["num_attention_heads"], cfg["blocksparse_block_size"]
    loc, vs = cfg["blocksparse_num_local_blocks"], cfg["blocksparse_vert_stride"]
    step = max(1, vs // H)
    m = torch.zeros(H, T, T, dtype=torch.bool)
    p = torch.arange(T)
    qb, kb = (p // bs)[:, None], (p // bs)[None, :]
    for h in range(H):
        hh = 0 if cfg["blocksparse_homo_head_pattern"] else h * step
        m[h] = (qb >= kb) & (((qb - kb) < loc) | ((kb + hh + 1) % vs == 0)) & (p[None, :] <= p[:, None])
    return m


def ref_logits(cfg, w, ids):
    H, K, hid = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    D, G, T = hid // H, H // K, len(ids)
    eps = cfg["layer_norm_epsilon"]
    ln = lambda x, n: torch.nn.functional.layer_norm(x, (hid,), w[n + ".weight"], w[n + ".bias"], eps)
    lin = lambda x, n: x @ w[n + ".weight"].T + w[n + ".bias"]
    x = w["model.embed_tokens.weight"][torch.tensor(ids)] * cfg["mup_embedding_multiplier"]
    inv = 1.0 / cfg["rope_embedding_base"] ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = lambda t: t * cos + torch.cat([-t[..., D // 2:], t[..., :D // 2]], -1) * sin
    sparse = allowed(cfg, T)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = ln(x, p + "input_layernorm")
        qkv = lin(h, p + "self_attn.query_key_value").view(T, K, G + 2, D)
        q = qkv[:, :, :G].reshape(T, H, D).transpose(0, 1)
        k = qkv[:, :, G].transpose(0, 1).repeat_interleave(G, 0)
        v = qkv[:, :, G + 1].transpose(0, 1).repeat_interleave(G, 0)
        q, k = rot(q), rot(k)
        s = q @ k.transpose(1, 2) / (D / cfg["mup_attn_multiplier"])
        dense = (i + 1) % cfg["dense_attention_every_n_layers"] == 0
        s = s.masked_fill(~(causal if dense else sparse), float("-inf"))
        o = (s.softmax(-1) @ v).transpose(0, 1).reshape(T, H * D)
        x = x + lin(o, p + "self_attn.dense")
        u = lin(ln(x, p + "post_attention_layernorm"), p + "mlp.up_proj")
        lim = cfg["gegelu_limit"]
        ag, al = u[..., ::2].clamp(max=lim), u[..., 1::2].clamp(-lim, lim)
        x = x + lin(ag * torch.sigmoid(1.702 * ag) * (al + 1), p + "mlp.down_proj")
    x = ln(x, "model.final_layernorm")
    return (x @ w["model.embed_tokens.weight"].T) / cfg["mup_width_multiplier"]


def test_mask_matches_definition():
    from phi3mlx.models.phi3small import blocksparse_mask
    cfg = tiny_cfg(blocksparse_block_size=4, blocksparse_num_local_blocks=2, blocksparse_vert_stride=3)
    T = 50
    full = allowed(cfg, T).numpy()
    for off, L in [(0, 50), (13, 37), (49, 1), (20, 7)]:
        m = np.array(blocksparse_mask(off, L, 4, 4, 2, 3, False))
        assert (m == full[:, off:off + L, :off + L]).all()


@pytest.mark.parametrize("T,kw", [(1100, {}), (203, dict(blocksparse_block_size=8, blocksparse_num_local_blocks=3))])
def test_parity_and_cache(tmp_path, T, kw):
    cfg = tiny_cfg(**kw)
    w = make_ckpt(tmp_path, cfg)
    model, _ = load_model(tmp_path)
    ids = [int(i) for i in np.random.default_rng(1).integers(0, 100000, T)]
    ref = ref_logits(cfg, w, ids).numpy()
    out = np.array(model(mx.array([ids]))[0])
    err = np.abs(out - ref)[:, :100256].max()
    assert err <= 1e-4, err
    # chunked prefill + decode through the cache
    cache = model.make_cache()
    parts = []
    for a, b in [(0, T // 3), (T // 3, T - 2), (T - 2, T - 1), (T - 1, T)]:
        parts.append(np.array(model(mx.array([ids[a:b]]), cache=cache)[0]))
    err2 = np.abs(np.concatenate(parts) - ref)[:, :100256].max()
    assert err2 <= 1e-4, err2


def test_causality(tmp_path):
    cfg = tiny_cfg(blocksparse_block_size=8, blocksparse_num_local_blocks=2)
    make_ckpt(tmp_path, cfg)
    model, _ = load_model(tmp_path)
    rng = np.random.default_rng(2)
    for T in (1, 9, 64, 131):
        ids = rng.integers(0, 100000, T)
        base = np.array(model(mx.array(ids[None].astype(np.int32)))[0])
        t = T // 2
        ids2 = ids.copy(); ids2[t] = (ids2[t] + 7) % 100000
        out = np.array(model(mx.array(ids2[None].astype(np.int32)))[0])
        assert np.array_equal(base[:t], out[:t])
