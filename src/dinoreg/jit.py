"""Optional numba JIT for the fused CPU kernels (``dinoreg.optim.cpu_kernels``, MIND).

``dinoreg.warmup.warm_up`` compiles them all once (``make setup``).

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


def exact_kernel(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``numba.njit(parallel=True, cache=True)`` *without* fastmath: every float operation as
    written, in IEEE order, so a kernel can reproduce a numpy reference bit for bit (metrics)."""
    if numba is None:
        return fn
    return numba.njit(parallel=True, cache=True)(fn)


def exact_helper(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``numba.njit(cache=True)`` without fastmath, for serial functions of exact kernels."""
    if numba is None:
        return fn
    return numba.njit(cache=True)(fn)


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
