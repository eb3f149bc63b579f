"""The blocksparse decode kernel's one body, run here as C++ threads (and under ThreadSanitizer), against
the MLX-op path it replaces on GPUs."""

from __future__ import annotations

import ctypes

import mlx.core as mx
import numpy as np
import pytest

from phi3mlx.kernels import blocksparse as K
from phi3mlx.kernels import portable
from phi3mlx.models.phi3small import Blocksparse, Phi3SmallSection, blocksparse_layer, head_offsets

from phi3mlx.kernels.portable import cpu_translation_unit

from .kernel_tools import CLANG, CUDA_INCLUDE, GXX, build, build_source, captured_msl, clang_parses, cpu_launch, \
    cuda_wrap, nvrtc_compile, ptr, recording_kernel, tsan_run

pytestmark = pytest.mark.skipif(GXX is None, reason="g++ is needed to run the kernel body on the CPU")


def _build(d, quantized: bool, threads: int = K.THREADS):
    """Both passes' C++-threads renderings: (first pass with ``threads`` a threadgroup, merge)."""
    merge = cpu_translation_unit(K.MERGE_NAME, K.MERGE_BODY, K.merge_cpu_params(), threads=32)
    return build(d / "first", K, quantized, threads), build_source(d / "merge", merge)


@pytest.fixture(scope="module")
def cpu_kernel(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("kernel"), False)


@pytest.fixture(scope="module")
def cpu_kernel_q(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("kernel_q"), True)


def run_cpu(libs, q, kbuf, vbuf, T, offset, block, local, vert, step, scale=None, bits=0, group_size=64,
            warps=K.THREADS // 32, parts=None):
    """Both passes, as ``K.decode`` launches them. kbuf/vbuf: float arrays, or (packed, scales, biases)
    numpy tuples with ``bits``; ``warps``: the first library's threadgroup size over 32; ``parts``: parts
    per row (default ``K.split``'s)."""
    first, merge = libs
    B, H, L, D = q.shape
    first_buf = kbuf[0] if bits else kbuf
    KV, cap = first_buf.shape[1], first_buf.shape[2]
    rows = B * H * L
    n, span = K.split(rows, T, offset, L, block, local, vert)
    if parts is not None:
        n, span = parts, -(-n * span // parts)
    params = np.array([B, H, KV, L, T, D, offset, block, local, vert, step, cap, bits, group_size, warps, n, span],
                      dtype=np.int32)
    scale = np.array([D ** -0.5 if scale is None else scale], dtype=np.float32)
    po = np.full(rows * n * D, np.nan, dtype=np.float32)  # every entry is written
    pml = np.full(rows * n * 2, np.nan, dtype=np.float32)
    out = np.zeros_like(q)
    cache = [ptr(a) for a in (list(kbuf) + list(vbuf) if bits else [kbuf, vbuf])]
    first.run_blocksparse_decode(ptr(q), *cache, ptr(params), ptr(scale), ptr(po), ptr(pml), ctypes.c_int(rows * n))
    merge.run_blocksparse_merge(ptr(po), ptr(pml), ptr(params), ptr(out), ctypes.c_int(rows))
    return out


def reference(q, k, v, offset, sec, H, KV):
    """The MLX-op path: the model's own Blocksparse layer (masked attention over every key)."""
    D = q.shape[-1]
    out = Blocksparse(sec, H, KV)._blocksparse(mx.array(q), mx.array(k), mx.array(v), offset, D ** -0.5, None)
    return np.array(out)


CASES = [  # (T, L, D, homo)
    (1, 1, 64, False), (15, 1, 64, False), (16, 1, 64, False), (17, 2, 64, False), (63, 3, 64, False),
    (64, 1, 128, False), (65, 8, 128, False), (100, 5, 64, True), (129, 1, 64, False), (257, 8, 64, False),
    (300, 4, 128, False), (333, 7, 64, True),
]


@pytest.mark.parametrize("T,L,D,homo", CASES)
def test_body_matches_the_mlx_op_path(cpu_kernel, T, L, D, homo):
    """Odd lengths, block and window edges, GQA (8 heads on 2), every head shift or the homo-head
    pattern, 1-8 queries; the cache buffer is longer than T and its unused rows are NaN (never read)."""
    block, local, vert, H, KV = 16, 4, 4, 8, 2
    B = 2 if T in (17, 129) else 1  # batch rows covered twice; one row elsewhere keeps the threads few
    sec = Phi3SmallSection(block_size=block, local_blocks=local, vert_stride=vert, homo_head=homo)
    rng = np.random.default_rng(T * 31 + L)
    q = rng.normal(size=(B, H, L, D)).astype(np.float32)
    cap = T + 7
    kbuf = np.full((B, KV, cap, D), np.nan, dtype=np.float32)
    vbuf = np.full((B, KV, cap, D), np.nan, dtype=np.float32)
    kbuf[:, :, :T] = rng.normal(size=(B, KV, T, D)) * 2
    vbuf[:, :, :T] = rng.normal(size=(B, KV, T, D))
    step = 0 if homo else int(np.array(head_offsets(H, vert, homo))[1])
    offset = T - L
    ours = run_cpu(cpu_kernel, q, kbuf, vbuf, T, offset, block, local, vert, step)
    ref = reference(q, kbuf[:, :, :T], vbuf[:, :, :T], offset, sec, H, KV)
    assert np.isfinite(ours).all()
    assert np.abs(ours - ref).max() <= 1e-5


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32), (4, 32)])
def test_quantized_keys(cpu_kernel_q, bits, group_size):
    """A --kv-bits cache read straight from its packed words matches the MLX-op path over the same cache."""
    from phi3mlx.cache import LayerCache

    block, local, vert, H, KV, B, D, T, L = 16, 4, 4, 8, 2, 1, 64, 211, 3
    sec = Phi3SmallSection(block_size=block, local_blocks=local, vert_stride=vert)
    rng = np.random.default_rng(bits + group_size)
    q = rng.normal(size=(B, H, L, D)).astype(np.float32)
    cache = LayerCache(bits=bits, group_size=group_size)
    k, v = cache.update_and_fetch(mx.array(rng.normal(size=(B, KV, T, D)).astype(np.float32)),
                                  mx.array(rng.normal(size=(B, KV, T, D)).astype(np.float32)))
    kq = tuple(np.array(a) for a in cache.keys)
    vq = tuple(np.array(a) for a in cache.values)
    assert kq[0].shape[2] > T  # the buffers are longer than T
    ours = run_cpu(cpu_kernel_q, q, kq, vq, T, T - L, block, local, vert, 1, bits=bits, group_size=group_size)
    ref = np.array(Blocksparse(sec, H, KV)._blocksparse(mx.array(q), k, v, T - L, D ** -0.5, cache))
    assert np.abs(ours - ref).max() <= 1e-5


