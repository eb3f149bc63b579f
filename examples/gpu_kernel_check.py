"""On a Metal or CUDA machine: the decode kernels against the MLX-op path and mlx-lm, at the real models' sizes.

    python examples/gpu_kernel_check.py [--out DIR] [--sections bs moe prefill e2e-moe e2e-small]
                                        [--contexts 2048 ... 32768] [--dtype bfloat16] [--moe-layers 8]
                                        [--small-layers 8] [--small-context 16384]

Each section runs in its own process (a kernel that faults on the device ends only its section) and
prints one line per case, plus ``RESULT {json}`` lines that the driver gathers into ``DIR/results.json``.

* ``bs``: Phi-3-small blocksparse decode attention (32 query heads on 8 KV heads, head size 128, 64-token
  blocks, 16 local blocks, vertical stride 8 shifted by head) over a KV cache of T keys, float and 4-bit
  keys, one query: max |kernel - MLX ops|, median times, speedup, and the kernel's share of the measured
  copy bandwidth for the bytes it must read (the visible rows, about 1024 + (T - 1024) / 8 per head),
  for each number of 32-lane groups per row (``--warps``).
* ``moe``: the Phi-3.5-MoE expert layer (4096 wide, 16 experts, top 2, intermediate 6400), float and 4-bit
  (group 64), 1 and 4 tokens: exactness, median times, speedup, bandwidth share of the routed weights.
* ``prefill``: whether a prefill kernel could beat MLX's ops. Blocksparse: our chunked gather + fused
  attention over a 16k prompt (the default query chunk and larger ones) against dense causal fused
  attention of the same size, and against the dense time scaled by the fraction of keys blocksparse
  attention reads (what a blocksparse kernel as fast as the dense one would take). MoE: the sorted ``gather_qmm`` path for 512 and 2048 tokens against one
  quantized matmul of the same rows and work (what a grouped kernel could at best reach), and against
  one quantized matmul per expert over rows sorted by expert (an MLX-op alternative).
* ``e2e-moe``: a 4-bit Phi-3.5-MoE-shaped model (``--moe-layers`` layers, random weights, written as a
  folder and loaded by us and by mlx-lm) decoding 64 tokens: tokens/s with the kernels, with MLX ops
  (``kernels.set_enabled(False)``), and mlx-lm's ``generate_step``; the median of 3 interleaved rounds.
* ``e2e-small``: a bfloat16 Phi-3-small-shaped model (``--small-layers``, half of them blocksparse)
  decoding 32 tokens after a ``--small-context`` prompt, the same three ways.

Exit status 1 if any output differs by more than 2e-2 (bfloat16) or 1e-4 (float32) relative to its
scale, or a section failed. Without a GPU it says so and exits 0 (``--dry`` then runs the plumbing with
the MLX-op path standing in for the kernels, at toy sizes and in float32).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step as lm_generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.switch_layers import SwitchGLU
from mlx_lm.utils import load_model as lm_load_model

from phi3mlx import kernels
from phi3mlx.cache import LayerCache
from phi3mlx.generate import generate_step
from phi3mlx.kernels import blocksparse as K
from phi3mlx.kernels import moe as MK
from phi3mlx.loader import load_model
from phi3mlx.models import build_model, parse_config
from phi3mlx.models.attention import AttentionMask, attend
from phi3mlx.models.maps import mlx_to_folder
from phi3mlx.models.phi3small import Blocksparse, Phi3SmallSection, blocksparse_mask, head_offsets
from phi3mlx.quant import quantize_model
from phi3mlx.weights import save_weights

SECTIONS = ["bs", "moe", "e2e-moe", "e2e-small", "prefill"]
H, KV, D, BLOCK, LOCAL, VERT = 32, 8, 128, 64, 16, 8
CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "data" / "configs"


def result(**kw) -> None:
    print("RESULT " + json.dumps(kw), flush=True)


def median_time(fn, n: int = 50) -> float:
    mx.eval(fn())
    mx.eval(fn())
    times = []
    for _ in range(n):
        mx.synchronize()
        t = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def copy_bandwidth(dry: bool) -> float:
    """Bytes per second of a large device copy (read + write)."""
    a = mx.zeros(((16 if dry else 1024) * 1024 * 1024 // 4,), dtype=mx.float32)
    t = median_time(lambda: a + 1, 20)
    return 2 * a.nbytes / t


# ----------------------------------------------------------------------------------------------- bs
def attention_f32(q, k, v, mask, scale: float) -> mx.array:
    """Masked attention in float32 with plain ops: q (1, H, 1, D), k/v (1, KV, T, D) float32, mask (H, 1, T)."""
    G = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, G, axis=1), mx.repeat(v, G, axis=1)
    s = (q.astype(mx.float32) * scale) @ k.swapaxes(-1, -2)
    s = mx.where(mask[None], s, -mx.inf)
    return mx.softmax(s, axis=-1) @ v


def section_bs(a, gpu, dtype, tol, bw) -> int:
    step = int(head_offsets(H, VERT, False)[1].item())
    scale = D ** -0.5
    bad = 0
    configs = [(w, None) for w in a.warps] + [(K.WARPS, f) for f in (0.5, 2.0)]
    for T in a.contexts:
        for bits in (None, 4):
            mx.random.seed(T)
            cache = LayerCache(bits=bits, group_size=64)
            cache.update_and_fetch((mx.random.normal((1, KV, T - 1, D)) * 2).astype(dtype),
                                   mx.random.normal((1, KV, T - 1, D)).astype(dtype))
            q1 = mx.random.normal((1, H, 1, D)).astype(dtype)
            k, v = cache.update_and_fetch(mx.random.normal((1, KV, 1, D)).astype(dtype),
                                          mx.random.normal((1, KV, 1, D)).astype(dtype))
            mask = blocksparse_mask(T - 1, 1, H, BLOCK, LOCAL, VERT, False)
            if bits is None:
                k32, v32 = k.astype(mx.float32), v.astype(mx.float32)
            else:
                k32, v32 = (mx.dequantize(t[0], t[1].astype(mx.float32), t[2].astype(mx.float32), group_size=64,
                                          bits=bits) for t in (k, v))
            exact = attention_f32(q1, k32, v32, mask, scale)
            top = max(1.0, float(mx.abs(exact).max()))

            def ops():
                return attend(q1, k, v, scale, AttentionMask(mask), cache)

            err_ops = float(mx.abs(ops().astype(mx.float32) - exact).max()) / top
            t_ops = median_time(ops)
            qb = (T - 1) // BLOCK
            visible = (min(LOCAL, qb + 1) + max(0, qb + 1 - LOCAL) // VERT + 1) * BLOCK
            row_bytes = D * (mx.finfo(dtype).bits // 8) if bits is None else D * bits // 8 + 2 * (D // 64) * 2
            need = 2 * H * visible * row_bytes  # every query head reads its visible key and value rows
            kind = "float" if bits is None else f"{bits}-bit"
            auto = K.split(H, T, T - 1, 1, BLOCK, LOCAL, VERT)[0]
            for warps, factor in configs:
                parts = None if factor is None else max(1, int(auto * factor))

                def kern():
                    if gpu is None:  # --dry without a GPU
                        return ops()
                    return K.decode(gpu, q1, cache.keys, cache.values, T, T - 1, scale, BLOCK, LOCAL, VERT, step,
                                    bits, 64, warps=warps, parts=parts)

                err = float(mx.abs(kern().astype(mx.float32) - exact).max()) / top
                t_kern = median_time(kern)
                ok = err <= tol
                bad += not ok
                print(f"T={T:6d} {kind:6s} warps {warps:2d} parts {parts or auto:3d}  vs float32: kernel {err:.1e} "
                      f"{'ok' if ok else 'WRONG'}, MLX ops {err_ops:.1e}  MLX ops {t_ops * 1e6:7.1f} us  kernel "
                      f"{t_kern * 1e6:7.1f} us  speedup {t_ops / t_kern:5.2f}x  bandwidth {100 * need / t_kern / bw:5.1f}%",
                      flush=True)
                result(section="bs", T=T, kind=kind, warps=warps, parts=parts or auto, auto=parts is None, err=err,
                       err_ops=err_ops, us_ops=t_ops * 1e6, us_kernel=t_kern * 1e6, speedup=t_ops / t_kern,
                       bandwidth=need / t_kern / bw)
    return bad


# ---------------------------------------------------------------------------------------------- moe
def experts_f32(sw, x, inds, w, bits) -> mx.array:
    """The routed experts' weighted SwiGLU in float32 from (dequantized) weights: x (N, H) -> (N, H)."""
    def weight(layer, e):
        if bits:
            return mx.dequantize(layer.weight[e], layer.scales[e].astype(mx.float32),
                                 layer.biases[e].astype(mx.float32), group_size=64, bits=bits)
        return layer.weight[e].astype(mx.float32)

    rows = []
    for n in range(x.shape[0]):
        xn = x[n].astype(mx.float32)
        acc = mx.zeros(x.shape[-1])
        for j in range(inds.shape[-1]):
            e = int(inds[n, j])
            g, u = weight(sw.gate_proj, e) @ xn, weight(sw.up_proj, e) @ xn
            acc = acc + w[n, j].astype(mx.float32) * (weight(sw.down_proj, e) @ (nn.silu(g) * u))
        rows.append(acc)
    return mx.stack(rows)


