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

from dinoreg.jit import helper, kernel, prange, use_torch_threads


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
                    # float32 weights and sums (as grid_sample's own backward): the channel loop then
                    # vectorises twice as wide as in float64 (1.3x faster on MIND's 12 channels)
                    fx, fy, fz = np.float32(x - x0), np.float32(y - y0), np.float32(z - z0)
                    one = np.float32(1.0)
                    gx, gy, gz = one - fx, one - fy, one - fz
                    m00, m01 = mov[x0, y0], mov[x0, y0 + 1]
                    m10, m11 = mov[x0 + 1, y0], mov[x0 + 1, y0 + 1]
                    target = fix[i, j, k]
                    gi = gj = gk = np.float32(0.0)
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
                    two = np.float32(2.0)
                    out[0, i, j, k] = two * gi * inside_x
                    out[1, i, j, k] = two * gj * inside_y
                    out[2, i, j, k] = two * gk * inside_z

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
def _box3_inplace(cost: np.ndarray, shape: tuple[int, int, int], axis: int) -> None:
    """Mean of each cell and its two neighbours along ``axis`` (0, 1 or 2 of the cell grid
    ``shape``; zero padded, / 3) of ``cost`` ``(cells, L)``, in place: each line of cells keeps
    the previous cell's original row, so no second cost volume is needed."""
    h, w, d = shape
    labels = cost.shape[1]
    n = shape[axis]
    third = np.float32(1.0 / 3.0)
    for line in prange(h * w * d // n):
        q = np.int64(line)  # prange may count unsigned: keep index arithmetic in int64
        if axis == 0:
            base, stride = q, np.int64(w * d)
        elif axis == 1:
            base, stride = (q // d) * w * d + q % d, np.int64(d)
        else:
            base, stride = q * d, np.int64(1)
        previous = np.empty(labels, np.float32)
        original = np.empty(labels, np.float32)
        for t in range(n):
            row = cost[base + t * stride]
            original[:] = row
            if t + 1 < n:
                following = cost[base + (t + 1) * stride]
            for label in range(labels):
                total = original[label]
                if t > 0:
                    total += previous[label]
                if t + 1 < n:
                    total += following[label]
                row[label] = total * third
            previous, original = original, previous


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


@helper
def _box_lines(lines: np.ndarray, radius: int, passes: int, scratch: np.ndarray, total: np.ndarray) -> None:
    """``passes`` means over ``2 * radius + 1`` entries along the first axis of ``lines``
    ``(n, d)`` in place (every column at once), ends replicated, by running sums (float64
    ``total`` ``(d,)``; ``scratch`` ``(n, d)``)."""
    n, d = lines.shape
    scale = 1.0 / (2 * radius + 1)
    for _ in range(passes):
        total[:] = 0.0
        for t in range(-radius, radius + 1):
            entering = lines[min(max(t, 0), n - 1)]
            for k in range(d):
                total[k] += entering[k]
        for p in range(n):
            target, entering, leaving = scratch[p], lines[min(p + radius + 1, n - 1)], lines[max(p - radius, 0)]
            for k in range(d):
                target[k] = total[k] * scale
                total[k] += entering[k] - leaving[k]
        lines[:] = scratch


@kernel
def _box_planes(src: np.ndarray, radius: int, passes: int, out: np.ndarray) -> None:
    """All ``passes`` along axis 3, then all along axis 2, of every ``(J, K)`` plane of a
    ``(C, I, J, K)`` array into ``out``, one plane at a time in a cache-sized buffer."""
    channels, h, w, d = src.shape
    for ci in prange(channels * h):
        c, i = ci // h, ci % h
        # along axis 3 on the transposed plane: the running sums then advance every row at once
        across = np.ascontiguousarray(src[c, i].T)
        _box_lines(across, radius, passes, np.empty((d, w), np.float32), np.empty(w, np.float64))
        plane = np.ascontiguousarray(across.T)
        _box_lines(plane, radius, passes, np.empty((w, d), np.float32), np.empty(d, np.float64))
        out[c, i] = plane


@kernel
def _box_slabs(volume: np.ndarray, radius: int, passes: int) -> None:
    """All ``passes`` along axis 1 of a ``(C, I, J, K)`` array in place, one ``(I, K)`` slab
    (fixed ``c, j``) at a time in a cache-sized buffer."""
    channels, h, w, d = volume.shape
    for cj in prange(channels * w):
        c, j = cj // w, cj % w
        slab = np.empty((h, d), np.float32)
        for i in range(h):
            slab[i] = volume[c, i, j]
        _box_lines(slab, radius, passes, np.empty((h, d), np.float32), np.empty(d, np.float64))
        for i in range(h):
            volume[c, i, j] = slab[i]


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


@kernel
def _adam_step(params: np.ndarray, first: np.ndarray, second: np.ndarray, grad: np.ndarray, beta1: float,
               beta2: float, step_size: float, scale: float, eps: float) -> None:
    """One Adam update of flat float32 arrays in place (see :func:`adam_step`)."""
    for x in prange(params.shape[0]):
        g = grad[x]
        m = first[x] + (1.0 - beta1) * (g - first[x])
        v = beta2 * second[x] + (1.0 - beta2) * g * g
        first[x] = m
        second[x] = v
        params[x] -= step_size * m / (np.sqrt(v) * scale + eps)


def adam_step(params: torch.Tensor, first: torch.Tensor, second: torch.Tensor, grad: torch.Tensor,
              betas: tuple[float, float], step_size: float, scale: float, eps: float) -> None:
    """Adam's update in one pass over contiguous float32 CPU tensors of one shape:
    ``first <- lerp(first, grad, 1 - beta1)``, ``second <- beta2 second + (1 - beta2) grad^2``,
    ``params -= step_size * first / (sqrt(second) * scale + eps)`` (``step_size = lr / (1 -
    beta1^t)``, ``scale = 1 / sqrt(1 - beta2^t)``): :class:`dinoreg.optim.instance.Adam`'s
    arithmetic without its six full-size passes."""
    use_torch_threads()
    flat = [t.detach().numpy().reshape(-1) for t in (params, first, second)]
    _adam_step(*flat, np.ascontiguousarray(grad.detach().numpy(), np.float32).reshape(-1), float(betas[0]),
               float(betas[1]), float(step_size), float(scale), float(eps))


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


def ssd_cost_volume(fix_cl: np.ndarray, mov_cl: np.ndarray, disp_hw: tuple[int, int, int],
                    out: np.ndarray | None = None) -> np.ndarray:
    """Twice 3x3x3-box-filtered SSD cost of every integer displacement, see
    :func:`dinoreg.optim.convex.ssd_cost_volume` (same values, ``(h * w * d, L)``).

    ``fix_cl``, ``mov_cl``: channel-last ``(h, w, d, C)`` cell features; the moving one reads
    zeros outside the grid; ``disp_hw``: search half-width per axis, cells; ``out``: a float32
    buffer of the result's size to fill (e.g. the other direction's cost volume, no longer
    needed), else a new one. The box filter is zero padded, divides by 3 per axis, runs in
    place, and leaves axes of one cell alone.
    """
    use_torch_threads()
    h, w, d, _ = fix_cl.shape
    hw_i, hw_j, hw_k = (int(x) for x in disp_hw)
    labels = (2 * hw_i + 1) * (2 * hw_j + 1) * (2 * hw_k + 1)
    if out is None or out.shape != (h * w * d, labels) or out.dtype != np.float32:
        out = np.empty((h * w * d, labels), np.float32)
    _ssd_cost(fix_cl, mov_cl, hw_i, hw_j, hw_k, out.reshape(h, w, d, labels))
    axes = [axis for axis, n in enumerate((h, w, d)) if n > 1]
    for _ in range(2):
        for axis in axes:
            _box3_inplace(out, (h, w, d), axis)
    return out


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
    (float32), borders replicated: :func:`dinoreg.optim.convex_adam.final_smooth`'s filter.

    The filter is separable, so all passes along one axis run before the next axis, each on a
    plane or slab held in cache: two sweeps over the volume instead of ``3 * passes`` (the same
    filter; float rounding differs from pass-by-pass order by ~1e-7 voxels)."""
    use_torch_threads()
    source = np.ascontiguousarray(volume[0].detach().numpy(), dtype=np.float32)
    out = np.empty_like(source)
    radius = kernel_size // 2
    _box_planes(source, radius, passes, out)
    _box_slabs(out, radius, passes)
    return torch.from_numpy(out).unsqueeze(0)


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
