"""On a Metal or CUDA machine: the blocksparse decode kernel against the MLX-op path at Phi-3-small's sizes.

    python examples/gpu_kernel_check.py [--contexts 2048 4096 8192 16384 32768] [--dtype bfloat16]

For each context T, a KV cache of T keys (32 query heads on 8 KV heads, head size 128, 64-token blocks,
16 local blocks, vertical stride 8 shifted by head; float and 4-bit keys) and one decoding query:

* exactness: max |kernel - MLX ops| over the output (float32 accumulation in both);
* speed: median time of 50 calls of each path (synchronised), the ratio, and the kernel's share of the
  device's memory bandwidth for the bytes it must read (the visible key and value rows, about
  1024 + (T - 1024) / 8 per head group) against a measured copy bandwidth.

Prints one line per (T, cache kind) and exits 1 if any output differs by more than 2e-2 (bfloat16) or
1e-4 (float32). Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time

import mlx.core as mx
import numpy as np

from phi3mlx import kernels
from phi3mlx.cache import LayerCache
from phi3mlx.kernels import blocksparse as K
from phi3mlx.models.attention import AttentionMask, attend
from phi3mlx.models.phi3small import blocksparse_mask, head_offsets

H, KV, D, BLOCK, LOCAL, VERT = 32, 8, 128, 64, 16, 8


def median_time(fn, n: int = 50) -> float:
    mx.eval(fn())
    times = []
    for _ in range(n):
        mx.synchronize()
        t = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def copy_bandwidth() -> float:
    """Bytes per second of a large device copy (read + write)."""
    a = mx.zeros((256 * 1024 * 1024 // 4,), dtype=mx.float32)
    t = median_time(lambda: a + 1, 20)
    return 2 * a.nbytes / t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    a = p.parse_args()
    gpu = kernels.backend()
    if gpu is None:
        print("no Metal or CUDA device: nothing to check here (the CPU runs the MLX-op path)")
        return 0
    dtype = getattr(mx, a.dtype)
    tol = 1e-4 if a.dtype == "float32" else 2e-2
    bw = copy_bandwidth()
    print(f"device: {gpu}, {mx.default_device()}; copy bandwidth {bw / 1e9:.0f} GB/s; dtype {a.dtype}")
    step = int(head_offsets(H, VERT, False)[1].item())
    scale = D ** -0.5
    bad = 0
    for T in a.contexts:
        for bits in (None, 4):
            mx.random.seed(T)
            cache = LayerCache(bits=bits, group_size=64)
            k, v = cache.update_and_fetch((mx.random.normal((1, KV, T - 1, D)) * 2).astype(dtype),
                                          mx.random.normal((1, KV, T - 1, D)).astype(dtype))
            q1 = mx.random.normal((1, H, 1, D)).astype(dtype)
            k, v = cache.update_and_fetch(mx.random.normal((1, KV, 1, D)).astype(dtype),
                                          mx.random.normal((1, KV, 1, D)).astype(dtype))
            mask = blocksparse_mask(T - 1, 1, H, BLOCK, LOCAL, VERT, False)

            def ops():
                return attend(q1, k, v, scale, AttentionMask(mask), cache)

            def kern():
                return K.decode(gpu, q1, cache.keys, cache.values, T, T - 1, scale, BLOCK, LOCAL, VERT, step,
                                bits, 64)

            err = float(mx.abs(kern().astype(mx.float32) - ops().astype(mx.float32)).max())
            t_ops, t_kern = median_time(ops), median_time(kern)
            qb = (T - 1) // BLOCK
            visible = (min(LOCAL, qb + 1) + max(0, qb + 1 - LOCAL) // VERT + 1) * BLOCK
            row_bytes = D * (mx.finfo(dtype).bits // 8) if bits is None else D * bits // 8 + 2 * (D // 64) * 2
            need = 2 * KV * visible * row_bytes  # keys and values each KV head group reads once
            frac = need / t_kern / bw
            kind = "float" if bits is None else f"{bits}-bit"
            ok = err <= tol
            bad += not ok
            print(f"T={T:6d} {kind:6s} max|diff| {err:.2e} {'ok' if ok else 'WRONG'}  MLX ops {t_ops * 1e6:8.1f} us  "
                  f"kernel {t_kern * 1e6:8.1f} us  speedup {t_ops / t_kern:5.2f}x  bandwidth {100 * frac:5.1f}%")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
