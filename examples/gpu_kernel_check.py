"""On a Metal or CUDA machine: the decode kernels against the MLX-op path at the real models' sizes.

    python examples/gpu_kernel_check.py [--contexts 2048 4096 8192 16384 32768] [--dtype bfloat16]
                                        [--moe-layers 4] [--skip-e2e]

For each context T, a KV cache of T keys (32 query heads on 8 KV heads, head size 128, 64-token blocks,
16 local blocks, vertical stride 8 shifted by head; float and 4-bit keys) and one decoding query:

* exactness: max |kernel - MLX ops| over the output (float32 accumulation in both);
* speed: median time of 50 calls of each path (synchronised), the ratio, and the kernel's share of the
  device's memory bandwidth for the bytes it must read (the visible key and value rows, about
  1024 + (T - 1024) / 8 per head group) against a measured copy bandwidth.

Then the MoE expert layer at Phi-3.5-MoE's sizes (4096 wide, 16 experts, top 2, intermediate 6400) for
one decoding token, experts in the chosen dtype and 4-bit (group 64): exactness, median times, speedup
and bandwidth share for the two routed experts' weights. Last, end to end: a Phi-3.5-MoE-shaped model
(``--moe-layers`` layers, random weights, 4-bit) decoding 64 tokens with the kernels, without them
(``kernels.set_enabled(False)``) and with mlx-lm's ``generate`` on the same folder: tokens per second and
the ratios.

Prints one line per case and exits 1 if any output differs by more than 2e-2 (bfloat16) or 1e-4
(float32) relative to the output's scale. Without a GPU it says so and exits 0.
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
from phi3mlx.kernels import moe as MK
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
    p.add_argument("--moe-layers", type=int, default=4, help="layers of the end-to-end MoE model")
    p.add_argument("--skip-e2e", action="store_true", help="only the kernel-level checks")
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
    bad += check_moe(gpu, dtype, tol, bw)
    if not a.skip_e2e:
        end_to_end(a.moe_layers)
    return 1 if bad else 0


def check_moe(gpu: str, dtype, tol: float, bw: float) -> int:
    """The routed experts of one token at Phi-3.5-MoE's sizes: kernel vs gather_mm / gather_qmm."""
    from mlx_lm.models.switch_layers import SwitchGLU

    hidden, inter, experts, top = 4096, 6400, 16, 2
    bad = 0
    for bits in (None, 4):
        mx.random.seed(1)
        sw = SwitchGLU(hidden, inter, experts)
        sw.set_dtype(dtype)
        if bits:
            import mlx.nn as nn

            nn.quantize(sw, group_size=64, bits=bits)
        mx.eval(sw.parameters())
        x = mx.random.normal((1, 1, hidden)).astype(dtype)
        inds = mx.array([[[3, 11]]], dtype=mx.uint32)
        w = mx.array([[[0.7, 0.3]]], dtype=dtype)
        arrays = [arr for part in ("gate_proj", "up_proj", "down_proj")
                  for arr in MK.weights_of(getattr(sw, part))[0]]

        def ops():
            return (sw(x, inds) * w[..., None]).sum(axis=-2)

        def kern():
            return MK.decode(gpu, x.reshape(1, hidden), inds.reshape(1, top), w.reshape(1, top), arrays, inter,
                             bits or 0, 64)

        ref = ops().astype(mx.float32).reshape(1, hidden)
        err = float(mx.abs(kern() - ref).max()) / max(1.0, float(mx.abs(ref).max()))
        t_ops, t_kern = median_time(ops), median_time(kern)
        per_value = (mx.finfo(dtype).bits / 8) if bits is None else bits / 8 + 2 * 2 / 64
        need = top * 3 * hidden * inter * per_value
        kind = "float" if bits is None else f"{bits}-bit"
        ok = err <= tol
        bad += not ok
        print(f"MoE layer {kind:6s} rel|diff| {err:.2e} {'ok' if ok else 'WRONG'}  MLX ops {t_ops * 1e6:8.1f} us  "
              f"kernel {t_kern * 1e6:8.1f} us  speedup {t_ops / t_kern:5.2f}x  bandwidth {100 * need / t_kern / bw:5.1f}%"
              f"  (2 of 16 experts)")
    return bad


def end_to_end(layers: int, hidden: int = 4096, inter: int = 6400) -> None:
    """Decode tok/s of a 4-bit Phi-3.5-MoE-shaped model: our kernels, our MLX-op path, mlx-lm."""
    import json
    import tempfile
    from pathlib import Path

    from mlx_lm import load as lm_load
    from mlx_lm.generate import generate_step as lm_step

    from phi3mlx.cli import main as cli
    from phi3mlx.generate import generate_step
    from phi3mlx.loader import load
    from phi3mlx.tiny import make_random

    raw = {"model_type": "phimoe", "hidden_size": hidden, "num_attention_heads": 32, "num_key_value_heads": 8,
           "num_hidden_layers": layers, "intermediate_size": inter, "num_local_experts": 16,
           "num_experts_per_tok": 2, "vocab_size": 32064, "attention_bias": True, "lm_head_bias": True,
           "max_position_embeddings": 4096, "rope_scaling": None, "sliding_window": None}
    tmp = Path(tempfile.mkdtemp())
    make_random(tmp / "hf", raw, dtype="bfloat16")
    assert cli(["convert", "--hf-path", str(tmp / "hf"), "--mlx-path", str(tmp / "moe"), "-q"]) == 0
    folder = tmp / "moe"
    model, tok = load(str(folder))
    prompt = list(range(100, 164))
    n = 64

    def rate(steps) -> float:
        """Decode tokens per second from the first generated token on (the prefill excluded)."""
        t = None
        for i, _ in enumerate(steps):
            if i == 0:
                mx.synchronize()
                t = time.perf_counter()
        return (n - 1) / (time.perf_counter() - t)

    def ours() -> float:
        return rate(generate_step(prompt, model, max_tokens=n))

    ours()  # warm up (compiles the kernels)
    kernels.set_enabled(True)
    with_k = ours()
    kernels.set_enabled(False)
    without = ours()
    kernels.set_enabled(True)
    lm_model, _ = lm_load(str(folder))
    rate(lm_step(mx.array(prompt), lm_model, max_tokens=n))  # warm up
    lm = rate(lm_step(mx.array(prompt), lm_model, max_tokens=n))
    print(json.dumps({"moe_e2e_layers": layers, "tok_s_kernels": round(with_k, 1), "tok_s_mlx_ops": round(without, 1),
                      "tok_s_mlx_lm": round(lm, 1)}))
    print(f"MoE 4-bit decode ({layers} layers): kernels {with_k:.1f} tok/s, MLX ops {without:.1f} tok/s "
          f"({with_k / without:.2f}x), mlx-lm {lm:.1f} tok/s ({with_k / lm:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
