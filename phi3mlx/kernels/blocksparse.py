"""Phi-3-small blocksparse attention for decoding (1 to 8 queries): one kernel body, three renderings.

Each threadgroup serves one (batch, query head, query) row with ``warps`` groups of 32 lanes (1 to
``MAX_WARPS``, a runtime value: more groups keep more key rows in flight on a large GPU). The row's
visible key blocks are computed from positions: the head's vertical-stride blocks before the local
window (kb = r (mod vert), r = -(h * step + 1) mod vert), then the local window of ``local`` blocks up
to the query's block, the causal cut only on that last block. Slot s of that list (block s / block,
key s % block) goes to group s mod ``warps``; each group's 32 lanes split the head dimension (D / 32 values a
lane, D <= 256), reduce the dot product with xor shuffles, and keep an online softmax in float32. The
groups' partial results merge through threadgroup memory after one barrier. Keys read per head: at most
``local * block + ceil(far blocks / vert) * block`` instead of T.

Inputs: ``q`` (B, H, L, D); ``k``, ``v`` the cache buffers (B, KV, cap, D) (capacity ``cap`` >= T: the
kernel reads only the visible rows, the buffer is never sliced or copied), or for a quantized cache
(``--kv-bits``) each as packed words, scales and biases (``k``, ``k_s``, ``k_b``, ...); ``params``
int32 [B, H, KV, L, T, D, offset, block, local, vert, step, cap, bits, group size, warps]; ``scale``
float32 [1]. Output (B, H, L, D). A threadgroup is ``32 * warps`` threads.
"""

from __future__ import annotations

import mlx.core as mx

from . import note_used
from .portable import packed, render

NAME = "blocksparse_decode"
MAX_WARPS = 16  # groups of 32 lanes a threadgroup may have (the merge buffer's size: 16 KB for D = 256)
WARPS = 8  # the groups a GPU launch uses (chosen from examples/gpu_kernel_check.py's sweep)
THREADS = 128  # the C++-threads rendering's threadgroup in the tests: 4 groups
MAX_D = 256
INPUTS = ["q", "k", "v", "params", "scale"]

BODY = r"""
K_SHARED float part_m[16];
K_SHARED float part_l[16];
K_SHARED float part_o[4096];
int nB = params[0], nH = params[1], nKV = params[2], nL = params[3], nT = params[4], nD = params[5];
int offset = params[6], block = params[7], local = params[8], vert = params[9], step = params[10];
int cap = params[11];
int bits = params[12], gsize = params[13], nW = params[14];
int row = (int)gid;
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
  int per = nD / 32;
  float qv[8];
  float acc[8];
  float sc = scale[0];
  for (int i = 0; i < per; ++i) {
    qv[i] = float(q[((b * nH + h) * nL + l) * nD + (int)lane + 32 * i]) * sc;
    acc[i] = 0.0f;
  }
  float m = K_NEG_INF;
  float s_sum = 0.0f;
  for (int s = (int)grp; s < n_slots; s += nW) {
    int bi = s / block;
    int t = s % block;
    int kb = bi < n_far ? r + bi * vert : first_local + (bi - n_far);
    int j = kb * block + t;
    if (j > pos || j >= nT) {
      continue;
    }
    int base = (b * nKV + kvh) * cap + j;  // the key's row in the cache buffer
    float d = 0.0f;
    for (int i = 0; i < per; ++i) {
      d += qv[i] * KLOAD(k, base, (int)lane + 32 * i);
    }
    for (uint mask = 16; mask > 0; mask >>= 1) {
      d += K_SHFL_XOR(d, mask);
    }
    float m_new = K_MAX(m, d);
    float corr = K_EXP(m - m_new);
    float pr = K_EXP(d - m_new);
    s_sum = s_sum * corr + pr;
    for (int i = 0; i < per; ++i) {
      acc[i] = acc[i] * corr + pr * KLOAD(v, base, (int)lane + 32 * i);
    }
    m = m_new;
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
    for (int i = 0; i < per; ++i) {
      val[i] = 0.0f;
    }
    for (int w = 0; w < nW; ++w) {
      float f = K_EXP(part_m[w] - mm);  // a group that saw no key has m = -inf, l = 0: f = 0
      total += part_l[w] * f;
      for (int i = 0; i < per; ++i) {
        val[i] += part_o[w * nD + (int)lane + 32 * i] * f;
      }
    }
    for (int i = 0; i < per; ++i) {
      out[((b * nH + h) * nL + l) * nD + (int)lane + 32 * i] = val[i] / total;
    }
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
    """(header, source) of the kernel for ``backend`` ("metal" or "cuda")."""
    return render(backend, body(quantized))


def cpu_params(quantized: bool = False) -> list[tuple[str, str]]:
    """The C++ parameters of the CPU rendering (float32 data; uint32 words for quantized keys)."""
    if quantized:
        cache = packed(("k", "v"))
    else:
        cache = [("const float*", "k"), ("const float*", "v")]
    return [("const float*", "q"), *cache, ("const int*", "params"), ("const float*", "scale"), ("float*", "out")]


_KERNELS: dict = {}


def _kernel(backend: str, quantized: bool):
    key = (backend, quantized)
    if key not in _KERNELS:
        header, src = source(backend, quantized)
        make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
        _KERNELS[key] = make(name=NAME + ("_q" if quantized else ""), input_names=QUANT_INPUTS if quantized else INPUTS,
                             output_names=["out"], source=src, header=header)
    return _KERNELS[key]


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
           warps: int | None = None) -> mx.array:
    """Blocksparse attention of q (B, H, L, D) over the first T rows of the cache buffers: ``keys`` and
    ``values`` are [buffer (B, KV, cap, D)] or, quantized, [packed, scales, biases]. ``warps``: groups
    of 32 lanes per row (default ``WARPS``)."""
    B, H, L, D = q.shape
    KV, cap = keys[0].shape[1], keys[0].shape[2]
    warps = WARPS if warps is None else warps
    if not 1 <= warps <= MAX_WARPS:
        raise ValueError(f"warps must be 1 to {MAX_WARPS}, got {warps}")
    params = mx.array([B, H, KV, L, T, D, offset, block, local, vert, step, cap, bits or 0, group_size, warps],
                      dtype=mx.int32)
    quantized = bits is not None
    note_used(NAME + (f" ({bits}-bit keys)" if quantized else ""))
    return _kernel(backend, quantized)(inputs=[q, *keys, *values, params, mx.array([scale], dtype=mx.float32)],
                                       output_shapes=[q.shape], output_dtypes=[q.dtype],
                                       grid=(B * H * L * 32 * warps, 1, 1), threadgroup=(32 * warps, 1, 1))[0]
