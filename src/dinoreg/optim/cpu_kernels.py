"""Fused CPU kernels (numba) for the hot loops of ConvexAdam.

* :func:`ssd_gradient`: the Adam stage's warp + residual + fixed-gradient product. In torch that
  is a 12-channel ``grid_sample`` and three channel reductions; here it is one pass over the
  cells, one set of trilinear weights for every channel, channel-last reads, no temporaries.
* :func:`ssd_cost_volume`: the convex stage's SSD over all integer displacements and its two
  3x3x3 box filters, without the ``(L, cells)`` temporaries of the torch version.
* :func:`coupled_argmin`: one coupling round's argmin without materialising the coupled costs.

Each computes what its torch twin in :mod:`dinoreg.optim.instance` / :mod:`dinoreg.optim.convex`
computes (``tests/test_cpu_kernels.py`` compares them); the torch twins run on GPU and where
numba is missing. Threads follow ``torch.get_num_threads()`` (see :mod:`dinoreg.jit`).

Layouts: ``float32`` numpy arrays; features channel-last ``(h, w, d, C)``; fields and gradients
``(3, h, w, d)`` in cell units, components ``(i, j, k)``.
"""

from __future__ import annotations

import numpy as np
import torch

from dinoreg.jit import kernel, prange, use_torch_threads


@kernel
def _ssd_gradient(mov: np.ndarray, fix: np.ndarray, field: np.ndarray, out: np.ndarray) -> None:
    h, w, d, channels = fix.shape
    for i in prange(h):
        residual = np.empty(channels, np.float32)
        im, ip = max(i - 1, 0), min(i + 1, h - 1)
        for j in range(w):
            jm, jp = max(j - 1, 0), min(j + 1, w - 1)
            for k in range(d):
                x = i + field[0, i, j, k]
                y = j + field[1, i, j, k]
                z = k + field[2, i, j, k]
                if x < 0 or y < 0 or z < 0 or x > h - 1 or y > w - 1 or z > d - 1:
                    out[0, i, j, k] = 0.0
                    out[1, i, j, k] = 0.0
                    out[2, i, j, k] = 0.0
                    continue
                x0, y0, z0 = min(int(x), h - 2), min(int(y), w - 2), min(int(z), d - 2)
                fx, fy, fz = x - x0, y - y0, z - z0
                gx, gy, gz = 1.0 - fx, 1.0 - fy, 1.0 - fz
                for c in range(channels):
                    value = (gx * (gy * (gz * mov[x0, y0, z0, c] + fz * mov[x0, y0, z0 + 1, c])
                                   + fy * (gz * mov[x0, y0 + 1, z0, c] + fz * mov[x0, y0 + 1, z0 + 1, c]))
                             + fx * (gy * (gz * mov[x0 + 1, y0, z0, c] + fz * mov[x0 + 1, y0, z0 + 1, c])
                                     + fy * (gz * mov[x0 + 1, y0 + 1, z0, c]
                                             + fz * mov[x0 + 1, y0 + 1, z0 + 1, c])))
                    residual[c] = value - fix[i, j, k, c]
                km, kp = max(k - 1, 0), min(k + 1, d - 1)
                gi = gj = gk = 0.0
                for c in range(channels):
                    r = residual[c]
                    gi += r * (fix[ip, j, k, c] - fix[im, j, k, c])
                    gj += r * (fix[i, jp, k, c] - fix[i, jm, k, c])
                    gk += r * (fix[i, j, kp, c] - fix[i, j, km, c])
                out[0, i, j, k] = 2.0 * gi / (ip - im)
                out[1, i, j, k] = 2.0 * gj / (jp - jm)
                out[2, i, j, k] = 2.0 * gk / (kp - km)

@kernel
def _ssd_cost(fix: np.ndarray, mov: np.ndarray, disp_hw: int, out: np.ndarray) -> None:
    h, w, d, channels = fix.shape
    for i in prange(h):
        for j in range(w):
            for k in range(d):
                label = 0
                for a in range(-disp_hw, disp_hw + 1):
                    for b in range(-disp_hw, disp_hw + 1):
                        for e in range(-disp_hw, disp_hw + 1):
                            x, y, z = i + a, j + b, k + e
                            total = 0.0
                            if 0 <= x < h and 0 <= y < w and 0 <= z < d:
                                for c in range(channels):
                                    diff = fix[i, j, k, c] - mov[x, y, z, c]
                                    total += diff * diff
                            else:  # the moving volume is zero padded
                                for c in range(channels):
                                    total += fix[i, j, k, c] * fix[i, j, k, c]
                            out[i, j, k, label] = total
                            label += 1

