"""Phi-3-small: tiny f32 checkpoint vs an independent torch reference (dense attention + explicit mask)."""

import itertools
import math

import mlx.core as mx
import numpy as np
import pytest

from phi3mlx.loader import load_model

from .helpers import PHI3_SMALL as REAL  # the real config the tiny checkpoints shrink
from .helpers import make_phi3small_ckpt, reference_config
from .helpers import phi3small_cfg as tiny_cfg


def _torch():
    """torch for the independent reference (imported where a test needs it, so the others run without it)."""
    return pytest.importorskip("torch", reason="torch is needed for the independent Phi-3-small reference")


def make_ckpt(tmp_path, cfg, seed=0, qkv_scale=0.3):
    """Write the checkpoint; return its weights as float64 torch tensors (for ref_logits)."""
    w = make_phi3small_ckpt(tmp_path, cfg, seed, qkv_scale)
    torch = _torch()
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in w.items()}


def allowed(cfg, T):
    """(H, T, T) bool, straight from the definition."""
    H, bs = cfg["num_attention_heads"], cfg["blocksparse_block_size"]
    loc, vs = cfg["blocksparse_num_local_blocks"], cfg["blocksparse_vert_stride"]
    step = max(1, vs // H)
    torch = _torch()
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
    torch = _torch()
    eps = cfg["layer_norm_epsilon"]
    ln = lambda x, n: torch.nn.functional.layer_norm(x, (hid,), w[n + ".weight"], w[n + ".bias"], eps)
    lin = lambda x, n: x @ w[n + ".weight"].T + w[n + ".bias"]
    x = w["model.embed_tokens.weight"][torch.tensor(ids)] * cfg["mup_embedding_multiplier"]
    inv = 1.0 / cfg["rope_embedding_base"] ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    pos = torch.arange(T, dtype=torch.float64)
    mscale = 1.0
    rs = cfg.get("rope_scaling")
    if rs:  # LongRoPE: the factor set and mscale chosen by the whole sequence's length
        orig = rs["original_max_position_embeddings"]
        if T > orig:
            factors = rs["long_factor"]
            mscale = rs.get("long_mscale", -1)
            if mscale <= 0:
                mscale = math.sqrt(1 + math.log(cfg["max_position_embeddings"] / orig) / math.log(orig))
        else:
            factors, mscale = rs["short_factor"], rs.get("short_mscale", -1)
            mscale = mscale if mscale > 0 else 1.0
        inv = inv / torch.tensor(factors, dtype=torch.float64)
    else:
        pos = pos * cfg.get("rope_position_scale", 1.0)
    ang = pos[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1) * mscale, torch.cat([ang.sin()] * 2, -1) * mscale
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


@pytest.mark.parametrize("T,kw", [
    (1100, dict(vocab_size=4096)),  # beyond the 1024-token local window, not a multiple of 64
    (203, dict(blocksparse_block_size=8, blocksparse_num_local_blocks=3)),
    (203, dict(blocksparse_block_size=8, blocksparse_num_local_blocks=3, blocksparse_homo_head_pattern=True)),
    (203, dict(blocksparse_block_size=8, blocksparse_num_local_blocks=5, blocksparse_vert_stride=3)),
])
def test_parity_and_cache(tmp_path, T, kw):
    cfg = tiny_cfg(**kw)
    w = make_ckpt(tmp_path, cfg)
    model, _ = load_model(tmp_path)
    V = cfg["vocab_size"]
    ids = [int(i) for i in np.random.default_rng(1).integers(0, min(V, 100000), T)]
    ref = ref_logits(cfg, w, ids).numpy()
    out = np.array(model(mx.array([ids]))[0])
    err = np.abs(out - ref)[:, :100256].max()
    assert err <= 1e-4, err
    if V == 100352:  # the never-trained ids are the float32 minimum
        from phi3mlx.models.phi3small import DUMMY_TOKEN_IDS
        assert (out[:, DUMMY_TOKEN_IDS] == np.finfo(np.float32).min).all()
        assert (out[:, [100257, 100261, 100262, 100263, 100266]] > -1e6).all()  # real special tokens stay
    # chunked prefill + decode through the cache
    cache = model.make_cache()
    parts = []
    for a, b in [(0, T // 3), (T // 3, T - 2), (T - 2, T - 1), (T - 1, T)]:
        parts.append(np.array(model(mx.array([ids[a:b]]), cache=cache)[0]))
    err2 = np.abs(np.concatenate(parts) - ref)[:, :100256].max()
    assert err2 <= 1e-4, err2


def _longrope(D, orig, mscales=True, seed=3):
    g = np.random.default_rng(seed)
    rs = {"type": "su", "original_max_position_embeddings": orig,
          "short_factor": [float(x) for x in g.uniform(1, 2, D // 2)],
          "long_factor": [float(x) for x in g.uniform(2, 8, D // 2)]}
    if mscales:
        rs.update(short_mscale=1.0, long_mscale=1.1902380714238083)  # Phi-3-small-128k's values
    return rs


@pytest.mark.parametrize("mscales", [True, False])
@pytest.mark.parametrize("T", [100, 300])  # short regime (<= 128) and long regime
def test_longrope_short_and_long_regimes(tmp_path, T, mscales):
    cfg = tiny_cfg(blocksparse_block_size=8, blocksparse_num_local_blocks=3, max_position_embeddings=4096,
                   rope_scaling=_longrope(64, 128, mscales))
    w = make_ckpt(tmp_path, cfg)
    model, mcfg = load_model(tmp_path)
    assert mcfg.rope.kind == "longrope" and mcfg.rope.original_max_position_embeddings == 128
    ids = [int(i) for i in np.random.default_rng(4).integers(0, 100000, T)]
    ref = ref_logits(cfg, w, ids).numpy()
    out = np.array(model(mx.array([ids]))[0])
    err = np.abs(out - ref)[:, :100256].max()
    assert err <= 1e-4, err


@pytest.mark.slow
def test_longrope_greedy_generation_crosses_threshold(tmp_path):
    """A 120-token prompt and 16 new tokens cross 128: generate rebuilds the cache with the long factors."""
    from phi3mlx.generate import generate_step
    cfg = tiny_cfg(blocksparse_block_size=8, blocksparse_num_local_blocks=3, max_position_embeddings=4096,
                   rope_scaling=_longrope(64, 128))
    w = make_ckpt(tmp_path, cfg)
    model, _ = load_model(tmp_path)
    ids = [int(i) for i in np.random.default_rng(5).integers(0, 100000, 120)]
    got = [t for t, _ in generate_step(ids, model, max_tokens=16, prefill_step_size=50)]
    want, seq = [], list(ids)
    for _ in range(16):
        nxt = int(ref_logits(cfg, w, seq)[-1, :100256].argmax())
        want.append(nxt)
        seq.append(nxt)
    assert got == want


def test_rope_position_scale(tmp_path):
    cfg = tiny_cfg(blocksparse_block_size=8, blocksparse_num_local_blocks=3, rope_position_scale=0.25)
    w = make_ckpt(tmp_path, cfg)
    model, _ = load_model(tmp_path)
    ids = [int(i) for i in np.random.default_rng(6).integers(0, 100000, 150)]
    ref = ref_logits(cfg, w, ids).numpy()
    ref_unscaled = ref_logits(dict(cfg, rope_position_scale=1.0), w, ids).numpy()
    out = np.array(model(mx.array([ids]))[0])
    assert np.abs(out - ref)[:, :100256].max() <= 1e-4
    assert np.abs(out - ref_unscaled)[:, :100256].max() > 1e-2  # the scale matters


def test_real_128k_rope_settings_and_problems():
    from phi3mlx.models import parse_config
    from phi3mlx.errors import Phi3MLXError
    cfg = reference_config(REAL)
    cfg.update(max_position_embeddings=131072, rope_scaling=_longrope(128, 8192))
    rope = parse_config(cfg).rope
    assert rope.kind == "longrope" and rope.original_max_position_embeddings == 8192
    assert (rope.factor_for(False), rope.factor_for(True)) == (1.0, 1.1902380714238083)
    assert not rope.uses_long(8192) and rope.uses_long(8193)
    cfg["rope_scaling"] = _longrope(128, 8192, mscales=False)  # mscale from the lengths, as the reference
    rope = parse_config(cfg).rope
    assert rope.factor_for(False) == 1.0
    assert rope.factor_for(True) == pytest.approx(math.sqrt(1 + math.log(16) / math.log(8192)))
    cfg["rope_position_scale"] = 2.0
    cfg["rope_scaling"]["long_mscale"] = "big"
    with pytest.raises(Phi3MLXError) as e:
        parse_config(cfg)
    assert "rope_position_scale" in str(e.value) and "long_mscale" in str(e.value)


@pytest.mark.parametrize("bits,bound", [(8, 0.9995), (4, 0.97)])  # measured 0.99993 and 0.982
def test_quantized_kv_cache(tmp_path, bits, bound):
    """--kv-bits on phi3small: per-head blocksparse masks over quantized keys, close to the float cache
    (as close as with every layer dense: the masks add no error)."""
    from phi3mlx.generate import generate_step
    cfg = tiny_cfg(blocksparse_block_size=8, blocksparse_num_local_blocks=3)
    make_phi3small_ckpt(tmp_path, cfg, qkv_scale=0.1)  # 0.3 makes attention so peaky that 4-bit keys flip it
    model, _ = load_model(tmp_path)
    ids = [int(i) for i in np.random.default_rng(7).integers(0, 100000, 150)]
    forced = [int(i) for i in np.random.default_rng(8).integers(0, 100000, 30)]

    def run(cache):
        out = [np.array(model(mx.array([ids[:77]]), cache=cache)[0]), np.array(model(mx.array([ids[77:]]), cache=cache)[0])]
        out += [np.array(model(mx.array([[t]]), cache=cache)[0]) for t in forced]
        return np.concatenate(out)[:, :100256]

    ref, got = run(model.make_cache()), run(model.make_cache(kv_bits=bits))
    cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
    assert cos.min() >= bound, cos.min()
    toks = [t for t, _ in generate_step(ids, model, max_tokens=8, cache=model.make_cache(kv_bits=bits))]
    assert len(toks) == 8


CAUSAL_LENGTHS = [1, 2, 63, 64, 65, 127, 129, 511, 1000, 1023, 1024, 1025, 1087, 1100, 1601, 2049, 2100]


@pytest.mark.slow
def test_causality_sweep(tmp_path):
    """Real block settings (64-token blocks, 16 local blocks, stride 8): changing token t changes no
    logit at a position < t, one-shot and in chunked prefill, and does change later positions."""
    make_phi3small_ckpt(tmp_path, tiny_cfg(vocab_size=2048))  # layer 0 blocksparse, layer 1 dense
    model, _ = load_model(tmp_path)
    rng = np.random.default_rng(2)
    for T in CAUSAL_LENGTHS:
        ids = rng.integers(0, 2048, T).astype(np.int32)
        base = np.array(model(mx.array(ids[None]))[0])
        # the last token, and one just before a block boundary (or a random one for short prompts)
        for t in sorted({T - 1, (T // 64) * 64 - 1 if T > 64 else int(rng.integers(0, T))}):
            ids2 = ids.copy()
            ids2[t] = (ids2[t] + 7) % 2048
            out = np.array(model(mx.array(ids2[None]))[0])
            assert np.array_equal(base[:t], out[:t]), (T, t)
            assert np.abs(base[t:] - out[t:]).max() > 1e-3, (T, t)
        if T in (1100, 2100):  # chunked prefill (chunks not multiples of 64) equals one shot
            cache = model.make_cache()
            bounds = [0, 100, 801, T - 1, T]
            parts = [np.array(model(mx.array(ids[None, a:b]), cache=cache)[0]) for a, b in zip(bounds, bounds[1:])]
            assert np.abs(np.concatenate(parts) - base).max() <= 1e-4, T


def _effective_mask(H, K, bs, local, vert, homo, offset, L, bits=None, chunk_blocks=None):
    """The mask Blocksparse._blocksparse really applies, read off its output: with zero queries every
    allowed key gets the same weight, and value j = one-hot(j) makes row (h, i) = allowed[h, i] / count."""
    from types import SimpleNamespace

    from phi3mlx.models.phi3small import Blocksparse, Phi3SmallSection

    T = offset + L
    D = -(-T // 64) * 64  # one value dimension per key, padded to the quantization group
    q = mx.zeros((1, H, L, D))
    eye = mx.concatenate([mx.eye(T), mx.zeros((T, D - T))], axis=1)
    kv = mx.broadcast_to(eye[None, None], (1, K, T, D))
    cache = None
    if bits:
        kv = tuple(mx.quantize(kv, group_size=64, bits=bits))
        cache = SimpleNamespace(group_size=64, bits=bits)
    me = Blocksparse(Phi3SmallSection(block_size=bs, local_blocks=local, vert_stride=vert, homo_head=homo), H, K)
    me.chunk_blocks = chunk_blocks
    o = me._blocksparse(q, kv, kv, offset, 1.0, cache)
    return np.array(o[0, :, :, :T]) > 1e-3


@pytest.mark.parametrize("chunk_blocks", [1, 3, 7, 64])
def test_any_prefill_chunk_gives_the_definition(chunk_blocks):
    """The prefill's query chunk (a whole number of blocks, from one to more than the prompt) changes
    only how the work is cut, never which keys a query sees."""
    for bs, local, vert, (H, K) in [(4, 2, 3, (4, 2)), (8, 5, 8, (6, 2))]:
        T = 6 * bs * local + 13
        cfg = dict(num_attention_heads=H, blocksparse_block_size=bs, blocksparse_num_local_blocks=local,
                   blocksparse_vert_stride=vert, blocksparse_homo_head_pattern=False)
        full = allowed(cfg, T).numpy()
        for offset, L in [(0, T), (bs * local + 3, T - bs * local - 3)]:
            got = _effective_mask(H, K, bs, local, vert, False, offset, L, chunk_blocks=chunk_blocks)
            assert (got == full[:, offset:T, :T]).all(), (bs, local, vert, H, K, offset, L)


@pytest.mark.slow
def test_effective_mask_equals_definition_over_a_grid():
    """The chunked path (near band masked, far vertical blocks gathered per head), the decode path and the
    short path, for block sizes, local windows, strides (dividing the heads or not, above and below their
    number), GQA groups of 1 to 3, the homo-head pattern, any offset, float and 8-bit quantized keys."""
    checked = 0
    for bs, local, vert, (H, K), homo in itertools.product(
            [4, 8], [1, 2, 5], [1, 3, 8, 16], [(1, 1), (4, 2), (6, 2), (3, 3)], [False, True]):
        T = 6 * bs * local + 13
        cfg = dict(num_attention_heads=H, blocksparse_block_size=bs, blocksparse_num_local_blocks=local,
                   blocksparse_vert_stride=vert, blocksparse_homo_head_pattern=homo)
        full = allowed(cfg, T).numpy()
        for offset, L in [(0, T), (7, T - 7), (T - 9, 9), (bs * local + 3, T - bs * local - 3), (T - 1, 1)]:
            got = _effective_mask(H, K, bs, local, vert, homo, offset, L)
            assert (got == full[:, offset:T, :T]).all(), (bs, local, vert, H, K, homo, offset, L)
            checked += 1
        if bs == 8 and vert in (3, 8):
            got = _effective_mask(H, K, bs, local, vert, homo, T - 40, 40, bits=8)
            assert (got == full[:, T - 40:T, :T]).all(), ("q8", bs, local, vert, H, K, homo)
    assert checked == 2 * 3 * 4 * 4 * 2 * 5


def test_blocksparse_and_mup_settings_are_checked():
    from phi3mlx.models import parse_config
    from phi3mlx.errors import Phi3MLXError
    cfg = tiny_cfg(blocksparse_num_local_blocks=0, blocksparse_vert_stride=0, blocksparse_block_size=2.5,
                   mup_width_multiplier=-8, gegelu_limit="big")
    with pytest.raises(Phi3MLXError) as e:
        parse_config(cfg)
    msg = str(e.value)
    for key in ("blocksparse_num_local_blocks", "blocksparse_vert_stride", "blocksparse_block_size",
                "mup_width_multiplier", "gegelu_limit"):
        assert key in msg, key
    # as the reference: a null or non-positive embedding multiplier / width divisor is not applied
    ok = parse_config(tiny_cfg(mup_embedding_multiplier=None, mup_width_multiplier=0))
    assert ok.embedding_multiplier == 1.0 and ok.logit_divisor == 1.0
