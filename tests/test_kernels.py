"""The blocksparse decode kernel's one body, run here as C++ threads (and under ThreadSanitizer), against
the MLX-op path it replaces on GPUs."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from phi3mlx.kernels import blocksparse as K
from phi3mlx.kernels.portable import cpu_translation_unit
from phi3mlx.models.phi3small import Blocksparse, Phi3SmallSection, head_offsets

GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="g++ is needed to run the kernel body on the CPU")


def _tu() -> str:
    return cpu_translation_unit(K.NAME, K.BODY, K.cpu_params(), threads=K.THREADS)


@pytest.fixture(scope="module")
def cpu_kernel(tmp_path_factory):
    d = tmp_path_factory.mktemp("kernel")
    (d / "k.cpp").write_text(_tu())
    lib = d / "k.so"
    r = subprocess.run([GXX, "-O2", "-std=c++20", "-shared", "-fPIC", "-pthread", str(d / "k.cpp"), "-o", str(lib)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return ctypes.CDLL(str(lib))


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def run_cpu(lib, q, kbuf, vbuf, T, offset, block, local, vert, step):
    B, H, L, D = q.shape
    KV, cap = kbuf.shape[1], kbuf.shape[2]
    params = np.array([B, H, KV, L, T, D, offset, block, local, vert, step, cap], dtype=np.int32)
    scale = np.array([D ** -0.5], dtype=np.float32)
    out = np.zeros_like(q)
    lib.run_blocksparse_decode(_ptr(q), _ptr(kbuf), _ptr(vbuf), _ptr(params), _ptr(scale), _ptr(out),
                               ctypes.c_int(B * H * L))
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
    block, local, vert, H, KV, B = 16, 4, 4, 8, 2, 2
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
  std::vector<float> q(B * H * L * D), k(B * KV * cap * D), v(B * KV * cap * D), out(B * H * L * D);
  std::mt19937 g(0);
  std::normal_distribution<float> n;
  for (auto* a : {&q, &k, &v}) for (auto& x : *a) x = n(g);
  int params[12] = {B, H, KV, L, T, D, T - L, 16, 2, 2, 1, cap};
  float scale = 0.17f;
  run_blocksparse_decode(q.data(), k.data(), v.data(), params, &scale, out.data(), B * H * L);
  std::printf("%f\n", out[0]);
  return 0;
}
"""


def _tsan_run(tmp_path, extra_flags):
    src = tmp_path / "t.cpp"
    src.write_text(_tu() + TSAN_MAIN)
    exe = tmp_path / "t"
    r = subprocess.run([GXX, "-O1", "-g", "-std=c++20", "-pthread", "-fsanitize=thread", *extra_flags, str(src), "-o",
                        str(exe)], capture_output=True, text=True)
    if r.returncode != 0 and "tsan" in r.stderr.lower():
        pytest.skip("ThreadSanitizer runtime not available")
    assert r.returncode == 0, r.stderr[-3000:]
    return subprocess.run([str(exe)], capture_output=True, text=True, env={"TSAN_OPTIONS": "halt_on_error=0"})


def test_no_race_under_thread_sanitizer(tmp_path):
    r = _tsan_run(tmp_path, [])
    assert "ThreadSanitizer" not in r.stderr, r.stderr[-2000:]
    assert r.returncode == 0


def test_a_missing_barrier_is_a_race(tmp_path):
    """The sanitizer sees what value checks may miss: without the merge barrier it reports a race."""
    r = _tsan_run(tmp_path, ["-DK_NO_BARRIER"])
    assert "data race" in r.stderr