@pytest.mark.parametrize("warps", [1, 16])
def test_any_number_of_lane_groups(tmp_path, warps):
    """A threadgroup of 1 to MAX_WARPS groups of 32 lanes (GPU launches use WARPS) gives the same
    output: the key slots spread over the groups and the merge reads each group's partial result,
    including groups that saw no key (a short row and many groups)."""
    lib = _build(tmp_path, False, threads=32 * warps)
    block, local, vert, H, KV, D = 16, 4, 4, 8, 2, 64
    sec = Phi3SmallSection(block_size=block, local_blocks=local, vert_stride=vert)
    step = int(np.array(head_offsets(H, vert, False))[1])
    for T, L in ((5, 1), (211, 3)):
        rng = np.random.default_rng(T + warps)
        q = rng.normal(size=(1, H, L, D)).astype(np.float32)
        k = rng.normal(size=(1, KV, T, D)).astype(np.float32) * 2
        v = rng.normal(size=(1, KV, T, D)).astype(np.float32)
        ours = run_cpu(lib, q, k, v, T, T - L, block, local, vert, step, warps=warps)
        assert np.abs(ours - reference(q, k, v, T - L, sec, H, KV)).max() <= 1e-5


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 40])
def test_any_number_of_parts(cpu_kernel, parts):
    """A row's slots split into 1 to many parts (more parts than its slots: empty parts) merge to the
    same output, for float and across window and block edges."""
    block, local, vert, H, KV, D, T, L = 16, 4, 4, 8, 2, 64, 301, 2
    sec = Phi3SmallSection(block_size=block, local_blocks=local, vert_stride=vert)
    step = int(np.array(head_offsets(H, vert, False))[1])
    rng = np.random.default_rng(parts)
    q = rng.normal(size=(1, H, L, D)).astype(np.float32)
    k = rng.normal(size=(1, KV, T, D)).astype(np.float32) * 2
    v = rng.normal(size=(1, KV, T, D)).astype(np.float32)
    ours = run_cpu(cpu_kernel, q, k, v, T, T - L, block, local, vert, step, parts=parts)
    assert np.abs(ours - reference(q, k, v, T - L, sec, H, KV)).max() <= 1e-5


