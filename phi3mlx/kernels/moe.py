"""Phi-3.5-MoE expert layer for decoding (a few tokens): one fused kernel body, three renderings.

For token n and its routed slot j (expert e = inds[n, j], router weight w = wts[n, j]), the layer is
``w * down[e] @ (silu(gate[e] @ x) * (up[e] @ x))``, summed over slots. One threadgroup serves one
(token, slot, chunk of ``CHUNK`` intermediate rows):

0. the token goes into threadgroup memory as float32;
1. its 8 groups of 32 lanes take the chunk's rows i in turn, gate row i and up row i together (the
   lanes split the hidden dimension, reading 16-byte vectors of packed words, two rows' worth in flight,
   and reduce with xor shuffles);
2. after a barrier, the chunk's SwiGLU values go into threadgroup memory;
3. after a second, each thread takes two output rows of ``down[e]`` a round (rows tid, tid + 256, then
   the next 512), dots their chunk columns with those values and adds ``w * dot`` to ``out[n, row]``
   atomically (float32, zero-initialised).

Every expert weight the token's experts need is read exactly once; nothing else is read.

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
from .portable import build, dtype_tag, packed, render

NAME = "moe_decode"
THREADS = 256  # 8 groups of 32 lanes
CHUNK = 64  # intermediate rows per threadgroup (the body's gu/hv sizes)
MAX_TOKENS = 8
MAX_HIDDEN = 4096  # the token in threadgroup memory (16.5 KB with its padding)
INPUTS = ["x", "inds", "wts", "wg", "wu", "wd", "params"]
QUANT_INPUTS = ["x", "inds", "wts", "wg", "wg_s", "wg_b", "wu", "wu_s", "wu_b", "wd", "wd_s", "wd_b", "params"]

BODY = r"""
K_SHARED float xs[4224];
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
  // 0. the token as float32 in threadgroup memory, one pad slot after every 32 values (XS), so that the
  //    32 lanes, each reading its own run of 32 values, hit 32 different banks
  for (int j = (int)tid; j < nHd; j += 256) {
    xs[XS(j)] = float(x[n * nHd + j]);
  }
  K_BARRIER();
  // 1. the chunk's gate and up rows, row i of both together, one 32-lane group per i
  for (int ii = (int)sg; ii < 64; ii += 8) {
    int i = i0 + ii;
    float dg = 0.0f;
    float du = 0.0f;
    if (i < nI) {
      long row = (long)e * nI + i;
      ROW2_DOT_X(wg, wu, row, dg, du);
    }
    for (uint mask = 16; mask > 0; mask >>= 1) {
      dg += K_SHFL_XOR(dg, mask);
      du += K_SHFL_XOR(du, mask);
    }
    if (lane == 0) {
      gu[ii] = dg;
      gu[64 + ii] = du;
    }
  }
  K_BARRIER();
  // 2. SwiGLU of the chunk
  if (tid < 64) {
    float g = gu[tid];
    hv[tid] = (int)tid < len ? g / (1.0f + K_EXP(-g)) * gu[64 + tid] : 0.0f;
  }
  K_BARRIER();
  // 3. the down projection's chunk columns, two output rows a round, weighted by the router, added
  //    into the output
  for (int o = (int)tid; o < nHd; o += 512) {
    int o2 = o + 256 < nHd ? o + 256 : o;
    long ra = (long)e * nHd + o;
    long rb = (long)e * nHd + o2;
    float da = 0.0f;
    float db = 0.0f;
    CHUNK2_DOT_H(wd, ra, rb, da, db);
    K_ATOMIC_ADD(out, n * nHd + o, wr * da);
    if (o2 != o) {
      K_ATOMIC_ADD(out, n * nHd + o2, wr * db);
    }
  }
}
"""

# ROW2_DOT_X(a1, a2, row, acc1, acc2): this lane's share of row ``row`` of a1 and of a2 (rows of H values)
# dotted with the token; CHUNK2_DOT_H(a, ra, rb, acc_a, acc_b): columns i0 .. i0 + len of rows ra and rb of a
# (rows of I values) dotted with hv. Quantized rows are read as 16-byte vectors of 4 packed words.
DOTS_FLOAT = r"""
#define XS(j) ((j) + (j) / 32)
#define ROW2_DOT_X(a1, a2, row, acc1, acc2) \
  for (int j = (int)lane; j < nHd; j += 64) { \
    int j2 = j + 32 < nHd ? j + 32 : j; \
    float g1 = float(a1[(row) * nHd + j]); \
    float u1 = float(a2[(row) * nHd + j]); \
    float g2 = float(a1[(row) * nHd + j2]); \
    float u2 = float(a2[(row) * nHd + j2]); \
    float x1 = xs[XS(j)]; \
    float x2 = j2 != j ? xs[XS(j2)] : 0.0f; \
    acc1 += g1 * x1 + g2 * x2; \
    acc2 += u1 * x1 + u2 * x2; \
  }
#define CHUNK2_DOT_H(a, ra, rb, acc_a, acc_b) \
  for (int j = 0; j < len; ++j) { \
    float hj = hv[j]; \
    acc_a += float(a[(ra) * nI + i0 + j]) * hj; \
    acc_b += float(a[(rb) * nI + i0 + j]) * hj; \
  }
