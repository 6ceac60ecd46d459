"""Separable linear operators on grids as small dense matrices, one per axis.

Linear interpolation between grids and fixed smoothing filters act on each axis
independently. Written as an ``(n_out, n_in)`` matrix per axis, an operator and its adjoint
are three small matrix products: no autograd graph, no convolution set-up, and a composition
(smooth, then upsample) is one matrix per axis. The Adam stage applies such an operator to its
parameter grid and its transpose to the similarity gradient every iteration.

Layouts: volumes ``(C, I, J, K)``; matrices map an axis of length ``n_in`` to ``n_out``.
"""

from __future__ import annotations

from typing import Sequence

import torch


def linear_resize_matrix(n_out: int, n_in: int, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """``(n_out, n_in)`` weights of 1D linear interpolation, cell-centred (``align_corners=False``).

    Output sample ``o`` reads input position ``(o + 0.5) * n_in / n_out - 0.5``, clamped at 0 and
    between the last two samples as ``torch.nn.functional.interpolate`` does, so applying the
    matrix on every axis reproduces ``interpolate(..., mode="trilinear", align_corners=False)``.
    """
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = n_in / n_out
    for o in range(n_out):
        pos = max((o + 0.5) * scale - 0.5, 0.0)
        lo = min(int(pos), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        frac = pos - lo
        matrix[o, lo] += 1.0 - frac
        matrix[o, hi] += frac
    return matrix.to(dtype=dtype, device=device)


def filter_matrix(n: int, taps: Sequence[float], dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """``(n, n)`` matrix of a centred odd-length filter with zero padding (a Toeplitz band)."""
    half = len(taps) // 2
    matrix = torch.zeros(n, n, dtype=torch.float64)
    for offset, tap in zip(range(-half, half + 1), taps):
        if abs(offset) >= n:  # a filter longer than the axis: those taps fall on the padding
            continue
        matrix += torch.diag(torch.full((n - abs(offset),), float(tap), dtype=torch.float64), offset)
    return matrix.to(dtype=dtype, device=device)


def apply_separable(volume: torch.Tensor, matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(C, I, J, K)`` -> ``(C, I', J', K')`` with ``matrices[a]`` of shape ``(n_out_a, n_in_a)``."""
    mi, mj, mk = matrices
    c, i, j, _ = volume.shape
    out = torch.matmul(volume, mk.t())
    out = torch.matmul(mj, out)
    return torch.matmul(mi, out.reshape(c, i, -1)).reshape(c, mi.shape[0], mj.shape[0], mk.shape[0])


def apply_separable_adjoint(volume: torch.Tensor, matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """The transpose of :func:`apply_separable`: ``(C, I', J', K')`` -> ``(C, I, J, K)``."""
    return apply_separable(volume, [m.t() for m in matrices])
