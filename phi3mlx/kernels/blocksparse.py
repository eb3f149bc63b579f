"""Phi-3-small blocksparse attention for decoding (1 to 8 queries): one kernel body, three renderings.

A row is one (batch, query head, query). Its visible key blocks are computed from positions: the head's
vertical-stride blocks before the local window (kb = r (mod vert), r = -(h * step + 1) mod vert), then
the local window of ``local`` blocks up to the query's block, the causal cut only on that last block.
Slot s of that list is key s % block of block s / block. Keys read per head: at most
``local * block + ceil(far blocks / vert) * block`` instead of T.

Two passes (split keys, as in flash decoding, so that a single sequence fills a large GPU):

1. ``blocksparse_decode``: threadgroup ``g`` takes part ``g % parts`` of row ``g / parts``, the slots
   ``[part * span, (part + 1) * span)``. Its ``warps`` groups of 32 lanes take 4 consecutive slots a
   round (slots ``4 * (group + warps * round) ...``), so four key rows are loaded at once; the lanes
   split the head dimension (D / 32 values a lane, D <= 256), reduce the four dot products with xor
   shuffles and keep an online softmax in float32. The groups merge through threadgroup memory after
   one barrier, and the part writes its unnormalised output ``po`` with its maximum and weight sum
   ``pml``.
2. ``blocksparse_merge``: 32 lanes per row merge the row's parts into ``out``.

Inputs: ``q`` (B, H, L, D); ``k``, ``v`` the cache buffers (B, KV, cap, D) (capacity ``cap`` >= T: the
kernel reads only the visible rows, the buffer is never sliced or copied), or for a quantized cache
(``--kv-bits``) each as packed words, scales and biases (``k``, ``k_s``, ``k_b``, ...); ``params``
int32 [B, H, KV, L, T, D, offset, block, local, vert, step, cap, bits, group size, warps, parts, span];
``scale`` float32 [1]. Output (B, H, L, D).
"""

from __future__ import annotations

import mlx.core as mx

from . import note_used
from .portable import build, dtype_tag, packed, render

NAME = "blocksparse_decode"
MERGE_NAME = "blocksparse_merge"
MAX_WARPS = 16  # groups of 32 lanes a threadgroup may have (the merge buffer's size: 16 KB for D = 256)
WARPS = 4  # the groups a GPU launch uses
GROUPS = 1024  # threadgroups a launch aims at (rows x parts), enough to fill a large GPU
MIN_SPAN = 64  # slots a part takes at least
MAX_PARTS = 64
THREADS = 32 * WARPS  # a threadgroup of the first pass
MAX_D = 256
INPUTS = ["q", "k", "v", "params", "scale"]
OUTPUTS = ["po", "pml"]
MERGE_INPUTS = ["po", "pml", "params"]

