"""Running a kernel body without its GPU: C++ threads (and ThreadSanitizer), MLX's exact Metal rendering
parsed by clang, MLX's CUDA wrapping compiled by NVRTC. Shared by the kernel tests."""

from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from phi3mlx.kernels.portable import cpu_translation_unit

GXX = shutil.which("g++")
CLANG = shutil.which("clang++-14") or shutil.which("clang++")
CUDA_INCLUDE = next((p for p in ("/usr/local/cuda-13.0/include", "/usr/local/cuda/include") if os.path.isdir(p)),
                    None)


def translation_unit(K, quantized: bool = False, threads: int | None = None) -> str:
    """The C++-threads rendering of kernel module ``K`` (its NAME, body, cpu_params and THREADS, or
    ``threads`` per threadgroup)."""
    return cpu_translation_unit(K.NAME, K.body(quantized), K.cpu_params(quantized), threads=threads or K.THREADS)


def build_source(d: Path, source: str):
    """Compile a C++ translation unit into a shared library in ``d`` and load it."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "k.cpp").write_text(source)
    lib = d / "k.so"
    r = subprocess.run([GXX, "-O2", "-std=c++20", "-shared", "-fPIC", "-pthread", str(d / "k.cpp"), "-o", str(lib)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return ctypes.CDLL(str(lib))


def build(d: Path, K, quantized: bool = False, threads: int | None = None):
    return build_source(d, translation_unit(K, quantized, threads))


def ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def recording_kernel(names: list):
    """A stand-in for ``mx.fast.cuda_kernel`` that records each kernel name it is asked to build; the
    kernel it returns gives zeros of the requested outputs."""

    def make(name, **_):
        names.append(name)
        return lambda inputs, output_shapes, output_dtypes, **__: [mx.zeros(s, dtype=d)
                                                                   for s, d in zip(output_shapes, output_dtypes)]

    return make


def cpu_launch(lib, name: str, threads: int, calls: list | None = None):
    """A stand-in for the kernel object ``mx.fast.metal_kernel``/``cuda_kernel`` returns: it runs ``lib``'s
    C++ rendering ``run_<name>`` (built with ``threads`` per threadgroup) as the GPU launch would, so the
    Python wrapper's launch (inputs in order, output sizes, grid in threads, threadgroup, init_value) is
    tested with the body. Float inputs go in as float32; outputs start at ``init_value``, else NaN (a
    GPU leaves them undefined: every entry must be written). ``calls`` collects each launch's inputs."""

    def launch(inputs, output_shapes, output_dtypes, grid, threadgroup, init_value=None, **_):
        assert tuple(threadgroup) == (threads, 1, 1), threadgroup
        assert tuple(grid[1:]) == (1, 1) and grid[0] % threads == 0, grid
        if calls is not None:
            calls.append(inputs)
        arrays = [np.ascontiguousarray(np.array(a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a))
                  for a in inputs]
        fill = np.nan if init_value is None else init_value
        outs = [np.full(int(np.prod(s)), fill, dtype=np.float32) for s in output_shapes]
        getattr(lib, f"run_{name}")(*[ptr(a) for a in arrays + outs], ctypes.c_int(grid[0] // threads))
        return [mx.array(o.reshape(s)).astype(d) for o, s, d in zip(outs, output_shapes, output_dtypes)]

    return launch


def tsan_run(tmp_path: Path, K, main: str, extra_flags: list):
    """Build ``K``'s C++ rendering plus ``main`` with ThreadSanitizer and run it (skips without its runtime)."""
    src = tmp_path / "t.cpp"
    src.write_text(translation_unit(K) + main)
    exe = tmp_path / "t"
    r = subprocess.run([GXX, "-O1", "-g", "-std=c++20", "-pthread", "-fsanitize=thread", *extra_flags, str(src), "-o",
                        str(exe)], capture_output=True, text=True)
    if r.returncode != 0 and "tsan" in r.stderr.lower():
        pytest.skip("ThreadSanitizer runtime not available")
    assert r.returncode == 0, r.stderr[-3000:]
    return subprocess.run([str(exe)], capture_output=True, text=True, env={"TSAN_OPTIONS": "halt_on_error=0"})


METAL_STUB = r"""
#include <cstdint>
#define kernel
#define device
#define threadgroup
#define constant
typedef unsigned int uint;
typedef unsigned short ushort;
struct uint3 { uint x, y, z; };
struct uint4 { uint x, y, z, w; };
#define half __fp16  // a Metal type name: used as a variable name, it fails here as on a Mac
namespace metal { float exp(float); float max(float, float); }
enum class mem_flags { mem_threadgroup };
void threadgroup_barrier(mem_flags);
float simd_shuffle_xor(float, ushort);
template <typename T> struct atomic { T v; };
enum memory_order { memory_order_relaxed };
float atomic_fetch_add_explicit(atomic<float>*, float, memory_order);
#define INFINITY __builtin_inff()
"""


def captured_msl(capfd, kernel, args: list, output_shapes: list, grid: int, threads: int) -> str:
    """The exact MSL MLX generates for ``kernel`` called on ``args`` (float32 outputs of
    ``output_shapes``), captured by tracing under mx.export_function (no Metal device needed)."""

    def f(*a):
        return kernel(inputs=list(a), output_shapes=output_shapes, output_dtypes=[mx.float32] * len(output_shapes),
                      grid=(grid, 1, 1), threadgroup=(threads, 1, 1), verbose=True)[0]

    capfd.readouterr()
    try:
        mx.export_function(str(Path(tempfile.mkdtemp()) / "trace.mlxfn"), f, *args)
    except Exception:  # noqa: BLE001  (exporting may refuse the custom kernel after printing it)
        pass
    out = capfd.readouterr().out
    start = out.find("```\n") + 4
    return out[start : out.find("```", start)]


def clang_parses(msl: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """A clang syntax pass over the MSL against METAL_STUB (attributes removed)."""
    body = msl.replace("#include <metal_stdlib>", "").replace("using namespace metal;", "")
    body = re.sub(r"\[\[[^\]]*\]\]", "", body)
    src = tmp_path / "k.cpp"
    src.write_text(METAL_STUB + body)
    return subprocess.run([CLANG, "-fsyntax-only", "-std=c++17", "-x", "c++", str(src)], capture_output=True, text=True)


def cuda_wrap(name: str, header: str, src: str, signature: list) -> str:
    """The kernel as MLX's CUDA backend wraps it (mlx/backend/cuda/custom_kernel.cpp: its default header,
    ours, the signature in namespace mlx::core::cu), MLX's device utils stubbed by the CUDA type headers."""
    sig = ",\n".join(f"    {s}" for s in signature)
    return ("#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n#include <cuda/std/limits>\n"
            "#include <cooperative_groups.h>\n#define inf cuda::std::numeric_limits<float>::infinity()\n"
            + header + "namespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
            f"__global__ void custom_kernel_{name}(\n{sig}) {{\n{src}\n}}\n}} // namespace mlx::core::cu\n")


def _nvrtc():
    try:
        import nvidia
    except ImportError:
        pytest.skip("nvidia-cuda-nvrtc is not installed (pip install nvidia-cuda-nvrtc)")
    libs = [p for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "*", "lib", "libnvrtc.so*"))]
    if not libs:
        pytest.skip("libnvrtc not found")
    d = os.path.dirname(libs[0])
    for b in glob.glob(os.path.join(d, "libnvrtc-builtins.so*")):
        ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(sorted(libs)[0])


def nvrtc_compile(source: str) -> tuple[int, str]:
    """(return code, log) of compiling ``source`` for sm_90a with NVRTC as MLX does."""
    nv = _nvrtc()
    prog = ctypes.c_void_p()
    assert nv.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"k.cu", 0, None, None) == 0
    opts = [b"--gpu-architecture=sm_90a", b"--device-as-default-execution-space", b"-std=c++17",
            b"-I" + CUDA_INCLUDE.encode(), b"-I" + (CUDA_INCLUDE + "/cccl").encode()]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = nv.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nv.nvrtcGetProgramLog(prog, log)
    return rc, log.value.decode()
