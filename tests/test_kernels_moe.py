"""The MoE decode kernel's one body (fused gate/up SwiGLU and router-weighted down projection, float or
4/8-bit experts), run here as C++ threads (and under ThreadSanitizer), against the MLX-op path it
replaces on GPUs; its Metal rendering parsed, its CUDA rendering compiled."""

from __future__ import annotations

import ctypes

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchGLU

from phi3mlx.kernels import moe as K
from phi3mlx.kernels import portable
from phi3mlx.models import build_model, parse_config
from phi3mlx.quant import quantize_model

from .helpers import FT_MOE
from .kernel_tools import CLANG, CUDA_INCLUDE, GXX, build, captured_msl, clang_parses, cpu_launch, cuda_wrap, \
    nvrtc_compile, ptr, recording_kernel, tsan_run

pytestmark = pytest.mark.skipif(GXX is None, reason="g++ is needed to run the kernel body on the CPU")


@pytest.fixture(scope="module")
def cpu_kernel(tmp_path_factory):
    return build(tmp_path_factory.mktemp("moe"), K, False)


@pytest.fixture(scope="module")
def cpu_kernel_q(tmp_path_factory):
    return build(tmp_path_factory.mktemp("moe_q"), K, True)


def run_cpu(lib, x, inds, wts, weights: list, intermediate: int, bits: int = 0, group_size: int = 64) -> np.ndarray:
    """The kernel's C++ rendering on numpy inputs: x (N, H), inds/wts (N, K), weights as decode() takes them."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    N, H = x.shape
    inds = np.ascontiguousarray(inds, dtype=np.uint32)
    wts = np.ascontiguousarray(wts, dtype=np.float32)
    ws = [np.ascontiguousarray(a, dtype=np.uint32 if a.dtype == np.uint32 else np.float32) for a in weights]
    chunks = -(-intermediate // K.CHUNK)
    params = np.array([N, inds.shape[1], H, intermediate, bits, group_size, chunks], dtype=np.int32)
    out = np.zeros((N, H), dtype=np.float32)
    lib.run_moe_decode(ptr(x), ptr(inds), ptr(wts), *[ptr(a) for a in ws], ptr(params), ptr(out),
                       ctypes.c_int(N * inds.shape[1] * chunks))
    return out


def experts(H, I, E, bits=0, group_size=64, seed=0):
    mx.random.seed(seed)
    sw = SwitchGLU(H, I, E)
    if bits:
        nn.quantize(sw, group_size=group_size, bits=bits)
    return sw


def kernel_weights(sw) -> tuple[list, int, int]:
    parts = [K.weights_of(getattr(sw, p)) for p in ("gate_proj", "up_proj", "down_proj")]
    return [np.array(a) for ws, _, _ in parts for a in ws], parts[0][1], parts[0][2]


SHAPES = [  # (N tokens, top-k, H, I, experts)
    (1, 2, 64, 64, 4), (1, 1, 96, 160, 5), (3, 2, 96, 160, 5), (8, 2, 128, 96, 16), (5, 3, 64, 200, 6),
    (2, 2, 128, 320, 4),
]
KINDS = [(0, 0), (4, 64), (8, 32), (4, 32)]  # (bits, group size); 0: float experts
# quantization needs the group size to divide both dimensions: those pairs only
CASES = [(*s, b, g) for s in SHAPES for b, g in KINDS if not b or (s[2] % g == 0 and s[3] % g == 0)]


@pytest.mark.parametrize("N,k,H,I,E,bits,group_size", CASES)
def test_body_matches_the_mlx_op_path(cpu_kernel, cpu_kernel_q, N, k, H, I, E, bits, group_size):
    """1-8 tokens, top-1 to top-3, intermediate sizes with a partial last chunk (96, 160, 200, 320), the
    last expert routed, float and 4/8-bit experts at group sizes 32 and 64: equal to gather_mm/gather_qmm."""
    sw = experts(H, I, E, bits, group_size or 64, seed=N + k)
    rng = np.random.default_rng(N * 7 + E)
    x = rng.normal(size=(N, H)).astype(np.float32)
    inds = np.stack([rng.choice(E, k, replace=False) for _ in range(N)]).astype(np.uint32)
    inds[0, 0] = E - 1
    wts = rng.uniform(0.1, 1, size=(N, k)).astype(np.float32)
    ref = np.array((sw(mx.array(x), mx.array(inds)) * mx.array(wts)[..., None]).sum(-2))
    ws, b, gs = kernel_weights(sw)
    assert b == bits
    ours = run_cpu(cpu_kernel_q if bits else cpu_kernel, x, inds, wts, ws, I, bits, gs or 64)
    assert np.isfinite(ours).all()
    assert np.abs(ours - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_supports():
    x = mx.zeros((1, 1, 64))
    assert K.supports(x, experts(64, 96, 4))
    assert K.supports(x, experts(64, 128, 4, bits=4, group_size=64))
    assert not K.supports(mx.zeros((1, 9, 64)), experts(64, 96, 4))  # more than 8 tokens: MLX ops
    assert not K.supports(x.astype(mx.float16), experts(64, 96, 4))  # weights of another dtype
    assert not K.supports(x, experts(64, 128, 4, bits=3, group_size=64))  # 3-bit: MLX ops
    wide = K.MAX_HIDDEN + 64  # the token no longer fits the threadgroup memory: MLX ops
    assert not K.supports(mx.zeros((1, 1, wide)), experts(wide, 64, 2))
    assert K.supports(mx.zeros((1, 1, K.MAX_HIDDEN)), experts(K.MAX_HIDDEN, 64, 2, bits=4, group_size=64))
    sw = experts(64, 96, 4)
    sw.gate_proj.bias = mx.zeros((4, 96))
    assert not K.supports(x, sw)  # biased experts


TSAN_MAIN = r"""
#include <cstdio>
#include <random>
int main() {
  const int N = 1, K = 2, H = 64, I = 96, E = 3;
  std::vector<float> x(N * H), wg(E * I * H), wu(E * I * H), wd(E * H * I), out(N * H);
  std::mt19937 g(0);
  std::normal_distribution<float> n;
  for (auto* a : {&x, &wg, &wu, &wd}) for (auto& v : *a) v = n(g);
  uint32_t inds[2] = {2, 0};
  float wts[2] = {0.7f, 0.3f};
  int params[7] = {N, K, H, I, 0, 64, 2};
  run_moe_decode(x.data(), inds, wts, wg.data(), wu.data(), wd.data(), params, out.data(), N * K * 2);
  std::printf("%f\n", out[0]);
  return 0;
}
"""


def test_no_race_under_thread_sanitizer(tmp_path):
    r = tsan_run(tmp_path, K, TSAN_MAIN, [])
    assert "ThreadSanitizer" not in r.stderr, r.stderr[-2000:]
    assert r.returncode == 0


def test_a_missing_barrier_is_a_race(tmp_path):
    """Without its barriers the SwiGLU values are read while other groups still write them."""
    r = tsan_run(tmp_path, K, TSAN_MAIN, ["-DK_NO_BARRIER"])
    assert "data race" in r.stderr


@pytest.mark.skipif(CLANG is None, reason="clang++ is needed to parse the Metal rendering")
@pytest.mark.parametrize("quantized", [False, True])
def test_metal_rendering_parses(capfd, tmp_path, quantized):
    header, src = K.source("metal", quantized)
    kern = mx.fast.metal_kernel(name=K.NAME, input_names=K.QUANT_INPUTS if quantized else K.INPUTS,
                                output_names=["out"], source=src, header=header, atomic_outputs=True)
    if quantized:
        w = [mx.zeros((2, 64, 8), dtype=mx.uint32), mx.zeros((2, 64, 1)), mx.zeros((2, 64, 1))]
        weights = w + w + w
    else:
        weights = [mx.zeros((2, 64, 64))] * 3
    args = [mx.zeros((1, 64)), mx.zeros((1, 2), dtype=mx.uint32), mx.zeros((1, 2)), *weights,
            mx.zeros((7,), dtype=mx.int32)]
    msl = captured_msl(capfd, kern, args, [(1, 64)], K.THREADS * 2, K.THREADS)
    assert "[[kernel]] void custom_kernel_moe_decode" in msl
    assert "device atomic<float>* out" in msl  # the output the body adds into
    assert "[[thread_position_in_threadgroup]]" in msl and "[[threadgroup_position_in_grid]]" in msl
    assert "[[thread_position_in_grid]]" not in msl
    r = clang_parses(msl, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.skipif(CUDA_INCLUDE is None, reason="CUDA headers are needed to compile the CUDA rendering")
@pytest.mark.parametrize("dtype,quantized", [("float", False), ("__nv_bfloat16", False), ("__half", False),
                                             ("__nv_bfloat16", True)])
def test_cuda_rendering_compiles_for_sm90(dtype, quantized):
    header, src = K.source("cuda", quantized)
    if quantized:
        ws = [f"const {t}* {w}{suf}" for w in ("wg", "wu", "wd")
              for t, suf in (("uint32_t", ""), (dtype, "_s"), (dtype, "_b"))]
    else:
        ws = [f"const {dtype}* {w}" for w in ("wg", "wu", "wd")]
    sig = [f"const {dtype}* x", "const uint32_t* inds", "const float* wts", *ws, "const int32_t* params",
           "float* out"]
    rc, log = nvrtc_compile(cuda_wrap(K.NAME, header, src, sig))
    assert rc == 0, log[-3000:]


def _on_cpu(monkeypatch, lib, lib_q, calls=None):
    """Only the GPU replaced: K.decode launches the kernel as on a GPU (inputs, output size, grid,
    threadgroup, init_value) and the launch runs the body as C++ threads."""
    from phi3mlx import kernels

    monkeypatch.setattr(kernels, "backend", lambda: "cpu-threads")
    monkeypatch.setattr(K, "_kernel", lambda backend, quantized, tag: cpu_launch(lib_q if quantized else lib, K.NAME,
                                                                            K.THREADS, calls))


def tiny_moe(bits: int = 0):
    cfg = parse_config({**FT_MOE, "intermediate_size": 160})
    mx.random.seed(3)
    model = build_model(cfg)
    model.eval()
    if bits:
        quantize_model(model, bits=bits, group_size=32)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("bits", [0, 4])
def test_model_decodes_through_the_kernel(cpu_kernel, cpu_kernel_q, monkeypatch, bits):
    """Phi-3.5-MoE generation with the kernel on (its body run as C++ threads in place of the GPU) gives
    the tokens and logits of the MLX-op path, float or 4-bit experts; prefill (more than 8 tokens) stays
    on MLX ops and every decode step goes through the kernel."""
    from phi3mlx import kernels
    from phi3mlx.generate import generate_step

    model = tiny_moe(bits)
    ids = np.random.default_rng(1).integers(0, 32000, 20).tolist()
    plain = list(generate_step(ids, model, max_tokens=6))
    launches = []
    _on_cpu(monkeypatch, cpu_kernel, cpu_kernel_q, launches)
    kernels.reset_used()
    fast = list(generate_step(ids, model, max_tokens=6))
    assert kernels.used() == [K.NAME + (f" ({bits}-bit experts)" if bits else "")]
    layers = FT_MOE["num_hidden_layers"]
    assert {x[0].shape[0] for x in launches} == {1}  # one token a step
    assert len(launches) == 6 * layers  # every one-token pass (the prompt's last token, 5 steps), every layer
    assert [t for t, _ in fast] == [t for t, _ in plain]
    for (_, a), (_, b) in zip(fast, plain):
        assert np.abs(np.array(a) - np.array(b)).max() <= 1e-4


def test_gradient_is_the_mlx_op_path(cpu_kernel, cpu_kernel_q, monkeypatch):
    """Through the kernel's custom function, gradients to the input, the router and the expert weights
    equal the MLX-op path's (LoRA and DPO keep working where the kernel serves the forward pass)."""
    from mlx.utils import tree_flatten

    from phi3mlx import kernels

    model = tiny_moe()
    moe = model.model.layers[0].block_sparse_moe
    x = mx.random.normal((1, 2, FT_MOE["hidden_size"]))

    def loss(params, x):
        model.update(params)
        return (moe(x) ** 2).sum()

    params = model.trainable_parameters()
    ref_g = mx.grad(loss, argnums=(0, 1))(params, x)
    _on_cpu(monkeypatch, cpu_kernel, cpu_kernel_q)
    kernels.reset_used()
    got_g = mx.grad(loss, argnums=(0, 1))(params, x)
    assert kernels.used() == [K.NAME]
    assert np.abs(np.array(got_g[1]) - np.array(ref_g[1])).max() <= 1e-5
    ref_flat, got_flat = dict(tree_flatten(ref_g[0])), dict(tree_flatten(got_g[0]))
    touched = [k for k in ref_flat if "layers.0.block_sparse_moe" in k]
    assert len(touched) == 4  # router and the three expert stacks
    for k in touched:
        assert np.abs(np.array(got_flat[k]) - np.array(ref_flat[k])).max() <= 1e-5, k


def test_each_dtype_gets_its_own_compiled_kernel(monkeypatch):
    """The kernel's name carries the token's and the weights' dtypes (MLX keeps a compiled custom kernel
    under its name, while its signature follows the dtypes)."""
    names = []
    monkeypatch.setattr(mx.fast, "cuda_kernel", recording_kernel(names))
    monkeypatch.setattr(portable, "BUILT", {})
    for dtype, bits in ((mx.float32, 0), (mx.float16, 0), (mx.float32, 4), (mx.float32, 0)):
        sw = experts(64, 64, 2, bits=bits)
        if not bits:
            sw.set_dtype(dtype)
        ws = [a for p in ("gate_proj", "up_proj", "down_proj") for a in K.weights_of(getattr(sw, p))[0]]
        K.decode("cuda", mx.zeros((1, 64), dtype=dtype), mx.zeros((1, 2), dtype=mx.uint32), mx.ones((1, 2)), ws, 64,
                 bits)
    assert names == ["moe_decode_" + "_".join(["float32"] * 4), "moe_decode_" + "_".join(["float16"] * 4),
                     "moe_decode_q_float32_" + "_".join(["uint32", "float32", "float32"] * 3)]
