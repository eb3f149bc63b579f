"""On the CPU backend, load() keeps float32 projection weights column-major (``use_cpu_matmul_layout``):
the same arrays by value and name, read by the CPU's BLAS without a transpose. Inference must not
change; training loads keep the usual row-major layout."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from phi3mlx import load
from phi3mlx.loader import use_cpu_matmul_layout
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
