"""Fused CPU kernels (numba) for the hot loops of ConvexAdam.

* :func:`ssd_gradient`: the Adam stage's warp, residual and SSD gradient. In torch that is a
  12-channel ``grid_sample`` forward and backward through autograd; here it is one pass over
  the cells, one set of trilinear weights for every channel, channel-last reads, no graph.
* :func:`ssd_cost_volume`: the convex stage's SSD over all integer displacements and its two
  3x3x3 box filters, without the ``(L, cells)`` temporaries of the torch version.
* :func:`coupled_argmin`: one coupling round's argmin without materialising the coupled costs.
* :func:`separable_filter`: the Adam stage's field smoothing (7 taps per axis), not a dense matrix,
  and :func:`add_diffusion_gradient`, the regulariser's gradient added in place.
* :func:`box_smooth`: ``final_smooth``'s mean filter (``final_smoothing``, ``mi_base_smoothing``)
  by running sums, O(1) per voxel whatever the kernel size.

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


def _make_ssd_gradient(fixed_channels: int):
    """The SSD-gradient kernel; ``fixed_channels > 0`` compiles the channel count in as a
    constant (LLVM then unrolls and vectorises the channel loop: ~1.5x faster for MIND's 12)."""

    @kernel
    def ssd_gradient_kernel(mov: np.ndarray, fix: np.ndarray, field: np.ndarray, out: np.ndarray) -> None:
        """``2 sum_c (M_c(x + u) - F_c(x)) dM_c(x + u)/du`` with the derivative of the trilinear weights.

        Coordinates outside the grid are clamped to it (border padding) and have zero derivative
        along the clamped axis, exactly as ``grid_sample(padding_mode="border")`` under autograd.
        """
        h, w, d, channels = fix.shape
        if fixed_channels > 0:
            channels = fixed_channels
        for i in prange(h):
            for j in range(w):
                for k in range(d):
                    x = i + field[0, i, j, k]
                    y = j + field[1, i, j, k]
                    z = k + field[2, i, j, k]
                    inside_x = inside_y = inside_z = np.float32(1.0)
                    if not (0 <= x <= h - 1 and 0 <= y <= w - 1 and 0 <= z <= d - 1):
                        inside_x = np.float32(1.0) if 0 <= x <= h - 1 else np.float32(0.0)
                        inside_y = np.float32(1.0) if 0 <= y <= w - 1 else np.float32(0.0)
                        inside_z = np.float32(1.0) if 0 <= z <= d - 1 else np.float32(0.0)
                        x, y, z = min(max(x, 0.0), h - 1.0), min(max(y, 0.0), w - 1.0), min(max(z, 0.0), d - 1.0)
                    x0, y0, z0 = min(int(x), h - 2), min(int(y), w - 2), min(int(z), d - 2)
                    fx, fy, fz = x - x0, y - y0, z - z0
                    gx, gy, gz = 1.0 - fx, 1.0 - fy, 1.0 - fz
                    m00, m01 = mov[x0, y0], mov[x0, y0 + 1]
                    m10, m11 = mov[x0 + 1, y0], mov[x0 + 1, y0 + 1]
                    target = fix[i, j, k]
                    gi = gj = gk = 0.0
                    for c in range(channels):
                        a000, a001, a010, a011 = m00[z0, c], m00[z0 + 1, c], m01[z0, c], m01[z0 + 1, c]
                        a100, a101, a110, a111 = m10[z0, c], m10[z0 + 1, c], m11[z0, c], m11[z0 + 1, c]
                        # bilinear in (j, k) on the two i-planes, then linear in i
                        low = gy * (gz * a000 + fz * a001) + fy * (gz * a010 + fz * a011)
                        high = gy * (gz * a100 + fz * a101) + fy * (gz * a110 + fz * a111)
                        r = gx * low + fx * high - target[c]
                        gi += r * (high - low)
                        gj += r * (gx * (gz * (a010 - a000) + fz * (a011 - a001))
                                   + fx * (gz * (a110 - a100) + fz * (a111 - a101)))
                        gk += r * (gx * (gy * (a001 - a000) + fy * (a011 - a010))
                                   + fx * (gy * (a101 - a100) + fy * (a111 - a110)))
                    out[0, i, j, k] = 2.0 * gi * inside_x
                    out[1, i, j, k] = 2.0 * gj * inside_y
                    out[2, i, j, k] = 2.0 * gk * inside_z

    return ssd_gradient_kernel


_SSD_GRADIENT = {0: _make_ssd_gradient(0), 12: _make_ssd_gradient(12)}  # 0: any channel count


@kernel
def _ssd_gradient_planar(mov: np.ndarray, fix: np.ndarray, field: np.ndarray, out: np.ndarray) -> None:
    """:func:`ssd_gradient` on one slice (``d == 1``): bilinear in ``(i, j)``, no ``k`` derivative."""
    h, w, _, channels = fix.shape
    for i in prange(h):
        for j in range(w):
            x = i + field[0, i, j, 0]
            y = j + field[1, i, j, 0]
            inside_x = np.float32(1.0) if 0 <= x <= h - 1 else np.float32(0.0)
            inside_y = np.float32(1.0) if 0 <= y <= w - 1 else np.float32(0.0)
            x, y = min(max(x, 0.0), h - 1.0), min(max(y, 0.0), w - 1.0)
            x0, y0 = min(int(x), h - 2), min(int(y), w - 2)
            fx, fy = x - x0, y - y0
            gx, gy = 1.0 - fx, 1.0 - fy
            target = fix[i, j, 0]
            gi = gj = 0.0
            for c in range(channels):
                a00, a01 = mov[x0, y0, 0, c], mov[x0, y0 + 1, 0, c]
                a10, a11 = mov[x0 + 1, y0, 0, c], mov[x0 + 1, y0 + 1, 0, c]
                low = gy * a00 + fy * a01
                high = gy * a10 + fy * a11
                r = gx * low + fx * high - target[c]
                gi += r * (high - low)
                gj += r * (gx * (a01 - a00) + fx * (a11 - a10))
            out[0, i, j, 0] = 2.0 * gi * inside_x
            out[1, i, j, 0] = 2.0 * gj * inside_y
            out[2, i, j, 0] = 0.0


@kernel
def _ssd_cost(fix: np.ndarray, mov: np.ndarray, hw_i: int, hw_j: int, hw_k: int, out: np.ndarray) -> None:
    h, w, d, channels = fix.shape
    for i in prange(h):
        for j in range(w):
            for k in range(d):
                label = 0
                for a in range(-hw_i, hw_i + 1):
                    for b in range(-hw_j, hw_j + 1):
                        for e in range(-hw_k, hw_k + 1):
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


@kernel
def _filter_axis(src: np.ndarray, taps: np.ndarray, axis: int, out: np.ndarray) -> None:
    """Zero-padded centred filter ``taps`` along ``axis`` (1, 2 or 3) of a ``(C, I, J, K)`` array."""
    channels, h, w, d = src.shape
    half = taps.shape[0] // 2
    for ci in prange(channels * h):
        c, i = ci // h, ci % h
        padded = np.zeros(d + 2 * half, np.float32)  # a zero-padded copy: no aliasing, no bounds
        acc = np.empty(d, np.float32)
        for j in range(w):
            row = out[c, i, j]
            if axis == 3:
                padded[half:half + d] = src[c, i, j]
                acc[:] = 0.0
                for t in range(taps.shape[0]):
                    for k in range(d):
                        acc[k] += taps[t] * padded[k + t]
                row[:] = acc
                continue
            row[:] = 0.0
            for t in range(taps.shape[0]):
                offset = t - half
                if axis == 2:
                    if 0 <= j + offset < w:
                        source = src[c, i, j + offset]
                        for k in range(d):
                            row[k] += taps[t] * source[k]
                elif 0 <= i + offset < h:
                    source = src[c, i + offset, j]
                    for k in range(d):
                        row[k] += taps[t] * source[k]


@kernel
def _box_axis(src: np.ndarray, radius: int, axis: int, out: np.ndarray) -> None:
    """Mean over ``2 * radius + 1`` voxels along ``axis`` (1, 2 or 3) of a ``(C, I, J, K)`` array,
    borders replicated (indices clamped), by running sums (float64): O(1) per voxel."""
    channels, h, w, d = src.shape
    scale = 1.0 / (2 * radius + 1)
    if axis == 3:
        for ci in prange(channels * h):
            c, i = ci // h, ci % h
            for j in range(w):
                line = src[c, i, j]
                total = 0.0
                for t in range(-radius, radius + 1):
                    total += line[min(max(t, 0), d - 1)]
                for k in range(d):
                    out[c, i, j, k] = total * scale
                    total += line[min(k + radius + 1, d - 1)] - line[max(k - radius, 0)]
        return
    lines, n = (channels * h, w) if axis == 2 else (channels * w, h)
    for cl in prange(lines):
        c, other = cl // (lines // channels), cl % (lines // channels)
        total = np.zeros(d, np.float64)
        for t in range(-radius, radius + 1):
            p = min(max(t, 0), n - 1)
            total += src[c, other, p] if axis == 2 else src[c, p, other]
        for p in range(n):
            if axis == 2:
                out[c, other, p] = total * scale
                total += src[c, other, min(p + radius + 1, n - 1)] - src[c, other, max(p - radius, 0)]
            else:
                out[c, p, other] = total * scale
                total += src[c, min(p + radius + 1, n - 1), other] - src[c, max(p - radius, 0), other]


@kernel
def _add_diffusion_gradient(field: np.ndarray, scales: np.ndarray, out: np.ndarray) -> None:
    """``out += d/dfield sum_a scales[a] * sum (field[x + e_a] - field[x])^2`` for ``(C, I, J, K)``."""
    channels, h, w, d = field.shape
    for ci in prange(channels * h):
        c, i = ci // h, ci % h
        for j in range(w):
            row, target = field[c, i, j], out[c, i, j]
            for neighbour, inside, scale in ((i - 1, i > 0, scales[0]), (i + 1, i < h - 1, scales[0])):
                if inside:
                    other = field[c, neighbour, j]
                    for k in range(d):
                        target[k] += 2.0 * scale * (row[k] - other[k])
            for neighbour, inside in ((j - 1, j > 0), (j + 1, j < w - 1)):
                if inside:
                    other = field[c, i, neighbour]
                    for k in range(d):
                        target[k] += 2.0 * scales[1] * (row[k] - other[k])
            for k in range(1, d):
                target[k] += 2.0 * scales[2] * (row[k] - row[k - 1])
            for k in range(d - 1):
                target[k] += 2.0 * scales[2] * (row[k] - row[k + 1])


def channels_last(volume: torch.Tensor) -> np.ndarray:
    """``(1, C, h, w, d)`` tensor -> contiguous ``(h, w, d, C)`` float32 numpy array."""
    return np.ascontiguousarray(volume[0].detach().permute(1, 2, 3, 0).to(torch.float32).numpy())


def ssd_gradient(mov_cl: np.ndarray, fix_cl: np.ndarray, field: torch.Tensor) -> torch.Tensor:
    """Gradient of ``sum_cells sum_c (M_c(x + u) - F_c(x))^2`` with respect to ``u``, per cell.

    What autograd gives through a border-padded trilinear ``grid_sample`` (the derivative of
    the trilinear weights, zero where ``x + u`` leaves the grid), without building a graph.

    Args:
        mov_cl, fix_cl: channel-last ``(h, w, d, C)`` features (see :func:`channels_last`).
        field: ``(1, 3, h, w, d)`` displacement in cells.

    Returns:
        ``(1, 3, h, w, d)`` float32 tensor. Every axis must have at least two cells, except a
        2D pair's last axis (``d == 1``: bilinear, zero ``k`` component).
    """
    h, w, d = fix_cl.shape[:3]
    if min(h, w) < 2:
        raise ValueError(f"ssd_gradient needs at least 2 cells per axis (or d == 1), got {fix_cl.shape[:3]}")
    use_torch_threads()
    components = np.ascontiguousarray(field[0].detach().to(torch.float32).numpy())
    out = np.empty_like(components)
    if d == 1:
        _ssd_gradient_planar(mov_cl, fix_cl, components, out)
    else:
        _SSD_GRADIENT.get(fix_cl.shape[3], _SSD_GRADIENT[0])(mov_cl, fix_cl, components, out)
    return torch.from_numpy(out).unsqueeze(0)


def ssd_cost_volume(fix_cl: np.ndarray, mov_cl: np.ndarray, disp_hw: tuple[int, int, int]) -> np.ndarray:
    """Twice 3x3x3-box-filtered SSD cost of every integer displacement, see
    :func:`dinoreg.optim.convex.ssd_cost_volume` (same values, ``(h * w * d, L)``).

    ``fix_cl``, ``mov_cl``: channel-last ``(h, w, d, C)`` cell features; the moving one reads
    zeros outside the grid; ``disp_hw``: search half-width per axis, cells. The box filter is
    zero padded and divides by 3 per axis; axes of one cell are not filtered.
    """
    use_torch_threads()
    h, w, d, _ = fix_cl.shape
    hw_i, hw_j, hw_k = (int(x) for x in disp_hw)
    labels = (2 * hw_i + 1) * (2 * hw_j + 1) * (2 * hw_k + 1)
    cost = np.empty((h, w, d, labels), np.float32)
    _ssd_cost(fix_cl, mov_cl, hw_i, hw_j, hw_k, cost)
    scratch = np.empty_like(cost)
    steps = [s for s, n in zip(((1, 0, 0), (0, 1, 0), (0, 0, 1)), (h, w, d)) if n > 1]
    for _ in range(2):
        for step in steps:
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


def separable_filter(volume: torch.Tensor, taps: np.ndarray) -> torch.Tensor:
    """The same zero-padded centred filter along every spatial axis of ``(1, C, I, J, K)`` (float32)
    that has more than one voxel (a 2D pair's flat axis is left alone)."""
    use_torch_threads()
    source = np.ascontiguousarray(volume[0].detach().numpy())
    taps = np.ascontiguousarray(taps, dtype=np.float32)
    axes = [axis for axis in (3, 2, 1) if source.shape[axis] > 1]
    if len(axes) == 3:
        first, second = np.empty_like(source), np.empty_like(source)  # ping-pong, no third array
        _filter_axis(source, taps, 3, first)
        _filter_axis(first, taps, 2, second)
        _filter_axis(second, taps, 1, first)
        return torch.from_numpy(first).unsqueeze(0)
    out = source.copy()
    for axis in axes:
        filtered = np.empty_like(out)
        _filter_axis(out, taps, axis, filtered)
        out = filtered
    return torch.from_numpy(out).unsqueeze(0)


def box_smooth(volume: torch.Tensor, kernel_size: int, passes: int) -> torch.Tensor:
    """``passes`` rounds of an odd ``kernel_size`` mean filter along every axis of ``(1, C, I, J, K)``
    (float32), borders replicated: :func:`dinoreg.optim.convex_adam.final_smooth`'s arithmetic."""
    use_torch_threads()
    first = np.array(volume[0].detach().numpy(), dtype=np.float32, order="C")  # a copy: the passes write into it
    second = np.empty_like(first)
    for _ in range(passes):
        for axis in (1, 2, 3):
            _box_axis(first, kernel_size // 2, axis, second)
            first, second = second, first
    return torch.from_numpy(first).unsqueeze(0)


def add_diffusion_gradient(field: torch.Tensor, weight: float, out: torch.Tensor) -> torch.Tensor:
    """``out += gradient of weight * losses.diffusion(field)`` in place (see
    :func:`dinoreg.optim.instance.diffusion_gradient`); ``(1, C, I, J, K)`` float32 tensors."""
    use_torch_threads()
    components = np.ascontiguousarray(field[0].detach().numpy())
    channels, h, w, d = components.shape
    # losses.diffusion averages each axis's squared differences over its C * (n_a - 1) * ... terms
    counts = [channels * (h - 1) * w * d, channels * h * (w - 1) * d, channels * h * w * (d - 1)]
    scales = np.array([weight / n if n > 0 else 0.0 for n in counts], np.float32)
    target = out[0].numpy()
    _add_diffusion_gradient(components, scales, target)
    return out