BODY = r"""
K_SHARED float part_m[16];
K_SHARED float part_l[16];
K_SHARED float part_o[4096];
int nB = params[0], nH = params[1], nKV = params[2], nL = params[3], nT = params[4], nD = params[5];
int offset = params[6], block = params[7], local = params[8], vert = params[9], step = params[10];
int cap = params[11];
int bits = params[12], gsize = params[13], nW = params[14], nP = params[15], span = params[16];
int row = (int)gid / nP;
int part = (int)gid % nP;
if (row < nB * nH * nL) {
  uint lane = tid % 32;
  uint grp = tid / 32;
  int l = row % nL;
  int h = (row / nL) % nH;
  int b = row / (nL * nH);
  int kvh = h / (nH / nKV);
  int pos = offset + l;
  int qb = pos / block;
  int first_local = qb - local + 1 > 0 ? qb - local + 1 : 0;
  int r = ((-(h * step + 1)) % vert + vert) % vert;
  int n_far = first_local > r ? (first_local - r + vert - 1) / vert : 0;
  int n_slots = (n_far + qb - first_local + 1) * block;
  int s_begin = part * span;
  int s_end = s_begin + span < n_slots ? s_begin + span : n_slots;
  int per = nD / 32;
  float qv[8];
  float acc[8];
  float sc = scale[0];
  for (int i = 0; i < 8; ++i) {
    qv[i] = i < per ? float(q[((b * nH + h) * nL + l) * nD + (int)lane + 32 * i]) * sc : 0.0f;
    acc[i] = 0.0f;
  }
  float m = K_NEG_INF;
  float s_sum = 0.0f;
  long head_rows = (long)(b * nKV + kvh) * cap;  // rows of the cache buffer: 64-bit offsets from here on
  // each group takes 4 consecutive slots a round: their loads are independent, so all are in flight
  for (int s0 = s_begin + 4 * (int)grp; s0 < s_end; s0 += 4 * nW) {
    long base[4];
    bool ok[4];
    float d[4];
    for (int u = 0; u < 4; ++u) {
      int s = s0 + u;
      int bi = s / block;
      int kb = bi < n_far ? r + bi * vert : first_local + (bi - n_far);
      int j = kb * block + s % block;
      ok[u] = s < s_end && j <= pos && j < nT;
      base[u] = head_rows + (ok[u] ? j : 0);  // a slot past the end reads row 0 and is weighted 0
      d[u] = 0.0f;
    }
    for (int i = 0; i < 8; ++i) {
      if (i < per) {
        int c = (int)lane + 32 * i;
        float k0 = KLOAD(k, base[0], c);
        float k1 = KLOAD(k, base[1], c);
        float k2 = KLOAD(k, base[2], c);
        float k3 = KLOAD(k, base[3], c);
        d[0] += qv[i] * k0;
        d[1] += qv[i] * k1;
        d[2] += qv[i] * k2;
        d[3] += qv[i] * k3;
      }
    }
    for (uint mask = 16; mask > 0; mask >>= 1) {
      for (int u = 0; u < 4; ++u) {
        d[u] += K_SHFL_XOR(d[u], mask);
      }
    }
    if (ok[0] || ok[1] || ok[2] || ok[3]) {  // the same for every lane of the group
      float dmax = K_NEG_INF;
      for (int u = 0; u < 4; ++u) {
        dmax = ok[u] ? K_MAX(dmax, d[u]) : dmax;
      }
      float m_new = K_MAX(m, dmax);
      float corr = K_EXP(m - m_new);
      float p[4];
      for (int u = 0; u < 4; ++u) {
        p[u] = ok[u] ? K_EXP(d[u] - m_new) : 0.0f;
      }
      s_sum = s_sum * corr + (p[0] + p[1] + p[2] + p[3]);
      for (int i = 0; i < 8; ++i) {
        if (i < per) {
          int c = (int)lane + 32 * i;
          float v0 = KLOAD(v, base[0], c);
          float v1 = KLOAD(v, base[1], c);
          float v2 = KLOAD(v, base[2], c);
          float v3 = KLOAD(v, base[3], c);
          acc[i] = acc[i] * corr + (p[0] * v0 + p[1] * v1 + p[2] * v2 + p[3] * v3);
        }
      }
      m = m_new;
    }
  }
  if (lane == 0) {
    part_m[grp] = m;
    part_l[grp] = s_sum;
  }
  for (int i = 0; i < per; ++i) {
    part_o[(int)grp * nD + (int)lane + 32 * i] = acc[i];
  }
  K_BARRIER();
  if (grp == 0) {
    float mm = K_NEG_INF;
    for (int w = 0; w < nW; ++w) {
      mm = K_MAX(mm, part_m[w]);
    }
    float total = 0.0f;
    float val[8];
    for (int i = 0; i < 8; ++i) {
      val[i] = 0.0f;
    }
    for (int w = 0; w < nW; ++w) {
      float f = part_m[w] == K_NEG_INF ? 0.0f : K_EXP(part_m[w] - mm);  // a group that saw no key adds 0
      total += part_l[w] * f;
      for (int i = 0; i < per; ++i) {
        val[i] += part_o[w * nD + (int)lane + 32 * i] * f;
      }
    }
    // this part's result, relative to its own maximum (pml: that maximum and the sum of weights)
    for (int i = 0; i < per; ++i) {
      po[(int)gid * nD + (int)lane + 32 * i] = val[i];
    }
    if (lane == 0) {
      pml[2 * (int)gid] = mm;
      pml[2 * (int)gid + 1] = total;
    }
  }
}
"""

# The second pass: one group of 32 lanes per row merges the row's parts (online-softmax partials).
MERGE_BODY = r"""
int nB = params[0], nH = params[1], nL = params[3], nD = params[5], nP = params[15];
int row = (int)gid;
if (row < nB * nH * nL && tid < 32) {
  int per = nD / 32;
  float mm = K_NEG_INF;
  for (int p = 0; p < nP; ++p) {
    mm = K_MAX(mm, pml[2 * (row * nP + p)]);
  }
  float total = 0.0f;
  float val[8];
  for (int i = 0; i < 8; ++i) {
    val[i] = 0.0f;
  }
  for (int p = 0; p < nP; ++p) {
    float mp = pml[2 * (row * nP + p)];
    float f = mp == K_NEG_INF ? 0.0f : K_EXP(mp - mm);  // an empty part adds 0
    total += pml[2 * (row * nP + p) + 1] * f;
    for (int i = 0; i < per; ++i) {
      val[i] += po[(row * nP + p) * nD + (int)tid + 32 * i] * f;
    }
  }
  for (int i = 0; i < per; ++i) {
    out[row * nD + (int)tid + 32 * i] = val[i] / total;
  }
}
"""

# How a lane reads element d of a cache row: float rows (D values), or MLX's affine quantization
# (``mx.quantize``: ``bits`` 4 or 8, 32 / bits values per uint32 word, low bits first; value =
# scale * q + bias per group of ``gsize``), read straight from the packed words.
LOAD_FLOAT = "#define KLOAD(a, row, d) float(a[(row) * nD + (d)])\n"
LOAD_QUANT = ("#define KLOAD(a, row, d) (float(a##_s[(row) * (nD / gsize) + (d) / gsize]) * "
              "float((a[(row) * (nD * bits / 32) + (d) / (32 / bits)] >> (((d) % (32 / bits)) * bits)) & "
              "((1u << bits) - 1u)) + float(a##_b[(row) * (nD / gsize) + (d) / gsize]))\n")