@kernel
def _box3_axis(src: np.ndarray, di: int, dj: int, dk: int, out: np.ndarray) -> None:
    """Mean of each cell and its two neighbours along ``(di, dj, dk)`` (zero padded, / 3)."""
    h, w, d, labels = src.shape
    third = np.float32(1.0 / 3.0)
    for i in prange(h):
        for j in range(w):
            for k in range(d):
                lo = 0 <= i - di and 0 <= j - dj and 0 <= k - dk
                hi = i + di < h and j + dj < w and k + dk < d
                for label in range(labels):
                    total = src[i, j, k, label]
                    if lo:
                        total += src[i - di, j - dj, k - dk, label]
                    if hi:
                        total += src[i + di, j + dj, k + dk, label]
                    out[i, j, k, label] = total * third

@kernel
def _coupled_argmin(cost: np.ndarray, field: np.ndarray, candidates: np.ndarray, penalty: np.ndarray,
                    coeff: float, out: np.ndarray) -> None:
    cells, labels = cost.shape
    for n in prange(cells):
        fi, fj, fk = field[n, 0], field[n, 1], field[n, 2]
        best, best_label = np.inf, 0
        for label in range(labels):
            cross = candidates[label, 0] * fi + candidates[label, 1] * fj + candidates[label, 2] * fk
            value = cost[n, label] + penalty[label] - 2.0 * coeff * cross
            if value < best:
                best, best_label = value, label
        out[n] = best_label


def channels_last(volume: torch.Tensor) -> np.ndarray:
    """``(1, C, h, w, d)`` tensor -> contiguous ``(h, w, d, C)`` float32 numpy array."""
    return np.ascontiguousarray(volume[0].detach().permute(1, 2, 3, 0).to(torch.float32).numpy())


def ssd_gradient(mov_cl: np.ndarray, fix_cl: np.ndarray, field: torch.Tensor) -> torch.Tensor:
    """``dSSD/du`` per cell with the fixed-image gradient (demons-style), masked outside the moving grid.

    Args:
        mov_cl, fix_cl: channel-last ``(h, w, d, C)`` features (see :func:`channels_last`).
        field: ``(1, 3, h, w, d)`` displacement in cells.

    Returns:
        ``(1, 3, h, w, d)`` float32 tensor ``2 * sum_c (M_c(x + u) - F_c(x)) * grad F_c(x)``, with
        central differences inside and one-sided ones at the edges, zero where ``x + u`` leaves
        the grid. Every axis must have at least two cells.
    """
    if min(fix_cl.shape[:3]) < 2:
        raise ValueError(f"ssd_gradient needs at least 2 cells per axis, got {fix_cl.shape[:3]}")
    use_torch_threads()
    components = np.ascontiguousarray(field[0].detach().to(torch.float32).numpy())
    out = np.empty_like(components)
    _ssd_gradient(mov_cl, fix_cl, components, out)
    return torch.from_numpy(out).unsqueeze(0)


def ssd_cost_volume(fix_cl: np.ndarray, mov_cl: np.ndarray, disp_hw: int) -> np.ndarray:
    """Twice 3x3x3-box-filtered SSD cost of every integer displacement, see
    :func:`dinoreg.optim.convex.ssd_cost_volume` (same values, ``(h * w * d, L)``).

    ``fix_cl``, ``mov_cl``: channel-last ``(h, w, d, C)`` cell features; the moving one reads
    zeros outside the grid; the box filter is zero padded and divides by 27.
    """
    use_torch_threads()
    h, w, d, _ = fix_cl.shape
    labels = (2 * disp_hw + 1) ** 3
    cost = np.empty((h, w, d, labels), np.float32)
    _ssd_cost(fix_cl, mov_cl, disp_hw, cost)
    scratch = np.empty_like(cost)
    for _ in range(2):
        for step in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):
            _box3_axis(cost, *step, scratch)
            cost, scratch = scratch, cost
    return cost.reshape(h * w * d, labels)


def coupled_argmin(cost: np.ndarray, field: np.ndarray, candidates: np.ndarray, penalty: np.ndarray,
                   coeff: float) -> np.ndarray:
    """Per cell, the label minimising ``cost + penalty - 2 coeff * candidate . field``.

    ``cost`` ``(N, L)``, ``field`` ``(N, 3)``, ``candidates`` ``(L, 3)``, ``penalty`` ``(L,)``
    (float32); returns ``(N,)`` int64 labels, the first one on ties.
    """
    use_torch_threads()
    out = np.empty(cost.shape[0], np.int64)
    _coupled_argmin(cost, field, candidates, penalty, coeff, out)
    return out
