"""One kernel body, three renderings: Metal (``mx.fast.metal_kernel``), CUDA (``mx.fast.cuda_kernel``)
and C++ threads on the CPU (tests: run the body with g++ and ThreadSanitizer).

A body is written in the common subset of Metal Shading Language and CUDA C++, against this header:

* ``uint``, ``KFLOAT(x)`` (a float literal), ``K_NEG_INF``;
* ``K_EXP(x)``, ``K_MAX(a, b)``;
* ``K_SHARED`` before a threadgroup array declaration (``K_SHARED float buf[128];``): threadgroup /
  ``__shared__`` / one array per threadgroup on the CPU;
* ``K_ATOMIC_ADD(out, i, v)``: ``out[i] += v`` atomically, float32 (Metal kernels built with
  ``atomic_outputs=True``);
* ``K_BARRIER()``: the whole threadgroup; ``K_SHFL_XOR(x, mask)``: exchange with lane ``lane ^ mask`` of
  the same 32-lane group (every lane of the group must call it);
* ``K_IN(T)`` / ``K_OUT(T)``: pointer types of inputs and outputs for helper functions and casts
  (``(K_IN(uint4))(words)`` reads 4 words as one 16-byte vector: ``uint4`` with ``.x .y .z .w`` is
  CUDA's and Metal's own type, a struct in the C++ rendering).

The per-backend prologue (``prologue``) defines ``tid`` (thread index in the threadgroup) and ``gid``
(threadgroup index in the grid) from the backend's attributes; it goes into the kernel *source* so
that MLX's Metal code generation sees the attribute names and adds them to the signature. Runtime
sizes come in as small int32 arrays, never as template values (a template value recompiles per value).
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

HEADER_METAL = """
#include <metal_stdlib>
using namespace metal;
#define KFLOAT(x) x##f
#define K_NEG_INF (-INFINITY)
#define K_EXP(x) metal::exp(x)
#define K_MAX(a, b) metal::max(a, b)
#define K_SHARED threadgroup
#define K_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define K_SHFL_XOR(x, m) simd_shuffle_xor(x, (ushort)(m))
#define K_IN(T) const device T*
#define K_OUT(T) device T*
#define K_ATOMIC_ADD(a, i, v) atomic_fetch_add_explicit(&a[i], v, memory_order_relaxed)
"""

HEADER_CUDA = """
typedef unsigned int uint;
#define KFLOAT(x) x##f
#define K_NEG_INF (-__int_as_float(0x7f800000))
#define K_EXP(x) expf(x)
#define K_MAX(a, b) fmaxf(a, b)
#define K_SHARED __shared__
#define K_BARRIER() __syncthreads()
#define K_SHFL_XOR(x, m) __shfl_xor_sync(0xffffffffu, x, m)
#define K_IN(T) const T*
#define K_OUT(T) T*
#define K_ATOMIC_ADD(a, i, v) atomicAdd(&a[i], v)
"""

# The CPU rendering: the body becomes a function run by one std::thread per GPU thread of a
# threadgroup; K_SHARED arrays live in a per-threadgroup arena (every thread declares them in the same
# order, so each declaration lands at the same offset); shuffles go through a per-32-lane scratch array
# between two barriers of that group.
HEADER_CPU = r"""
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
typedef unsigned int uint;
struct uint4 { uint x, y, z, w; };  // CUDA's and Metal's 16-byte vector of 4 words
#define KFLOAT(x) x##f
#define K_NEG_INF (-INFINITY)
#define K_EXP(x) std::exp(x)
#define K_MAX(a, b) std::fmax(a, b)
#define K_IN(T) const T*
#define K_OUT(T) T*
#define K_ATOMIC_ADD(a, i, v) std::atomic_ref<float>(a[i]).fetch_add(v, std::memory_order_relaxed)

struct KGroup {
  std::barrier<>* all;
  std::vector<std::barrier<>*> warps;
  std::vector<float> scratch;  // 32 floats per warp
  std::vector<unsigned char> arena;
};

struct KThread {
  KGroup* g;
  uint tid;
  size_t arena_at = 0;
  float shfl(float x, uint m) {
    uint w = tid / 32, lane = tid % 32;
    g->scratch[w * 32 + lane] = x;
    g->warps[w]->arrive_and_wait();
    float y = g->scratch[w * 32 + (lane ^ m)];
    g->warps[w]->arrive_and_wait();
    return y;
  }
  template <typename T> T* shared(size_t n) {
    size_t at = (arena_at + alignof(T) - 1) / alignof(T) * alignof(T);
    arena_at = at + n * sizeof(T);
    return reinterpret_cast<T*>(g->arena.data() + at);
  }
};

