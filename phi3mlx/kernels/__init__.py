"""Custom kernels (Phi-3-small blocksparse decode attention, Phi-3.5-MoE expert decode), each written
once for Metal, CUDA and C++ threads.

``backend()`` says which GPU rendering this machine runs ("metal", "cuda" or None: the CPU backend runs
the MLX-op path). ``set_enabled(False)`` (``--no-kernels``) switches every kernel off; ``used()``
lists the kernels that ran since the last ``reset_used()`` (what ``phi3mlx bench`` reports).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

_ENABLED = True
_USED: set = set()


def backend() -> Optional[str]:
    """The GPU rendering this machine can run, or None."""
    if not _ENABLED:
        return None
    if mx.default_device() != mx.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    return "cuda"  # MLX's other GPU backend


def set_enabled(on: bool) -> None:
    global _ENABLED
    _ENABLED = bool(on)


def enabled() -> bool:
    return _ENABLED


def note_used(name: str) -> None:
    _USED.add(name)


def used() -> list[str]:
    return sorted(_USED)


def reset_used() -> None:
    _USED.clear()
