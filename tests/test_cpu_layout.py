"""What runs differently on the CPU backend. load() keeps float32 projection weights column-major
(``use_cpu_matmul_layout``): the same arrays by value and name, read by the CPU's BLAS without a
transpose; training loads keep the usual row-major layout. A float32 pass rotates q and k with one rope
table shared by its layers (``Rope.table``/``Rope.rotate``) in place of ``mx.fast.rope``, which the CPU
runs as a graph of about 30 operations per call. Neither may change what the model computes."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from phi3mlx import load
from phi3mlx.config import RopeConfig
from phi3mlx.loader import use_cpu_matmul_layout
from phi3mlx.models.attention import Attention
from phi3mlx.models.rope import Rope
from phi3mlx.tiny import make_tiny

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the layout is for the CPU backend")


def _linears(model):
    return {k: m.weight for k, m in model.named_modules() if type(m) is nn.Linear}


def _layout(a: mx.array) -> str:
    mv = memoryview(a)
    return "row" if mv.c_contiguous else "column" if mv.f_contiguous else "strided"


def test_load_keeps_linear_weights_column_major_with_equal_outputs(tiny_folder):
    fast, _ = load(str(tiny_folder))
    plain, _ = load(str(tiny_folder), cpu_layout=False)
    a, b = _linears(fast), _linears(plain)
    assert a.keys() == b.keys() and len(a) == 2 * 4 + 1  # qkv, o, gate_up, down per layer; lm_head
    assert {_layout(w) for w in a.values()} == {"column"}
    assert {_layout(w) for w in b.values()} == {"row"}
    for k in a:
        assert a[k].shape == b[k].shape and mx.array_equal(a[k], b[k]), k
    ids = mx.array([[1, 450, 4996, 17354, 1701, 29916] * 4, [1, 2, 3, 4, 5, 6] * 4])
    diff = mx.abs(fast(ids) - plain(ids)).max().item()
    assert diff <= 1e-5, diff
    # one decoding step after a prefill, through the cache
    c1, c2 = fast.make_cache(), plain.make_cache()
    fast(ids[:1], cache=c1), plain(ids[:1], cache=c2)
    step = mx.array([[29871]])
    assert mx.abs(fast(step, cache=c1) - plain(step, cache=c2)).max().item() <= 1e-5


def test_tied_embedding_and_half_precision(tmp_path):
    folder = make_tiny(tmp_path / "tied", config={"tie_word_embeddings": True, "num_hidden_layers": 1})
    model, _ = load(str(folder))
    plain, _ = load(str(folder), cpu_layout=False)
    assert not hasattr(model, "lm_head")
    assert _layout(model.model.embed_tokens.weight) == "column"  # it is the output projection too
    ids = mx.array([[1, 450, 4996, 17354]])
    assert mx.abs(model(ids) - plain(ids)).max().item() <= 1e-5
    plain.set_dtype(mx.bfloat16)
    assert use_cpu_matmul_layout(plain) == 0  # half precision: no gain measured, left as is
    assert {_layout(w) for w in _linears(plain).values()} == {"row"}


def test_saved_weights_are_the_same_values(tiny_folder, tmp_path):
    model, _ = load(str(tiny_folder))
    w = model.layers[0].self_attn.qkv_proj.weight
    mx.save_safetensors(str(tmp_path / "w.safetensors"), {"w": w})
    back = mx.load(str(tmp_path / "w.safetensors"))["w"]
    assert _layout(back) == "row" and mx.array_equal(back, w)


_FACTORS = [1.0 + 0.1 * i for i in range(8)], [2.0 + 3.0 * i for i in range(8)]


@pytest.mark.parametrize("cfg, head_dim", [
    (RopeConfig(theta=10000.0, dims=32), 32),
    (RopeConfig(theta=500000.0, dims=16, position_scale=0.5), 32),  # partial rotation, scaled positions
    (RopeConfig(theta=10000.0, dims=16, kind="longrope", short_factor=_FACTORS[0], long_factor=_FACTORS[1]), 16),
    (RopeConfig(theta=10000.0, dims=16, kind="longrope", short_factor=_FACTORS[0], long_factor=_FACTORS[1],
                attention_factor=1.2, long_attention_factor=1.19), 32),  # partial: the factor scales the rotation
    (RopeConfig(theta=10000.0, dims=16, kind="longrope", short_factor=_FACTORS[0], long_factor=_FACTORS[1],
                switch_factors=False, attention_factor=1.1), 16),
])
def test_rope_tables_rotate_as_fast_rope(cfg, head_dim):
    """Rope.rotate with a table of the positions equals Rope's mx.fast.rope, short and long sets, rows at
    their own offsets (one past 100k); also after ``switch`` is changed on a built Rope."""
    rope = Rope(cfg, head_dim)
    x = mx.random.normal((3, 4, 5, head_dim), key=mx.random.key(1))
    offsets = mx.array([0, 7, 100000])
    positions = offsets[:, None] + mx.arange(5)[None]
    for switch in (rope.switch, not rope.switch):
        rope.switch = switch
        for long in (False, True):
            want = rope(x, offsets, long)
            got = rope.rotate(x, rope.table(positions, long))
            assert got.shape == want.shape and got.dtype == mx.float32
            assert mx.abs(got - want).max().item() <= 1e-5, (switch, long)


def test_a_float32_pass_makes_one_rope_table_for_every_layer(tiny_folder, monkeypatch):
    """A forward pass (and a batch decoding step) builds its rope table once, read by all 4 layers; the
    logits equal those of mx.fast.rope in every layer."""
    model, _ = load(str(tiny_folder))
    ids = mx.array([[1, 450, 4996, 17354, 1701, 29916] * 4])
    made = []
    table = Rope.table
    monkeypatch.setattr(Rope, "table", lambda self, *a: made.append(1) or table(self, *a))
    got = model(ids)
    assert len(made) == 1
    batch = model.slot_batch()
    cache = model.make_cache()
    model(ids, cache=cache)
    batch.add(cache)
    made.clear()
    model.decode_slots(mx.array([5]), batch, False)
    assert len(made) == 1
    monkeypatch.setattr(Attention, "_rotate", lambda self, q, k, offsets, long, shared=None:
                        (self.rope(q, offsets, long), self.rope(k, offsets, long)))
    assert mx.abs(got - model(ids)).max().item() <= 1e-5