def test_split_bounds_every_row():
    """split's span x parts covers every row's slots, for the last query of a pass (the largest)."""
    for T, L, block, local, vert in ((5, 1, 16, 4, 4), (301, 2, 16, 4, 4), (16384, 1, 64, 16, 8),
                                     (32768, 8, 64, 16, 8), (65, 3, 64, 16, 8)):
        for rows in (1, 32, 256):
            parts, span = K.split(rows, T, T - L, L, block, local, vert)
            assert 1 <= parts <= K.MAX_PARTS
            pos = T - 1
            qb = pos // block
            first_local = max(0, qb - local + 1)
            for r in range(vert):
                n_far = -(-(first_local - r) // vert) if first_local > r else 0
                assert parts * span >= (n_far + qb - first_local + 1) * block


def test_every_head_shift(cpu_kernel):
    """vert 8 over 8 heads: every head sees a different residue of far blocks."""
    block, local, vert, H, KV, T, L, D = 8, 2, 8, 8, 8, 203, 1, 32
    sec = Phi3SmallSection(block_size=block, local_blocks=local, vert_stride=vert)
    rng = np.random.default_rng(5)
    q = rng.normal(size=(1, H, L, D)).astype(np.float32)
    k = rng.normal(size=(1, KV, T, D)).astype(np.float32) * 3
    v = rng.normal(size=(1, KV, T, D)).astype(np.float32)
    ours = run_cpu(cpu_kernel, q, k, v, T, T - L, block, local, vert, 1)
    assert np.abs(ours - reference(q, k, v, T - L, sec, H, KV)).max() <= 1e-5


TSAN_MAIN = r"""
#include <cstdio>
#include <random>
int main() {
  const int B = 1, H = 2, KV = 1, L = 2, T = 70, D = 32, cap = 70;
  const int P = 2, span = 48;  // two parts of each row's slots
  std::vector<float> q(B * H * L * D), k(B * KV * cap * D), v(B * KV * cap * D), po(B * H * L * P * D),
      pml(B * H * L * P * 2);
  std::mt19937 g(0);
  std::normal_distribution<float> n;
  for (auto* a : {&q, &k, &v}) for (auto& x : *a) x = n(g);
  int params[17] = {B, H, KV, L, T, D, T - L, 16, 2, 2, 1, cap, 0, 64, 4, P, span};
  float scale = 0.17f;
  run_blocksparse_decode(q.data(), k.data(), v.data(), params, &scale, po.data(), pml.data(), B * H * L * P);
  std::printf("%f\n", po[0]);
  return 0;
}
"""


def _tsan_run(tmp_path, extra_flags):
    return tsan_run(tmp_path, K, TSAN_MAIN, extra_flags)


def test_no_race_under_thread_sanitizer(tmp_path):
    r = _tsan_run(tmp_path, [])
    assert "ThreadSanitizer" not in r.stderr, r.stderr[-2000:]
    assert r.returncode == 0


def test_a_missing_barrier_is_a_race(tmp_path):
    """The sanitizer sees what value checks may miss: without the merge barrier it reports a race."""
    r = _tsan_run(tmp_path, ["-DK_NO_BARRIER"])
    assert "data race" in r.stderr


# ------------------------------------------------------------------------------ the GPU renderings

def _msl(capfd, quantized: bool = False) -> str:
    header, src = K.source("metal", quantized)
    names = K.QUANT_INPUTS if quantized else K.INPUTS
    kern = mx.fast.metal_kernel(name=K.NAME, input_names=names, output_names=K.OUTPUTS, source=src, header=header)
    if quantized:
        packed = [mx.zeros((1, 1, 40, 4), dtype=mx.uint32), mx.zeros((1, 1, 40, 1)), mx.zeros((1, 1, 40, 1))]
        cache = packed + packed
    else:
        cache = [mx.zeros((1, 1, 40, 32)), mx.zeros((1, 1, 40, 32))]
    args = [mx.zeros((1, 2, 1, 32)), *cache, mx.zeros((17,), dtype=mx.int32), mx.ones((1,))]
    return captured_msl(capfd, kern, args, [(64,), (4,)], K.THREADS * 2, K.THREADS)


@pytest.mark.skipif(CLANG is None, reason="clang++ is needed to parse the Metal rendering")
@pytest.mark.parametrize("quantized", [False, True])
def test_metal_rendering_parses(capfd, tmp_path, quantized):
    msl = _msl(capfd, quantized)
    assert "[[kernel]] void custom_kernel_blocksparse_decode" in msl
    # the attributes the prologue names reach the signature, and only those
    assert "[[thread_position_in_threadgroup]]" in msl and "[[threadgroup_position_in_grid]]" in msl
    assert "[[thread_position_in_grid]]" not in msl
    r = clang_parses(msl, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]


def cuda_source(dtype: str = "float", quantized: bool = False) -> str:
    header, src = K.source("cuda", quantized)
    cache = ([f"const {t}* {x}{suf}" for x in ("k", "v") for t, suf in (("uint32_t", ""), (dtype, "_s"), (dtype, "_b"))]
             if quantized else [f"const {dtype}* k", f"const {dtype}* v"])
    return cuda_wrap(K.NAME, header, src, [f"const {dtype}* q", *cache, "const int32_t* params", "const float* scale",
                                           "float* po", "float* pml"])


@pytest.mark.skipif(CUDA_INCLUDE is None, reason="CUDA headers are needed to compile the CUDA rendering")
@pytest.mark.parametrize("dtype,quantized", [("float", False), ("__nv_bfloat16", False), ("__half", False),
                                             ("__nv_bfloat16", True)])
def test_cuda_rendering_compiles_for_sm90(dtype, quantized):
    rc, log = nvrtc_compile(cuda_source(dtype, quantized))
    assert rc == 0, log[-3000:]


@pytest.mark.skipif(CLANG is None, reason="clang++ is needed to parse the Metal rendering")
def test_merge_metal_rendering_parses(capfd, tmp_path):
    header, src = K.merge_source("metal")
    kern = mx.fast.metal_kernel(name=K.MERGE_NAME, input_names=K.MERGE_INPUTS, output_names=["out"], source=src,
                                header=header)
    args = [mx.zeros((2 * 3 * 32,)), mx.zeros((2 * 3 * 2,)), mx.zeros((17,), dtype=mx.int32)]
    msl = captured_msl(capfd, kern, args, [(1, 2, 1, 32)], 64, 32)
    assert "[[kernel]] void custom_kernel_blocksparse_merge" in msl
    assert "[[thread_position_in_threadgroup]]" in msl and "[[threadgroup_position_in_grid]]" in msl
    r = clang_parses(msl, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.skipif(CUDA_INCLUDE is None, reason="CUDA headers are needed to compile the CUDA rendering")
@pytest.mark.parametrize("dtype", ["float", "__nv_bfloat16", "__half"])
def test_merge_cuda_rendering_compiles_for_sm90(dtype):
    header, src = K.merge_source("cuda")
    sig = ["const float* po", "const float* pml", "const int32_t* params", f"{dtype}* out"]
    rc, log = nvrtc_compile(cuda_wrap(K.MERGE_NAME, header, src, sig))
    assert rc == 0, log[-3000:]


@pytest.mark.parametrize("kv_bits", [None, 4])
def test_model_decodes_through_the_kernel(cpu_kernel, cpu_kernel_q, tmp_path, monkeypatch, kv_bits):
    """Phi-3-small generation with the kernel path on gives the same tokens and logits as the MLX-op
    path, with a float or a 4-bit KV cache. Only the GPU is replaced: K.decode launches both passes as
    it would on a GPU (inputs, output sizes, grid, threadgroup) and each launch runs the body as C++
    threads. The cache buffers (longer than T), positions, scale and head shifts reach the kernel right,
    and the kernel serves every decode step."""
    from phi3mlx import kernels
    from phi3mlx.generate import generate_step
    from phi3mlx.loader import load_model

    from .helpers import make_phi3small_ckpt, phi3small_cfg

    cfg = phi3small_cfg(blocksparse_block_size=16, blocksparse_num_local_blocks=4, blocksparse_vert_stride=4)
    make_phi3small_ckpt(tmp_path, cfg)
    model, _ = load_model(tmp_path)
    ids = np.random.default_rng(0).integers(0, 50000, 300).tolist()

    def cache():
        return model.make_cache(kv_bits, 32 if kv_bits else None)

    plain = list(generate_step(ids, model, max_tokens=8, cache=cache()))

    launches = []

    def first_pass(backend, quantized, tag):
        return cpu_launch((cpu_kernel_q if quantized else cpu_kernel)[0], K.NAME, K.THREADS, launches)

    monkeypatch.setattr(kernels, "backend", lambda: "cpu-threads")
    monkeypatch.setattr(K, "_kernel", first_pass)
    monkeypatch.setattr(K, "_merge_kernel", lambda backend, tag: cpu_launch(cpu_kernel[1], K.MERGE_NAME, 32))
    kernels.reset_used()
    fast = list(generate_step(ids, model, max_tokens=8, cache=cache()))
    assert kernels.used() == [K.NAME + (f" ({kv_bits}-bit keys)" if kv_bits else "")]
    sparse = sum(blocksparse_layer(model.config, i) is not None for i in range(len(model.model.layers)))
    # every one-token pass (the prompt's last token, then 7 decode steps) of every sparse layer
    assert sparse and len(launches) == 8 * sparse
    assert [t for t, _ in fast] == [t for t, _ in plain]
    for (_, a), (_, b) in zip(fast, plain):
        assert np.abs(np.array(a) - np.array(b)).max() <= 1e-4


def test_no_kernels_flag_switches_them_off(capsys):
    from phi3mlx import kernels
    from phi3mlx.cli import main

    assert main(["generate", "--model", "phi3mlx:embedded", "--prompt", "hi", "-m", "2", "--no-kernels"]) == 0
    assert not kernels.enabled() and kernels.backend() is None
    assert main(["generate", "--model", "phi3mlx:embedded", "--prompt", "hi", "-m", "2"]) == 0
    assert kernels.enabled()
    capsys.readouterr()


@pytest.mark.slow
def test_gpu_check_script_runs_its_plumbing(tmp_path):
    """examples/gpu_kernel_check.py is the one prepared run for a lent GPU: its --dry mode (the MLX-op
    path standing in for the kernels, toy sizes) runs sections in their own processes, builds and loads
    a model folder for us and mlx-lm, and gathers every section's RESULT lines, so a GPU's time is not
    spent on a broken script."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "gpu_kernel_check.py"
    r = subprocess.run([sys.executable, str(script), "--dry", "--dtype", "float32", "--sections", "bs", "moe",
                        "e2e-small", "--contexts", "100", "--warps", "4", "--small-layers", "1", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    got = json.loads((tmp_path / "results.json").read_text())
    assert got["failed"] == []
    sections = {x["section"] for x in got["results"]}
    assert sections == {"device", "bs", "moe", "e2e-small"}
    small = next(x for x in got["results"] if x["section"] == "e2e-small")
    assert small["kernels"] > 0 and small["mlx_ops"] > 0 and small["step_ms_kernels"] > 0
    bs = [x for x in got["results"] if x["section"] == "bs"]
    assert all(x["err"] <= 1e-4 for x in bs) and len(bs) == 2 * 3  # float and 4-bit keys, 3 configurations


def test_each_dtype_gets_its_own_compiled_kernel(monkeypatch):
    """MLX keeps a compiled custom kernel under its name while the generated signature follows the
    arrays' dtypes: a bfloat16 launch must not find the float32 build. The names carry the dtypes."""
    names = []
    monkeypatch.setattr(mx.fast, "cuda_kernel", recording_kernel(names))
    monkeypatch.setattr(portable, "BUILT", {})
    for dtype in (mx.float32, mx.bfloat16, mx.float32):
        q = mx.zeros((1, 4, 1, 64), dtype=dtype)
        k = mx.zeros((1, 2, 40, 64), dtype=dtype)
        K.decode("cuda", q, [k], [k], 40, 39, 0.125, 16, 2, 2, 1)
    assert names == ["blocksparse_decode_float32_float32", "blocksparse_merge_float32",
                     "blocksparse_decode_bfloat16_bfloat16", "blocksparse_merge_bfloat16"]