#define K_SHARED_ARRAY(T, name, n) T* name = kt.shared<T>(n)
#ifndef K_NO_BARRIER
#define K_BARRIER() kt.g->all->arrive_and_wait()
#else
#define K_BARRIER() ((void)0)
#endif
#define K_SHFL_XOR(x, m) kt.shfl(x, m)
"""


def prologue(backend: str) -> str:
    """Source lines that define ``tid`` and ``gid`` on ``backend`` ("metal", "cuda" or "cpu")."""
    if backend == "metal":
        return ("uint tid = thread_position_in_threadgroup.x;\n"
                "uint gid = threadgroup_position_in_grid.x;\n")
    if backend == "cuda":
        return "uint tid = threadIdx.x;\nuint gid = blockIdx.x;\n"
    if backend == "cpu":
        return ""  # tid and gid are the function's parameters
    raise ValueError(backend)


def shared_decls(body: str, backend: str) -> str:
    """``K_SHARED T name[N];`` lines -> the backend's form (the CPU arena for C++ threads)."""
    if backend != "cpu":
        return body
    out = []
    for line in body.splitlines():
        s = line.strip()
        if s.startswith("K_SHARED "):
            decl = s[len("K_SHARED "):].rstrip(";")
            typ, rest = decl.split(None, 1)
            name, n = rest.split("[", 1)
            out.append(f"{line[: len(line) - len(line.lstrip())]}K_SHARED_ARRAY({typ}, {name.strip()}, {n.rstrip(']')});")
        else:
            out.append(line)
    return "\n".join(out)


def dtype_tag(*dtypes) -> str:
    """A kernel-name suffix for the data types a launch reads and writes. MLX keeps a compiled custom
    kernel under its name, but the generated signature's pointer types follow the arrays' dtypes: a
    kernel built for bfloat16 must not be found again for float32."""
    return "_".join(str(d).split(".")[-1] for d in dtypes)


BUILT: dict = {}  # (backend, kernel name) -> the kernel object MLX made


def build(backend: str, name: str, input_names: list, output_names: list,
          make_source: Callable[[], tuple[str, str]], atomic_outputs: bool = False):
    """The custom kernel ``name`` for ``backend`` ("metal" or "cuda"), made on first use from
    ``make_source()`` = (header, source) and kept (the name says everything its source depends on:
    variant and dtypes). ``atomic_outputs``: Metal's outputs as atomics (CUDA's are plain pointers)."""
    key = (backend, name)
    if key not in BUILT:
        header, src = make_source()
        if backend == "metal":
            BUILT[key] = mx.fast.metal_kernel(name=name, input_names=input_names, output_names=output_names,
                                              source=src, header=header, atomic_outputs=atomic_outputs)
        else:
            BUILT[key] = mx.fast.cuda_kernel(name=name, input_names=input_names, output_names=output_names,
                                             source=src, header=header)
    return BUILT[key]


def render(backend: str, body: str) -> tuple[str, str]:
    """(header, source) of a kernel body for ``backend`` ("metal" or "cuda")."""
    header = {"metal": HEADER_METAL, "cuda": HEADER_CUDA}[backend]
    return header, prologue(backend) + shared_decls(body, backend)


def packed(names) -> list[tuple[str, str]]:
    """C++ parameters of quantized arrays: each name's packed words, then its float scales and biases."""
    return [(t, n) for x in names
            for t, n in (("const uint32_t*", x), ("const float*", x + "_s"), ("const float*", x + "_b"))]


def cpu_translation_unit(name: str, body: str, params: list[tuple[str, str]], helpers: str = "",
                         threads: int = 128) -> str:
    """A C++ file exposing ``extern "C" void run_<name>(params..., int groups)`` that runs ``body``
    for every threadgroup, one after another, with ``threads`` std::threads (the same body the GPU
    renderings run)."""
    sig = ", ".join(f"{t} {n}" for t, n in params)
    args = ", ".join(n for _, n in params)
    return f"""{HEADER_CPU}
{helpers}
static void body_{name}(KThread& kt, uint tid, uint gid, {sig}) {{
{shared_decls(body, "cpu")}
}}

extern "C" void run_{name}({sig}, int groups) {{
  const uint T = {threads};
  KGroup grp;
  std::barrier<> all(T);
  std::vector<std::barrier<>*> warps;
  for (uint w = 0; w < (T + 31) / 32; ++w) warps.push_back(new std::barrier<>(32));
  grp.all = &all;
  grp.warps = warps;
  grp.scratch.assign(((T + 31) / 32) * 32, 0.0f);
  grp.arena.assign(1 << 16, 0);
  std::vector<std::thread> ts;
  // the same T threads serve every threadgroup in turn; a barrier after each frees its shared memory
  for (uint t = 0; t < T; ++t)
    ts.emplace_back([&, t]() {{
      for (int g = 0; g < groups; ++g) {{
        KThread kt{{&grp, t}};
        body_{name}(kt, t, (uint)g, {args});
        all.arrive_and_wait();
      }}
    }});
  for (auto& th : ts) th.join();
  for (auto* w : warps) delete w;
}}
"""
