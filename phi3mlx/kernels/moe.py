"""Phi-3.5-MoE expert layer for decoding (a few tokens): one fused kernel body, three renderings.

For token n and its routed slot j (expert e = inds[n, j], router weight w = wts[n, j]), the layer is
``w * down[e] @ (silu(gate[e] @ x) * (up[e] @ x))``, summed over slots. One threadgroup serves one
(token, slot, chunk of ``CHUNK`` intermediate rows): its 8 groups of 32 lanes take the chunk's gate
and up rows in turn (lanes split the hidden dimension, reading whole packed words, and reduce with xor
shuffles); after a barrier the chunk's SwiGLU values sit in threadgroup memory; after a second, each
thread takes output rows of ``down[e]`` (strided by the threadgroup size), dots their chunk columns with
those values and adds ``w * dot`` to ``out[n, row]`` atomically (float32, zero-initialised). Every expert
weight the token's experts need is read exactly once; nothing else is read.

Weights: float ``(E, I, H)`` gate/up and ``(E, H, I)`` down in the activations' dtype, or MLX's affine
quantization (``mx.quantize``: ``bits`` 4 or 8, 32 / bits values per uint32 word, low bits first,
value = scale * q + bias per group of ``gsize``) read straight from the packed words, scales and biases.

Inputs: ``x`` (N, H); ``inds`` (N, K) expert ids; ``wts`` (N, K) router weights; ``wg``, ``wu``, ``wd``
(each, quantized, followed by its ``_s`` scales and ``_b`` biases); ``params`` int32 [N, K, H, I, bits,
group size, chunks]. Output ``out`` (N, H) float32.
"""

from __future__ import annotations

import mlx.core as mx

from . import note_used
from .portable import packed, render

NAME = "moe_decode"
THREADS = 256  # 8 groups of 32 lanes
CHUNK = 64  # intermediate rows per threadgroup (the body's gu/hv sizes)
MAX_TOKENS = 8
INPUTS = ["x", "inds", "wts", "wg", "wu", "wd", "params"]
QUANT_INPUTS = ["x", "inds", "wts", "wg", "wg_s", "wg_b", "wu", "wu_s", "wu_b", "wd", "wd_s", "wd_b", "params"]

BODY = r"""
K_SHARED float gu[128];
K_SHARED float hv[64];
int nN = params[0], nK = params[1], nHd = params[2], nI = params[3];
int bits = params[4], gsize = params[5], nC = params[6];
int task = (int)gid;
if (task < nN * nK * nC) {
  uint lane = tid % 32;
  uint sg = tid / 32;
  int c = task % nC;
  int slot = (task / nC) % nK;
  int n = task / (nC * nK);
  int e = (int)inds[n * nK + slot];
  float wr = float(wts[n * nK + slot]);
  int i0 = c * 64;
  int len = nI - i0 < 64 ? nI - i0 : 64;
  // 1. the chunk's gate rows (rr < 64) and up rows (rr >= 64), one 32-lane group per row
  for (int rr = (int)sg; rr < 128; rr += 8) {
    int i = i0 + rr % 64;
    float d = 0.0f;
    if (i < nI) {
      long row = (long)e * nI + i;
      if (rr < 64) {
        ROW_DOT_X(wg, row, d);
      } else {
        ROW_DOT_X(wu, row, d);
      }
    }
    for (uint mask = 16; mask > 0; mask >>= 1) {
      d += K_SHFL_XOR(d, mask);
    }
    if (lane == 0) {
      gu[rr] = d;
    }
  }
  K_BARRIER();
  // 2. SwiGLU of the chunk
  if (tid < 64) {
    float g = gu[tid];
    hv[tid] = (int)tid < len ? g / (1.0f + K_EXP(-g)) * gu[64 + tid] : 0.0f;
  }
  K_BARRIER();
  // 3. the down projection's chunk columns, weighted by the router, added into the output
  for (int o = (int)tid; o < nHd; o += 256) {
    long row = (long)e * nHd + o;
    float d = 0.0f;
    CHUNK_DOT_H(wd, row, d);
    K_ATOMIC_ADD(out, n * nHd + o, wr * d);
  }
}
"""

# ROW_DOT_X(a, row, acc): this lane's share of row ``row`` of a (rows of H values) dotted with x[n];
# CHUNK_DOT_H(a, row, acc): columns i0 .. i0 + len of row ``row`` of a (rows of I values) dotted with hv.
DOTS_FLOAT = r"""
#define ROW_DOT_X(a, row, acc) \
  for (int j = (int)lane; j < nHd; j += 32) { acc += float(a[(row) * nHd + j]) * float(x[n * nHd + j]); }
#define CHUNK_DOT_H(a, row, acc) \
  for (int j = 0; j < len; ++j) { acc += float(a[(row) * nI + i0 + j]) * hv[j]; }
"""