def section_moe(a, gpu, dtype, tol, bw) -> int:
    hidden, inter, experts, top = (256, 320, 4, 2) if a.dry else (4096, 6400, 16, 2)
    bad = 0
    for bits in (None, 4):
        mx.random.seed(1)
        sw = SwitchGLU(hidden, inter, experts)
        sw.set_dtype(dtype)
        if bits:
            nn.quantize(sw, group_size=64, bits=bits)
        mx.eval(sw.parameters())
        arrays = [arr for part in ("gate_proj", "up_proj", "down_proj") for arr in MK.weights_of(getattr(sw, part))[0]]
        for N in (1, 4):
            x = mx.random.normal((N, 1, hidden)).astype(dtype)
            inds = mx.stack([mx.random.permutation(experts)[:top] for _ in range(N)]).astype(mx.uint32)[:, None]
            w = mx.softmax(mx.random.normal((N, 1, top)), axis=-1).astype(dtype)

            def ops():
                return (sw(x, inds) * w[..., None]).sum(axis=-2)

            def kern():
                if gpu is None:
                    return ops().astype(mx.float32).reshape(N, hidden)
                return MK.decode(gpu, x.reshape(N, hidden), inds.reshape(N, top), w.reshape(N, top), arrays, inter,
                                 bits or 0, 64)

            exact = experts_f32(sw, x.reshape(N, hidden), inds.reshape(N, top), w.reshape(N, top), bits)
            top_val = max(1.0, float(mx.abs(exact).max()))
            err = float(mx.abs(kern() - exact).max()) / top_val
            err_ops = float(mx.abs(ops().astype(mx.float32).reshape(N, hidden) - exact).max()) / top_val
            t_ops, t_kern = median_time(ops), median_time(kern)
            per_value = (mx.finfo(dtype).bits / 8) if bits is None else bits / 8 + 2 * 2 / 64
            routed = len({int(e) for e in np.array(inds).reshape(-1)})
            need = routed * 3 * hidden * inter * per_value
            kind = "float" if bits is None else f"{bits}-bit"
            ok = err <= tol
            bad += not ok
            print(f"MoE layer {kind:6s} {N} token(s) vs float32: kernel {err:.1e} {'ok' if ok else 'WRONG'}, MLX ops "
                  f"{err_ops:.1e}  MLX ops "
                  f"{t_ops * 1e6:8.1f} us  kernel {t_kern * 1e6:8.1f} us  speedup {t_ops / t_kern:5.2f}x  "
                  f"bandwidth {100 * need / t_kern / bw:5.1f}%  ({routed} of {experts} experts)", flush=True)
            result(section="moe", kind=kind, tokens=N, err=err, err_ops=err_ops, us_ops=t_ops * 1e6, us_kernel=t_kern * 1e6,
                   speedup=t_ops / t_kern, bandwidth=need / t_kern / bw, experts_read=routed)
    return bad


