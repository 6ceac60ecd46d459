"""Optional numba JIT for the fused CPU kernels (``dinoreg.optim.cpu_kernels``, MIND).

numba is a dependency, but every kernel has a torch twin (used on GPU and as the test
reference), so without numba dinoreg still runs, only slower on CPU. Kernels compile on first
use and are cached next to their module (``make setup`` compiles them once).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

try:
    import numba
    from numba import prange
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None
    prange = range


def available() -> bool:
    """Whether the fused CPU kernels can run (numba importable)."""
    return numba is not None


def kernel(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``numba.njit(parallel=True, fastmath=True, cache=True)``, or ``fn`` itself without numba."""
    if numba is None:
        return fn
    return numba.njit(parallel=True, fastmath=True, cache=True)(fn)


def helper(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``numba.njit(fastmath=True, cache=True)`` for serial functions called from kernels."""
    if numba is None:
        return fn
    return numba.njit(fastmath=True, cache=True)(fn)


def use_torch_threads() -> None:
    """Run numba's parallel loops on as many threads as torch uses."""
    if numba is not None:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def fused_cpu_for(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether fused CPU kernels handle tensors of this device and dtype (float32 on CPU, numba present)."""
    return numba is not None and torch.device(device).type == "cpu" and dtype == torch.float32


def fused_cpu(tensor: torch.Tensor) -> bool:
    """Whether a fused CPU kernel should handle ``tensor`` (see :func:`fused_cpu_for`)."""
    return fused_cpu_for(tensor.device, tensor.dtype)


def warm_up() -> float:
    """Compile (or load from the cache) every fused kernel by registering a small synthetic pair.

    Returns the seconds it took. ``make setup`` runs it once so the first real registration
    does not pay the compilation (about 20 s on 2 cores).
    """
    import time

    import numpy as np

    from dinoreg.api import register
    from dinoreg.optim import cpu_kernels

    start = time.perf_counter()
    grid = np.indices((24, 26, 28), dtype=np.float32)
    fixed = np.sin(grid[0] / 3.0) * np.cos(grid[1] / 4.0) + grid[2] / 28.0
    moving = np.roll(fixed, 1, axis=0)
    register(fixed, moving, preset_name="mind", device="cpu", progress=False, iterations=2)
    # the generic (not 12-channel) SSD-gradient kernel that learned encoders' features use
    features = np.ascontiguousarray(np.stack([fixed] * 5, axis=-1))
    cpu_kernels.ssd_gradient(features, features, torch.zeros(1, 3, *fixed.shape))
    return time.perf_counter() - start

