"""Optional numba JIT for the fused CPU kernels (``dinoreg.optim.cpu_kernels``, MIND).

``dinoreg.warmup.warm_up`` compiles them all once (``make setup``).

numba is a dependency, but every kernel has a torch twin (used on GPU and as the test
reference), so without numba dinoreg still runs, only slower on CPU. Kernels compile on first
use and are cached next to their module (``make setup`` compiles them once).
"""

from __future__ import annotations

import threading
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


def _runtime_probe(x: float) -> float:
    """A trivial function whose (cached) loading initialises numba's CPU target."""
    return x + 1.0


_probe = helper(_runtime_probe)
_preloading: threading.Thread | None = None


def preload() -> None:
    """Initialise numba's CPU target in a background thread, once per process.

    The first cached kernel a process loads pays for numba's target set-up (0.3-0.5 s of imports,
    ``scipy.linalg`` among them, for its BLAS check), holding the GIL but little CPU time while a
    registration starts by reading and normalising images (file decompression and numpy loops that
    release it). Started then, the set-up overlaps them instead of delaying the first kernel (which
    waits for it under numba's compiler lock if it comes first). Without numba, nothing happens.
    """
    global _preloading
    if numba is None or _preloading is not None:
        return
    _preloading = threading.Thread(target=_load_probe, name="dinoreg-numba-preload", daemon=True)
    _preloading.start()


def _load_probe() -> None:
    try:
        _probe(0.0)
    except Exception:  # pragma: no cover - the first real kernel reports any problem itself
        pass


def wait_for_preload() -> None:
    """Join the :func:`preload` thread if one was started (``warmup``: its cache is written)."""
    if _preloading is not None:
        _preloading.join()