DOTS_QUANT = r"""
#define ROW_DOT_X(a, row, acc) { \
  int vpw = 32 / bits, wpr = nHd / vpw, gpr = nHd / gsize; \
  uint qmask = (1u << bits) - 1u; \
  for (int w = (int)lane; w < wpr; w += 32) { \
    uint word = a[(row) * wpr + w]; \
    int col = w * vpw; \
    float qx = 0.0f, sx = 0.0f; \
    for (int j = 0; j < vpw; ++j) { \
      float xv = float(x[n * nHd + col + j]); \
      qx += float((word >> (j * bits)) & qmask) * xv; \
      sx += xv; \
    } \
    acc += float(a##_s[(row) * gpr + col / gsize]) * qx + float(a##_b[(row) * gpr + col / gsize]) * sx; \
  } }
#define CHUNK_DOT_H(a, row, acc) { \
  int vpw = 32 / bits, wpr = nI / vpw, gpr = nI / gsize; \
  uint qmask = (1u << bits) - 1u; \
  for (int w = 0; w < len / vpw; ++w) { \
    int col = i0 + w * vpw; \
    uint word = a[(row) * wpr + col / vpw]; \
    float qh = 0.0f, sh = 0.0f; \
    for (int j = 0; j < vpw; ++j) { \
      float hj = hv[w * vpw + j]; \
      qh += float((word >> (j * bits)) & qmask) * hj; \
      sh += hj; \
    } \
    acc += float(a##_s[(row) * gpr + col / gsize]) * qh + float(a##_b[(row) * gpr + col / gsize]) * sh; \
  } }
"""


def body(quantized: bool) -> str:
    return (DOTS_QUANT if quantized else DOTS_FLOAT) + BODY


def source(backend: str, quantized: bool = False) -> tuple[str, str]:
    """(header, source) of the kernel for ``backend`` ("metal" or "cuda")."""
    return render(backend, body(quantized))


def cpu_params(quantized: bool = False) -> list[tuple[str, str]]:
    """The C++ parameters of the CPU rendering (float32 data; uint32 words for quantized weights)."""
    if quantized:
        ws = packed(("wg", "wu", "wd"))
    else:
        ws = [("const float*", w) for w in ("wg", "wu", "wd")]
    return [("const float*", "x"), ("const uint32_t*", "inds"), ("const float*", "wts"), *ws,
            ("const int*", "params"), ("float*", "out")]


_KERNELS: dict = {}


def _kernel(backend: str, quantized: bool):
    key = (backend, quantized)
    if key not in _KERNELS:
        header, src = source(backend, quantized)
        names = QUANT_INPUTS if quantized else INPUTS
        name = NAME + ("_q" if quantized else "")
        if backend == "metal":
            _KERNELS[key] = mx.fast.metal_kernel(name=name, input_names=names, output_names=["out"], source=src,
                                                 header=header, atomic_outputs=True)
        else:
            _KERNELS[key] = mx.fast.cuda_kernel(name=name, input_names=names, output_names=["out"], source=src,
                                                header=header)
    return _KERNELS[key]


def weights_of(layer) -> tuple[list, int, int]:
    """([arrays], bits, group size) of a SwitchLinear (bits 0) or QuantizedSwitchLinear, in the order
    the kernel takes them; bits -1 where the kernel cannot read the layer (biases, other modes)."""
    if "bias" in layer:
        return [], -1, 0
    if hasattr(layer, "scales"):
        if getattr(layer, "mode", "affine") != "affine" or layer.get("biases") is None or layer.bits not in (4, 8):
            return [], -1, 0
        return [layer.weight, layer.scales, layer.biases], layer.bits, layer.group_size
    return [layer.weight], 0, 0


def supports(x: mx.array, switch_mlp) -> bool:
    """Whether the kernel takes these tokens and expert weights (else the MLX-op path runs)."""
    N = x.size // x.shape[-1]
    if N > MAX_TOKENS or x.dtype not in (mx.float32, mx.float16, mx.bfloat16):
        return False
    parts = [weights_of(getattr(switch_mlp, p)) for p in ("gate_proj", "up_proj", "down_proj")]
    if len({(b, g) for _, b, g in parts}) != 1 or parts[0][1] < 0:
        return False
    ws, bits, gs = parts[0]
    H, I = x.shape[-1], switch_mlp.gate_proj.output_dims
    if bits == 0:
        return all(w[0].dtype == x.dtype for w, _, _ in parts) and H % 32 == 0
    return H % gs == 0 and I % gs == 0 and I % 32 == 0


def decode(backend: str, x: mx.array, inds: mx.array, wts: mx.array, weights: list, intermediate: int,
           bits: int = 0, group_size: int = 64) -> mx.array:
    """The routed experts' SwiGLU output, weighted and summed: x (N, H), inds/wts (N, K) -> (N, H) float32.
    ``weights``: [gate, up, down] arrays, or for quantized experts each as (packed, scales, biases)."""
    N, H = x.shape
    K = inds.shape[-1]
    chunks = -(-intermediate // CHUNK)
    params = mx.array([N, K, H, intermediate, bits, group_size, chunks], dtype=mx.int32)
    note_used(NAME + (f" ({bits}-bit experts)" if bits else ""))
    return _kernel(backend, bits > 0)(inputs=[x, inds.astype(mx.uint32), wts.astype(mx.float32), *weights, params],
                                      output_shapes=[(N, H)], output_dtypes=[mx.float32],
                                      grid=(N * K * chunks * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
                                      init_value=0.0)[0]