# ------------------------------------------------------------------------------------------ prefill
def section_prefill(a, gpu, dtype, tol, bw) -> int:
    T = 1024 if a.dry else a.small_context
    block, local, vert = (16, 4, 4) if a.dry else (BLOCK, LOCAL, VERT)
    sec = Phi3SmallSection(block_size=block, local_blocks=local, vert_stride=vert)
    mx.random.seed(3)
    q = mx.random.normal((1, H, T, D)).astype(dtype)
    k = mx.random.normal((1, KV, T, D)).astype(dtype)
    v = mx.random.normal((1, KV, T, D)).astype(dtype)
    scale = D ** -0.5
    t_dense = median_time(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal"), 5)
    m = blocksparse_mask(0, T, H, block, local, vert, False)
    frac = float(m.astype(mx.float32).sum()) / (H * T * (T + 1) / 2)
    bs = Blocksparse(sec, H, KV)
    for chunk_blocks in ([None, 4] if a.dry else [None, 16, 32]):  # the default, then larger query chunks
        bs.chunk_blocks = chunk_blocks
        t_bs = median_time(lambda: bs._blocksparse(q, k, v, 0, scale, None), 5)
        chunk = block * (chunk_blocks or max(1, local // 4))
        print(f"blocksparse prefill T={T}, query chunks of {chunk}: ours {t_bs * 1e3:.2f} ms, dense causal "
              f"{t_dense * 1e3:.2f} ms, keys read {100 * frac:.1f}% of causal; a kernel as fast as the dense one "
              f"per key: {t_dense * frac * 1e3:.2f} ms (ours / that = {t_bs / (t_dense * frac):.2f}x)", flush=True)
        result(section="prefill", kind="blocksparse", T=T, chunk=chunk, ms_ours=t_bs * 1e3, ms_dense=t_dense * 1e3,
               fraction=frac, ours_over_ideal=t_bs / (t_dense * frac))
    hidden, inter, experts, top = (256, 320, 4, 2) if a.dry else (4096, 6400, 16, 2)
    sw = SwitchGLU(hidden, inter, experts)
    sw.set_dtype(dtype)
    nn.quantize(sw, group_size=64, bits=4)
    one = nn.QuantizedLinear(hidden, inter, bias=False, group_size=64, bits=4)
    down = nn.QuantizedLinear(inter, hidden, bias=False, group_size=64, bits=4)
    mx.eval(sw.parameters(), one.parameters(), down.parameters())
    for N in (512, 2048):
        x = mx.random.normal((1, N, hidden)).astype(dtype)
        inds = mx.argsort(mx.random.normal((1, N, experts)), axis=-1)[..., :top].astype(mx.uint32)
        t_gather = median_time(lambda: sw(x, inds), 5)
        rows = x.reshape(N, hidden)
        rows2 = mx.concatenate([rows] * top, axis=0)  # the same rows x work as top-k experts do

        def dense():
            g = one(rows2)
            return down(nn.silu(g) * one(rows2))

        t_dense = median_time(dense, 5)
        flat = np.array(inds).reshape(-1)
        order = mx.array(np.argsort(flat, kind="stable"))
        counts = np.bincount(flat, minlength=experts)

        def per_expert():
            """Rows sorted by expert, then one quantized matmul per expert and projection."""
            xs = rows[order // top]
            outs, at = [], 0
            for e, c in enumerate(counts.tolist()):
                if c:
                    r = xs[at:at + c]
                    g, u = (mx.quantized_matmul(r, p.weight[e], p.scales[e], p.biases[e], group_size=64, bits=4)
                            for p in (sw.gate_proj, sw.up_proj))
                    d = sw.down_proj
                    outs.append(mx.quantized_matmul(nn.silu(g) * u, d.weight[e], d.scales[e], d.biases[e],
                                                    group_size=64, bits=4))
                    at += c
            return mx.concatenate(outs)[mx.argsort(order)]

        ref = sw(x, inds).reshape(N * top, hidden)
        err = float(mx.abs(per_expert() - ref).max()) / max(1.0, float(mx.abs(ref).max()))
        t_loop = median_time(per_expert, 5)
        print(f"MoE prefill {N} tokens (4-bit): sorted gather_qmm {t_gather * 1e3:.2f} ms, one quantized matmul of "
              f"the same rows {t_dense * 1e3:.2f} ms (gather / dense = {t_gather / t_dense:.2f}x), one quantized "
              f"matmul per expert {t_loop * 1e3:.2f} ms (rel|diff| {err:.1e})", flush=True)
        result(section="prefill", kind="moe", tokens=N, ms_gather=t_gather * 1e3, ms_dense=t_dense * 1e3,
               gather_over_dense=t_gather / t_dense, ms_per_expert=t_loop * 1e3, per_expert_err=err)
    return 0


# ------------------------------------------------------------------------------------------ end to end
def random_folder(raw: dict, folder: Path, dtype, bits: int | None) -> Path:
    """A random-weight model folder of ``raw``'s shape (ours, which mlx-lm also loads)."""
    cfg = parse_config(raw)
    model = build_model(cfg)
    new = []
    for name, p in tree_flatten(model.parameters()):
        if "norm" in name and name.endswith("weight"):
            arr = mx.ones(p.shape)
        elif name.endswith("bias"):
            arr = mx.zeros(p.shape)
        else:
            arr = 0.02 * mx.random.normal(p.shape)
        arr = arr.astype(dtype)
        mx.eval(arr)
        new.append((name, arr))
    model.load_weights(new)
    del new
    config = dict(raw, torch_dtype=str(dtype).split(".")[-1])
    if bits:
        config["quantization"] = config["quantization_config"] = quantize_model(model, bits, 64)
    mx.eval(model.parameters())
    save_weights(folder, mlx_to_folder(cfg.model_type, dict(tree_flatten(model.parameters()))))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def decode_rates(folder: Path, prompt: list, n: int, rounds: int, dtype) -> dict:
    """Decode tokens/s (from the first generated token on) with our kernels, our MLX ops and mlx-lm,
    interleaved over ``rounds``; and the first step's logits difference between our two paths."""
    ours, _ = load_model(folder)
    try:
        theirs, _ = lm_load_model(folder)
    except Exception as e:  # noqa: BLE001 (reported, the other two paths still run)
        print(f"mlx-lm could not load the folder: {type(e).__name__}: {e}", flush=True)
        theirs = None

    def rate(steps) -> float:
        t = None
        for i, _ in enumerate(steps):
            if i == 0:
                mx.synchronize()
                t = time.perf_counter()
        mx.synchronize()
        return (n - 1) / (time.perf_counter() - t)

    def run(which):
        if which == "mlx_lm":
            return rate(lm_generate_step(mx.array(prompt), theirs, max_tokens=n))
        kernels.set_enabled(which == "kernels")
        try:
            return rate(generate_step(prompt, ours, max_tokens=n))
        finally:
            kernels.set_enabled(True)

    which_all = ["kernels", "mlx_ops"] + (["mlx_lm"] if theirs is not None else [])
    first = {}
    for which in which_all[:2]:  # also warms our two paths up
        kernels.set_enabled(which == "kernels")
        kernels.reset_used()
        steps = generate_step(prompt, ours, max_tokens=2)
        next(steps)
        first[which] = (next(steps)[1], kernels.used())
        kernels.set_enabled(True)
    diff = float(mx.abs(first["kernels"][0] - first["mlx_ops"][0]).max())
    print(f"kernels used: {first['kernels'][1]}; second-step logprobs kernels vs MLX ops max |diff| {diff:.3e}",
          flush=True)
    if theirs is not None:
        run("mlx_lm")  # warm up
    rates = {w: [] for w in which_all}
    for r in range(rounds):
        for which in (which_all if r % 2 == 0 else which_all[::-1]):
            rates[which].append(run(which))
            print(f"  round {r}: {which} {rates[which][-1]:.1f} tok/s", flush=True)
    out = {w: float(np.median(v)) for w, v in rates.items()}
    out["logprob_diff"] = diff
    out["kernels_used"] = first["kernels"][1]
    out.update(step_times(ours, theirs, prompt, dtype))
    return out


def step_times(ours, theirs, prompt: list, dtype) -> dict:
    """Milliseconds of one decoding forward pass after the prompt (no generation loop around it), ours
    with and without kernels and mlx-lm's; and of layer 0's MoE block alone where there is one."""
    out = {}
    tok = mx.array([[5]])
    for which in ("kernels", "mlx_ops"):
        kernels.set_enabled(which == "kernels")
        c = ours.make_cache()
        for _ in generate_step(prompt, ours, max_tokens=1, cache=c):
            pass
        out[f"step_ms_{which}"] = median_time(lambda: ours(tok, cache=c), 20) * 1e3
        kernels.set_enabled(True)
    if theirs is not None:
        lc = make_prompt_cache(theirs)
        for _ in lm_generate_step(mx.array(prompt), theirs, max_tokens=1, prompt_cache=lc):
            pass
        out["step_ms_mlx_lm"] = median_time(lambda: theirs(tok, cache=lc), 20) * 1e3
    blocks = [m.model.layers[0].get("block_sparse_moe") for m in (ours, theirs) if m is not None]
    if blocks and blocks[0] is not None:
        x = mx.random.normal((1, 1, ours.config.hidden_size)).astype(dtype)
        for which in ("kernels", "mlx_ops"):
            kernels.set_enabled(which == "kernels")
            out[f"moe_block_us_{which}"] = median_time(lambda: blocks[0](x)) * 1e6
            kernels.set_enabled(True)
        if len(blocks) > 1:
            out["moe_block_us_mlx_lm"] = median_time(lambda: blocks[1](x)) * 1e6
    print("  " + ", ".join(f"{k} {v:.3f}" for k, v in out.items()), flush=True)
    return out


def report_e2e(name: str, rates: dict, **kw) -> None:
    k, o, lm = rates["kernels"], rates["mlx_ops"], rates.get("mlx_lm")
    line = f"{name}: kernels {k:.1f} tok/s, MLX ops {o:.1f} tok/s ({k / o:.2f}x)"
    if lm:
        line += f", mlx-lm {lm:.1f} tok/s ({k / lm:.2f}x)"
    print(line, flush=True)
    result(section=name, **kw, **rates)


def section_e2e_moe(a, gpu, dtype, tol, bw) -> int:
    raw = json.loads((CONFIGS / "Phi-3.5-MoE-instruct.json").read_text())
    raw.update(num_hidden_layers=a.moe_layers)
    if a.dry:
        raw.update(hidden_size=256, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2,
                   num_local_experts=4)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        folder = random_folder(raw, Path(tmp), dtype, 4)
        print(f"built a {a.moe_layers}-layer 4-bit Phi-3.5-MoE-shaped folder in {time.perf_counter() - t:.0f} s",
              flush=True)
        rates = decode_rates(folder, list(range(100, 164)), 64, 3, dtype)
    report_e2e("e2e-moe", rates, layers=a.moe_layers)
    return 0


def section_e2e_small(a, gpu, dtype, tol, bw) -> int:
    if a.e2e_warps:
        K.WARPS = a.e2e_warps
    print(f"blocksparse kernel: {K.WARPS} groups of 32 lanes per row", flush=True)
    raw = json.loads((CONFIGS / "Phi-3-small-8k-instruct.json").read_text())
    T = 1024 if a.dry else a.small_context
    raw.update(num_hidden_layers=a.small_layers, max_position_embeddings=max(8192, 2 * T))
    if a.dry:
        raw.update(hidden_size=256, ff_intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                   blocksparse_block_size=16, blocksparse_num_local_blocks=4, blocksparse_vert_stride=4)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        folder = random_folder(raw, Path(tmp), dtype, None)
        print(f"built a {a.small_layers}-layer Phi-3-small-shaped folder in {time.perf_counter() - t:.0f} s",
              flush=True)
        prompt = (np.arange(T) * 7919 % 100000 + 10).tolist()
        rates = decode_rates(folder, prompt, 32, 2, dtype)
    report_e2e("e2e-small", rates, layers=a.small_layers, context=T, warps=K.WARPS)
    return 0


RUN = {"bs": section_bs, "moe": section_moe, "prefill": section_prefill, "e2e-moe": section_e2e_moe,
       "e2e-small": section_e2e_small}


def run_section(a) -> int:
    gpu = kernels.backend()
    if gpu is None and not a.dry:
        print("no Metal or CUDA device: nothing to check here (the CPU runs the MLX-op path)")
        return 0
    if a.dry:  # the CPU backend runs gather_mm and these sizes only in float32
        a.dtype = "float32"
    dtype = getattr(mx, a.dtype)
    tol = 1e-4 if a.dtype == "float32" else 2e-2
    bw = copy_bandwidth(a.dry)
    print(f"== {a.section}: device {gpu}, {mx.default_device()}, copy bandwidth {bw / 1e9:.0f} GB/s, dtype {a.dtype}",
          flush=True)
    if a.section == "bs":
        result(section="device", backend=gpu, copy_GBps=bw / 1e9)
    return RUN[a.section](a, gpu, dtype, tol, bw)


BUDGET = {"bs": 120, "moe": 90, "e2e-moe": 150, "e2e-small": 120, "prefill": 90}  # seconds, at most


def best_warps(results: list, T: int) -> int | None:
    """The blocksparse kernel's fastest group count for float keys at the context nearest T."""
    rows = [r for r in results if r.get("section") == "bs" and r["kind"] == "float" and r.get("auto")]
    if not rows:
        return None
    near = min({r["T"] for r in rows}, key=lambda t: abs(t - T))
    return min((r for r in rows if r["T"] == near), key=lambda r: r["us_kernel"])["warps"]


def drive(a, argv: list) -> int:
    """Each section in its own process, within --deadline seconds in all; their RESULT lines gathered into
    DIR/results.json."""
    out = Path(a.out or tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    results, failed = [], []
    start = time.perf_counter()
    for name in a.sections:
        left = a.deadline - (time.perf_counter() - start)
        if left < 20:
            print(f"-- {name}: skipped, {left:.0f} s left of --deadline", flush=True)
            failed.append(name)
            continue
        extra = []
        if name == "e2e-small" and "--e2e-warps" not in argv and best_warps(results, a.small_context):
            extra = ["--e2e-warps", str(best_warps(results, a.small_context))]
        t = time.perf_counter()
        cmd = [sys.executable, "-u", __file__, "--section", name, *argv, *extra]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=min(BUDGET[name], left))
            text, rc = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            text = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
            text, rc = text + "\n(timed out)", -1
        (out / f"{name}.log").write_text(text)
        for line in text.splitlines():
            if line.startswith("RESULT "):
                results.append(json.loads(line[7:]))
            else:
                print(line)
        print(f"-- {name}: exit {rc} in {time.perf_counter() - t:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
        (out / "results.json").write_text(json.dumps({"results": results, "failed": failed}, indent=1))
    print(f"results: {out / 'results.json'}; failed sections: {failed or 'none'}")
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS)
    p.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    p.add_argument("--out", help="folder for results.json and each section's log")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8],
                   help="32-lane groups per row of the blocksparse kernel to compare")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--moe-layers", type=int, default=8, help="layers of the end-to-end MoE model")
    p.add_argument("--small-layers", type=int, default=8, help="layers of the end-to-end Phi-3-small model")
    p.add_argument("--small-context", type=int, default=16384, help="prompt length of the Phi-3-small run")
    p.add_argument("--deadline", type=float, default=900, help="seconds all sections may take together")
    p.add_argument("--e2e-warps", type=int, help="the blocksparse kernel's groups per row in e2e-small "
                   "(default: the fastest of the bs section at --small-context, else the kernel's own)")
    p.add_argument("--dry", action="store_true",
                   help="without a GPU: toy sizes, float32, the MLX-op path standing in for the kernels")
    a, _ = p.parse_known_args()
    if a.section:
        return run_section(a)
    argv = [x for i, x in enumerate(sys.argv[1:]) if not _is_sections_arg(sys.argv[1:], i)]
    return drive(a, argv)


def _is_sections_arg(args: list, i: int) -> bool:
    """Whether args[i] is --sections or one of its values (the driver passes the rest on)."""
    j = i
    while j >= 0 and not args[j].startswith("--"):
        j -= 1
    return j >= 0 and args[j] == "--sections"


if __name__ == "__main__":
    sys.exit(main())