"""

DOTS_QUANT = r"""
#define XS(j) ((j) + (j) / 32)
#define ROW2_DOT_X(a1, a2, row, acc1, acc2) { \
  int vpw = 32 / bits, wpr = nHd / vpw, nv = wpr / 4, gpr = nHd / gsize; \
  uint qmask = (1u << bits) - 1u; \
  K_IN(uint4) r1 = (K_IN(uint4))(a1 + (row) * wpr); \
  K_IN(uint4) r2 = (K_IN(uint4))(a2 + (row) * wpr); \
  for (int v0 = (int)lane; v0 < nv; v0 += 64) { \
    int vb = v0 + 32 < nv ? v0 + 32 : v0; \
    uint4 pv[4]; \
    pv[0] = r1[v0]; \
    pv[1] = r2[v0]; \
    pv[2] = r1[vb]; \
    pv[3] = r2[vb]; \
    for (int hf = 0; hf < 2; ++hf) { \
      int vi = hf == 0 ? v0 : vb; \
      if (hf == 0 || vb != v0) { \
        uint w1[4] = {pv[2 * hf].x, pv[2 * hf].y, pv[2 * hf].z, pv[2 * hf].w}; \
        uint w2[4] = {pv[2 * hf + 1].x, pv[2 * hf + 1].y, pv[2 * hf + 1].z, pv[2 * hf + 1].w}; \
        int col = vi * 4 * vpw; \
        float q1 = 0.0f, q2 = 0.0f, sx = 0.0f; \
        for (int t = 0; t < 4; ++t) { \
          for (int j = 0; j < vpw; ++j) { \
            int cc = col + t * vpw + j; \
            float xv = xs[XS(cc)]; \
            q1 += float((w1[t] >> (j * bits)) & qmask) * xv; \
            q2 += float((w2[t] >> (j * bits)) & qmask) * xv; \
            sx += xv; \
          } \
        } \
        int g = col / gsize; \
        acc1 += float(a1##_s[(row) * gpr + g]) * q1 + float(a1##_b[(row) * gpr + g]) * sx; \
        acc2 += float(a2##_s[(row) * gpr + g]) * q2 + float(a2##_b[(row) * gpr + g]) * sx; \
      } \
    } \
  } }
#define CHUNK2_DOT_H(a, ra, rb, acc_a, acc_b) { \
  int vpw = 32 / bits, wpr = nI / vpw, gpr = nI / gsize, nvc = len / (4 * vpw); \
  uint qmask = (1u << bits) - 1u; \
  K_IN(uint4) pa_ = (K_IN(uint4))(a + (ra) * wpr + i0 / vpw); \
  K_IN(uint4) pb_ = (K_IN(uint4))(a + (rb) * wpr + i0 / vpw); \
  uint4 va[4]; \
  uint4 vb[4]; \
  for (int vi = 0; vi < 4; ++vi) { \
    if (vi < nvc) { \
      va[vi] = pa_[vi]; \
      vb[vi] = pb_[vi]; \
    } \
  } \
  for (int vi = 0; vi < 4; ++vi) { \
    if (vi < nvc) { \
      uint wa[4] = {va[vi].x, va[vi].y, va[vi].z, va[vi].w}; \
      uint wb[4] = {vb[vi].x, vb[vi].y, vb[vi].z, vb[vi].w}; \
      float qa = 0.0f, qb = 0.0f, sh = 0.0f; \
      for (int t = 0; t < 4; ++t) { \
        for (int j = 0; j < vpw; ++j) { \
          float hj = hv[vi * 4 * vpw + t * vpw + j]; \
          qa += float((wa[t] >> (j * bits)) & qmask) * hj; \
          qb += float((wb[t] >> (j * bits)) & qmask) * hj; \
          sh += hj; \
        } \
      } \
      int g = (i0 + vi * 4 * vpw) / gsize; \
      acc_a += float(a##_s[(ra) * gpr + g]) * qa + float(a##_b[(ra) * gpr + g]) * sh; \
      acc_b += float(a##_s[(rb) * gpr + g]) * qb + float(a##_b[(rb) * gpr + g]) * sh; \
    } \
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


def _kernel(backend: str, quantized: bool, tag: str):
    """The kernel for ``backend``, float or quantized experts, built for the dtypes ``tag`` names."""
    return build(backend, f"{NAME}{'_q' if quantized else ''}_{tag}", QUANT_INPUTS if quantized else INPUTS,
                 ["out"], lambda: source(backend, quantized), atomic_outputs=True)


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
    if H > MAX_HIDDEN:
        return False
    if bits == 0:
        return all(w[0].dtype == x.dtype for w, _, _ in parts)
    # rows and chunks in whole 16-byte vectors of 4 words, each vector inside one quantization group
    return H % gs == 0 and I % gs == 0 and gs % 32 == 0 and (H * bits // 32) % 4 == 0 and I % 32 == 0


def decode(backend: str, x: mx.array, inds: mx.array, wts: mx.array, weights: list, intermediate: int,
           bits: int = 0, group_size: int = 64) -> mx.array:
    """The routed experts' SwiGLU output, weighted and summed: x (N, H), inds/wts (N, K) -> (N, H) float32.
    ``weights``: [gate, up, down] arrays, or for quantized experts each as (packed, scales, biases)."""
    N, H = x.shape
    K = inds.shape[-1]
    chunks = -(-intermediate // CHUNK)
    params = mx.array([N, K, H, intermediate, bits, group_size, chunks], dtype=mx.int32)
    note_used(NAME + (f" ({bits}-bit experts)" if bits else ""))
    tag = dtype_tag(x.dtype, *(a.dtype for a in weights))
    return _kernel(backend, bits > 0, tag)(inputs=[x, inds.astype(mx.uint32), wts.astype(mx.float32), *weights, params],
                                      output_shapes=[(N, H)], output_dtypes=[mx.float32],
                                      grid=(N * K * chunks * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
                                      init_value=0.0)[0]