QUANT_INPUTS = ["q", "k", "k_s", "k_b", "v", "v_s", "v_b", "params", "scale"]


def body(quantized: bool) -> str:
    return (LOAD_QUANT if quantized else LOAD_FLOAT) + BODY


def source(backend: str, quantized: bool = False) -> tuple[str, str]:
    """(header, source) of the first pass for ``backend`` ("metal" or "cuda")."""
    return render(backend, body(quantized))


def merge_source(backend: str) -> tuple[str, str]:
    """(header, source) of the second pass for ``backend``."""
    return render(backend, MERGE_BODY)


def cpu_params(quantized: bool = False) -> list[tuple[str, str]]:
    """The C++ parameters of the first pass's CPU rendering (float32 data; uint32 words for quantized keys)."""
    if quantized:
        cache = packed(("k", "v"))
    else:
        cache = [("const float*", "k"), ("const float*", "v")]
    return [("const float*", "q"), *cache, ("const int*", "params"), ("const float*", "scale"), ("float*", "po"),
            ("float*", "pml")]


def merge_cpu_params() -> list[tuple[str, str]]:
    return [("const float*", "po"), ("const float*", "pml"), ("const int*", "params"), ("float*", "out")]


def split(rows: int, T: int, offset: int, L: int, block: int, local: int, vert: int) -> tuple[int, int]:
    """(parts, span): how many parts each row's slots are split into, and the slots a part takes. The
    slots of the row's last query bound every row's: its local blocks, its far blocks (at most one in
    ``vert`` of them, plus one), in whole blocks."""
    qb = (offset + L - 1) // block
    far = max(0, qb + 1 - local)
    bound = (min(local, qb + 1) + -(-far // vert) + 1) * block
    parts = max(1, min(MAX_PARTS, bound // MIN_SPAN, -(-GROUPS // rows)))
    return parts, -(-bound // parts)


def _kernel(backend: str, quantized: bool, tag: str):
    """The first pass for ``backend``, float or quantized keys, built for the dtypes ``tag`` names."""
    return build(backend, f"{NAME}{'_q' if quantized else ''}_{tag}", QUANT_INPUTS if quantized else INPUTS,
                 OUTPUTS, lambda: source(backend, quantized))


def _merge_kernel(backend: str, tag: str):
    """The merge pass for ``backend``, writing the dtype ``tag`` names."""
    return build(backend, f"{MERGE_NAME}_{tag}", MERGE_INPUTS, ["out"], lambda: merge_source(backend))


def supports(q: mx.array, keys: list, bits, group_size: int) -> bool:
    """Whether the kernel takes these shapes and types (else the MLX-op path runs)."""
    D = q.shape[-1]
    if not (q.shape[2] <= 8 and D % 32 == 0 and D <= MAX_D and q.dtype in (mx.float32, mx.float16, mx.bfloat16)):
        return False
    if bits is None:
        return keys[0].dtype == q.dtype
    return bits in (4, 8) and D % group_size == 0


def decode(backend: str, q: mx.array, keys: list, values: list, T: int, offset: int, scale: float,
           block: int, local: int, vert: int, step: int, bits=None, group_size: int = 64,
           warps: int | None = None, parts: int | None = None) -> mx.array:
    """Blocksparse attention of q (B, H, L, D) over the first T rows of the cache buffers: ``keys`` and
    ``values`` are [buffer (B, KV, cap, D)] or, quantized, [packed, scales, biases]. ``warps``: groups
    of 32 lanes per threadgroup (default ``WARPS``); ``parts``: parts per row (default ``split``'s)."""
    B, H, L, D = q.shape
    KV, cap = keys[0].shape[1], keys[0].shape[2]
    warps = WARPS if warps is None else warps
    if not 1 <= warps <= MAX_WARPS:
        raise ValueError(f"warps must be 1 to {MAX_WARPS}, got {warps}")
    rows = B * H * L
    n, span = split(rows, T, offset, L, block, local, vert)
    if parts is not None:
        n, span = parts, -(-n * span // parts)
    params = mx.array([B, H, KV, L, T, D, offset, block, local, vert, step, cap, bits or 0, group_size, warps, n,
                       span], dtype=mx.int32)
    quantized = bits is not None
    note_used(NAME + (f" ({bits}-bit keys)" if quantized else ""))
    po, pml = _kernel(backend, quantized, dtype_tag(q.dtype, *(a.dtype for a in keys)))(
        inputs=[q, *keys, *values, params, mx.array([scale], dtype=mx.float32)],
        output_shapes=[(rows * n * D,), (rows * n * 2,)], output_dtypes=[mx.float32, mx.float32],
        grid=(rows * n * 32 * warps, 1, 1), threadgroup=(32 * warps, 1, 1))
    return _merge_kernel(backend, dtype_tag(q.dtype))(inputs=[po, pml, params], output_shapes=[q.shape],
                                                      output_dtypes=[q.dtype], grid=(rows * 32, 1, 1),
                                                      threadgroup=(32, 1, 1))[0]
