"""A final level driven by the images' mutual information (MI): the moving *intensities*, not
features, compared with the fixed ones through their joint histogram, as elastix and ANTs do.

Why: feature SSD has an optimum that is not the true correspondence. MIND-SSC changes under a
non-monotone intensity remap (edges appear or vanish where the remap folds) and under the warp
itself (its patches deform), and its 2-voxel pooling adds a floor. On the known-warp brains
(``benchmarks/known_warp.py``), the Adam stage, started *at the true field*, drifts to a mean
end-point error of 0.85 mm (``s1-pwl-10``). Global MI only assumes that the fixed intensities
predict the moving ones, whatever the curve. Refining the ConvexAdam field by MI halves that
error (see the README).

But on *real* cross-contrast pairs MI's optimum is off too, and further than MIND's: on BraTS-Reg
T1 and T2 of one time point (co-registered by BraTS), a field found from scratch moves the brain by
0.64 mm on average with MIND and 1.38 mm with this level (elastix: 1.69 mm), and a known warp of
the T2 is recovered with a mean error of 1.02 mm by MIND, 1.25 mm with this level. So the level's
field is kept at once only when the fixed intensities and the moving ones under the field so far
are clearly positively rank-correlated (``min_correlation``; the dev pairs: 0.70-0.99 for one
contrast, at most 0.14 across contrasts): the same contrast, where MI is exact up to noise. Across
contrasts (``cross_contrast``) the level is skipped, or run and kept only if it aligns the images'
edges better than the field so far (squared NGF, :mod:`dinoreg.optim.edges`): that keeps it on the
known-warp benchmark's synthetic remaps (exact functions of the fixed intensity) and rejects it on
every real cross-contrast pair measured (README). A gate on how well the fixed intensity predicts
the moving one (the correlation ratio) was tried and dropped: a real BraTS T1/T2 slice reaches
0.66, near the synthetic remaps' 0.73-0.97, and MI made it worse.

Two starts (``select_smoothing``): the level refines the field so far as it is and smoothed, the
smooth start's increment on its own, coarser cells (``select_grid_sp``: each start owns an
:class:`IncrementGrid`); after ``select_iterations`` the start with the higher MI on the shared
draws goes on. MI prefers the
detailed start on real inter-subject pairs (its detail is anatomy) and the smooth one on smooth
known warps (its detail is noise), and in both cases picks the more accurate field (README).

The method is Mattes et al.'s MI with stochastic sampling (elastix's default metric): each
iteration draws ``samples`` voxels of the fixed foreground (dilated by ``sample_margin``) at
random, reads the moving image at ``p + u(p) + v(p)`` (``u`` the field so far, ``v`` the
increment, trilinear), builds the joint histogram with cubic B-spline Parzen windows over
``bins`` bins of each image's ``[0, 1]`` intensities, and takes an Adam step on ``-MI``. ``v``
lives on cells of ``grid_sp`` voxels and is smoothed by the Adam stage's separable ``[1, 3, 6, 7, 6, 3, 1] / 27`` filter (the parameters
``p``, the increment ``S(p)``) and regularised by ``lambda_weight`` times its diffusion energy
(the increment alone: a penalty on the whole field pulled large inter-patient fields back, the
abdominal MR -> CT pair fell from Dice 0.57 to 0.43); the result is ``u + v`` on the image grid.

The MI gradient with respect to one sample's moving intensity ``m_s`` is
``(1/N) sum_ab w_a(f_s) w'_b(m_s) log(P_ab / Pm_b)`` (``P`` the joint histogram, ``Pm`` its
moving marginal; the other terms cancel because ``sum_ab dP_ab = 0``).

On CPU (numba) fused kernels compute the samples, the histogram and the gradient without
per-sample tensors; elsewhere :func:`mi_loss_torch` does it through autograd (``grid_sample``,
on the CPU: the level reads the images as numpy arrays), which the tests compare against the
kernels.

Layouts: images ``(I, J, K)`` float32 in ``[0, 1]``; fields ``(1, 3, I, J, K)`` voxels;
increments ``(1, 3, h, w, d)`` cells; samples as sorted C-order indices into the fixed grid
(memory order: the random reads then sweep the volume once), the field so far at them ``(N, 3)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dinoreg.jit import fused_cpu_for, helper, kernel, prange, use_torch_threads
from dinoreg.optim import cpu_kernels
from dinoreg.optim.convex_adam import (cell_shape, field_from_cells, final_smooth, padded_shape, warp_moving,
                                       zero_flat)
from dinoreg.optim.edges import EDGE_SAMPLES, EdgeAlignment
from dinoreg.optim.instance import Adam, ParameterMap, diffusion_gradient
from dinoreg.pair import RegistrationPair
from dinoreg.progress import Progress
from dinoreg.spatial.grid import flat_field
from dinoreg.spatial.trilinear import axis_cell, cell_corners, cell_field_at, trilinear_with_gradient, upper

_TINY = 1e-12
_PERCENTILE_STRIDE = 5  # percentiles of every 5th value: the same to ~1e-3, five times faster


@dataclass
class MIConfig:
    """Settings of the MI level (cells of ``grid_sp`` voxels, learning rate in cells).

    ``min_correlation``: the level runs only when the fixed intensities and the moving ones under
    the field so far have at least this Spearman rank correlation over the fixed foreground (-1:
    always). ``sample_margin``: the iterations draw their samples from the fixed foreground
    dilated by this many voxels (0: the foreground itself). ``lr_end``: the learning rate falls
    geometrically from ``lr`` to ``lr * lr_end`` at the last iteration (1: constant).
    ``base_smoothing``: once the level runs, the field so far is first smoothed by
    :func:`~dinoreg.optim.convex_adam.final_smooth` with this kernel (0: not), so that the level
    refines a smooth field: the feature stages' fine-scale detail, wrong or right, is dropped and
    only what MI recovers comes back (smoother, fewer folds, less accurate on real inter-subject
    pairs; see the README). ``select_smoothing``: a second start, the field so far smoothed by
    this kernel (0: one start) with its own learning-rate end ``select_lr_end`` and its increment
    on cells of ``select_grid_sp`` voxels (0: ``grid_sp``); both starts run on the same draws for
    ``select_iterations`` iterations (0: all) and the one with the higher MI over those draws'
    last ten goes on (:func:`choose_start`)."""

    grid_sp: int = 3
    iterations: int = 100
    samples: int = 40000
    lr: float = 0.1
    lr_end: float = 1.0
    bins: int = 32
    lambda_weight: float = 10.0
    min_correlation: float = -1.0
    sample_margin: int = 0
    seed: int = 0
    base_smoothing: int = 0
    select_smoothing: int = 0
    select_lr_end: float = 1.0
    select_grid_sp: int = 0
    select_iterations: int = 0
    cross_contrast: str = "skip"


# --------------------------------------------------------------------------- maths shared by both paths

def normalise_intensities(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` mapped to ``[0, 1]`` by its 0.5th and 99.5th percentiles inside ``mask`` (the
    whole image when ``mask`` is empty), clipped; contiguous float32."""
    values = image[mask] if mask.any() else image.ravel()
    low, high = np.percentile(values[::_PERCENTILE_STRIDE], [0.5, 99.5]) if values.size else (0.0, 1.0)
    scale = 1.0 / (high - low) if high > low else 1.0
    out = (np.asarray(image, np.float32) - np.float32(low)) * np.float32(scale)
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), np.float32)


def mutual_information(joint: np.ndarray) -> float:
    """MI (nats) of a joint histogram ``(bins, bins)`` (fixed, moving) of any positive total."""
    p = joint / max(float(joint.sum()), _TINY)
    pf, pm = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / (pf @ pm)[nz])).sum())


def log_ratio_table(joint: np.ndarray) -> np.ndarray:
    """``log(P_ab / Pm_b)`` (0 where ``P_ab`` is 0): the weights of the MI gradient."""
    p = joint / max(float(joint.sum()), _TINY)
    pm = p.sum(0, keepdims=True)
    out = np.zeros_like(p)
    nz = p > 0
    out[nz] = np.log(p[nz] / np.broadcast_to(pm, p.shape)[nz])
    return out.astype(np.float32)


def sample_domain(fixed_mask: np.ndarray, margin: int) -> np.ndarray:
    """C-order indices of the fixed foreground dilated by ``margin`` voxels (6-connected steps:
    a diamond; on a one-slice 2D volume in-plane only), where the level draws its samples. A
    margin lets samples at the brain's edge see whether the moving edge lands on tissue or
    background: without it, a LapIRN T1 pair lost Dice (0.642 -> 0.630)."""
    # C order: a Fortran-ordered mask (as NIfTI files load) made every step and the C-order
    # indices 4x slower (0.25 s on a brain); two buffers, not a fresh copy per step
    grown = np.array(fixed_mask, dtype=bool, order="C")
    step = np.empty_like(grown)
    for _ in range(margin):  # numpy slices: scipy.ndimage costs 0.3 s of import on every command
        np.copyto(step, grown)
        for axis in range(grown.ndim):
            lower = [slice(None)] * grown.ndim
            upper = [slice(None)] * grown.ndim
            lower[axis], upper[axis] = slice(None, -1), slice(1, None)
            step[tuple(upper)] |= grown[tuple(lower)]
            step[tuple(lower)] |= grown[tuple(upper)]
        grown, step = step, grown
    return np.flatnonzero(grown)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..N of ``(N,)`` values, ties given their average rank (float64)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - (counts - 1) / 2.0)[inverse]).astype(np.float64)


def rank_correlation(fixed_values: np.ndarray, moving_values: np.ndarray) -> float:
    """Spearman rank correlation (ties averaged) of two ``(N,)`` samples; -1 when either is
    constant (no evidence of a shared contrast)."""
    a, b = _ranks(np.asarray(fixed_values).ravel()), _ranks(np.asarray(moving_values).ravel())
    a -= a.mean()
    b -= b.mean()
    norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / norm) if norm > 0 else -1.0


def intensity_correlation(flat: np.ndarray, base: np.ndarray, fixed: np.ndarray, moving: np.ndarray) -> float:
    """:func:`rank_correlation` of the fixed intensities at the samples ``flat`` (C-order indices)
    and the moving ones at ``p + base`` (``base`` ``(N, 3)`` voxels; trilinear, border padding):
    positive and high when both images show one contrast (T1 and T1, CT and CT), low or negative
    across contrasts (T1 against T2: -0.4 to -0.9 on the dev pairs)."""
    points = torch.from_numpy(np.stack(np.unravel_index(flat, fixed.shape), 1).astype(np.float32))
    with torch.no_grad():
        moved = _sample_torch(torch.from_numpy(moving), points + torch.from_numpy(np.asarray(base, np.float32)))
    return rank_correlation(fixed.ravel()[flat], moved.numpy())


def sorted_draw(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    """``count`` indices into ``range(size)``, uniform and independent, in ascending order (the
    order statistics of uniforms, from cumulative exponential spacings: no sort)."""
    spacings = np.cumsum(rng.standard_exponential(count + 1))
    return np.minimum((spacings[:-1] * (size / spacings[-1])).astype(np.int64), size - 1)


def field_at(components: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """The field ``components`` ``(3, I*J*K)`` at the C-order voxel indices ``flat``, as ``(N, 3)``
    contiguous (``np.take``: 4x faster than ``components[:, flat]`` for 40000 sorted indices)."""
    return np.ascontiguousarray(np.take(components, flat, axis=1).T)


# --------------------------------------------------------------------------- torch reference (autograd)

def _parzen_torch(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Cubic B-spline Parzen weights ``(N, bins)`` of values in ``[0, 1]`` (bin ``b`` centred at
    ``(b + 0.5) / bins``; the weight of a window beyond the first or last bin goes to that bin)."""
    x = values.clamp(0, 1)[:, None] * bins - 0.5
    base = torch.floor(x)
    out = torch.zeros(values.shape[0], bins, dtype=values.dtype, device=values.device)
    for offset in (-1, 0, 1, 2):
        index = base + offset
        t = (x - index).abs()
        w = torch.where(t < 1, 2 / 3 - t ** 2 + t ** 3 / 2, (2 - t).clamp(min=0) ** 3 / 6)
        out = out.scatter_add(1, index.clamp(0, bins - 1).long(), w)
    return out


def mi_loss_torch(points: torch.Tensor, fixed_values: torch.Tensor, base: torch.Tensor, increment: torch.Tensor,
                  cell: tuple[int, ...], moving: torch.Tensor, bins: int) -> torch.Tensor:
    """``-MI`` of the samples: ``points`` ``(N, 3)`` voxels of the fixed grid, ``fixed_values``
    ``(N,)`` their fixed intensities, ``base`` ``(N, 3)`` the field so far there (voxels),
    ``increment`` ``(1, 3, h, w, d)`` cells (cell-centred, border-clamped), ``moving``
    ``(I, J, K)`` in ``[0, 1]`` (trilinear, border padding)."""
    coarse = torch.tensor(increment.shape[2:], dtype=points.dtype, device=points.device)
    cells = torch.tensor(cell, dtype=points.dtype, device=points.device)
    n = points.shape[0]
    where = ((points + 0.5) / (coarse * cells)) * 2 - 1
    inc = F.grid_sample(increment, where.flip(1).view(1, n, 1, 1, 3), align_corners=False,
                        padding_mode="border").view(3, n).t() * cells
    m = _sample_torch(moving, points + base + inc)
    joint = _parzen_torch(fixed_values, bins).t() @ _parzen_torch(m, bins) / n
    pf, pm = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    return -(joint[nz] * torch.log(joint[nz] / (pf * pm)[nz])).sum()


def _sample_torch(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``volume`` ``(I, J, K)`` at ``points`` ``(N, 3)`` voxels: trilinear, border padding."""
    shape = torch.tensor(volume.shape, dtype=points.dtype, device=points.device)
    at = ((points + 0.5) / shape) * 2 - 1
    return F.grid_sample(volume[None, None], at.flip(1).view(1, -1, 1, 1, 3), align_corners=False,
                         padding_mode="border").view(-1)


# --------------------------------------------------------------------------- fused CPU kernels (numba)

@helper
def _cubic(t: float) -> float:
    """Cubic B-spline at ``|t|``."""
    t = abs(t)
    if t < 1.0:
        return 2.0 / 3.0 - t * t + 0.5 * t * t * t
    if t < 2.0:
        u = 2.0 - t
        return u * u * u / 6.0
    return 0.0


@helper
def _cubic_derivative(t: float) -> float:
    """Derivative of the cubic B-spline at ``t`` (signed)."""
    a = abs(t)
    if a < 1.0:
        d = -2.0 * a + 1.5 * a * a
    elif a < 2.0:
        d = -0.5 * (2.0 - a) * (2.0 - a)
    else:
        return 0.0
    return d if t >= 0.0 else -d


@kernel
def _sample_pair(flat: np.ndarray, so_far: np.ndarray, coarse: np.ndarray, cells: np.ndarray,
                 fixed: np.ndarray, moving: np.ndarray, points: np.ndarray, fixed_values: np.ndarray,
                 positions: np.ndarray, values: np.ndarray, gradients: np.ndarray) -> None:
    """For each sample (``flat``: C-order indices into the fixed grid; ``so_far`` ``(3, I*J*K)``:
    the field so far, voxels, read at the sample), its voxel ``p`` into ``points`` ``(N, 3)``, the
    fixed intensity there into ``fixed_values``, ``p + so_far(p) + increment(p)`` into
    ``positions`` ``(N, 3)`` (float64 voxels), the moving intensity there into ``values`` ``(N,)``
    and its spatial derivative (voxels) into ``gradients`` ``(N, 3)``. ``coarse`` ``(3, h, w, d)``:
    the increment in cells, cell-centred, trilinear, border-clamped. Both images share the
    fixed grid.

    Three loops, not one: the reads at scattered voxels (the field so far and the fixed image,
    then the moving image's eight corners) miss the cache, and short loop bodies let the CPU
    overlap many samples' misses (1.5x faster on a brain than one long body, same values)."""
    size_j, size_k = moving.shape[1], moving.shape[2]
    fixed_flat = fixed.reshape(-1)
    for s in prange(flat.shape[0]):
        index = flat[s]
        i, j, k = index // (size_j * size_k), (index // size_k) % size_j, index % size_k
        points[s, 0], points[s, 1], points[s, 2] = i, j, k
        positions[s, 0] = i + so_far[0, index]
        positions[s, 1] = j + so_far[1, index]
        positions[s, 2] = k + so_far[2, index]
        fixed_values[s] = fixed_flat[index]
    for s in prange(flat.shape[0]):
        vi, vj, vk = cell_field_at(coarse, cells, points[s, 0], points[s, 1], points[s, 2])
        positions[s, 0] += vi
        positions[s, 1] += vj
        positions[s, 2] += vk
    for s in prange(flat.shape[0]):
        m, di, dj, dk = trilinear_with_gradient(moving, positions[s, 0], positions[s, 1], positions[s, 2])
        values[s] = m
        gradients[s, 0], gradients[s, 1], gradients[s, 2] = di, dj, dk


@kernel
def _joint_histogram(fixed_values: np.ndarray, moving_values: np.ndarray, out: np.ndarray) -> None:
    """Cubic B-spline Parzen joint histogram; ``out`` ``(chunks, bins, bins)`` zeroed, one per chunk
    of samples (summed by the caller)."""
    chunks, bins = out.shape[0], out.shape[1]
    n = fixed_values.shape[0]
    for c in prange(chunks):
        hist = out[c]
        for s in range(c * n // chunks, (c + 1) * n // chunks):
            xf = min(max(fixed_values[s], 0.0), 1.0) * bins - 0.5
            xm = min(max(moving_values[s], 0.0), 1.0) * bins - 0.5
            bf, bm = int(np.floor(xf)), int(np.floor(xm))
            for a in range(bf - 1, bf + 3):
                wa = _cubic(xf - a)
                ia = min(max(a, 0), bins - 1)
                for b in range(bm - 1, bm + 3):
                    hist[ia, min(max(b, 0), bins - 1)] += wa * _cubic(xm - b)


@kernel
def _increment_gradient(points: np.ndarray, fixed_values: np.ndarray, moving_values: np.ndarray,
                        gradients: np.ndarray, table: np.ndarray, cells: np.ndarray, out: np.ndarray,
                        slabs: np.ndarray) -> None:
    """Gradient of ``-N * MI`` with respect to the coarse increment, one partial sum per chunk of
    samples into ``out`` ``(chunks, 3, h, w, d)`` (summed by :func:`_sum_slabs`). The samples are
    in memory order, so chunk ``c`` only reaches the rows ``slabs[c, 0]..slabs[c, 1]`` of the first
    cell axis: it zeroes and fills those alone (the whole buffer is 8 times the increment).
    ``table``: :func:`log_ratio_table`."""
    chunks, _, h, w, d = out.shape
    bins = table.shape[0]
    n = fixed_values.shape[0]
    for c in prange(chunks):
        grad = out[c]
        first, last = c * n // chunks, (c + 1) * n // chunks
        if first >= last:
            slabs[c, 0], slabs[c, 1] = 0, -1
            continue
        low, _, _ = axis_cell((points[first, 0] + 0.5) / cells[0] - 0.5, h)
        high, _, _ = axis_cell((points[last - 1, 0] + 0.5) / cells[0] - 0.5, h)
        high = upper(high, h)
        slabs[c, 0], slabs[c, 1] = low, high
        grad[:, low:high + 1] = 0.0
        for s in range(first, last):
            xf = min(max(fixed_values[s], 0.0), 1.0) * bins - 0.5
            m = moving_values[s]
            slope = 0.0 if (m < 0.0 or m > 1.0) else float(bins)
            xm = min(max(m, 0.0), 1.0) * bins - 0.5
            bf, bm = int(np.floor(xf)), int(np.floor(xm))
            dmi = 0.0
            for a in range(bf - 1, bf + 3):
                wa = _cubic(xf - a)
                ia = min(max(a, 0), bins - 1)
                for b in range(bm - 1, bm + 3):
                    dmi += wa * _cubic_derivative(xm - b) * table[ia, min(max(b, 0), bins - 1)]
            dmi *= -slope  # d(-MI * N)/dm
            x0, x1, y0, y1, z0, z1, fx, fy, fz = cell_corners(points[s, 0], points[s, 1], points[s, 2], cells, h, w, d)
            for comp in range(3):
                g = dmi * gradients[s, comp] * cells[comp]
                if g == 0.0:
                    continue
                v = grad[comp]
                v[x0, y0, z0] += g * (1 - fx) * (1 - fy) * (1 - fz)
                v[x0, y0, z1] += g * (1 - fx) * (1 - fy) * fz
                v[x0, y1, z0] += g * (1 - fx) * fy * (1 - fz)
                v[x0, y1, z1] += g * (1 - fx) * fy * fz
                v[x1, y0, z0] += g * fx * (1 - fy) * (1 - fz)
                v[x1, y0, z1] += g * fx * (1 - fy) * fz
                v[x1, y1, z0] += g * fx * fy * (1 - fz)
                v[x1, y1, z1] += g * fx * fy * fz


@kernel
def _sum_slabs(out: np.ndarray, slabs: np.ndarray, total: np.ndarray) -> None:
    """``total`` ``(3, h, w, d)`` = the sum of the chunks' partial gradients ``out`` over their
    slabs (rows ``slabs[c, 0]..slabs[c, 1]`` of the first cell axis; zero elsewhere), in chunk
    order for every element (the same float sums whatever the thread count)."""
    chunks, comps, h = out.shape[0], out.shape[1], out.shape[2]
    for row in prange(comps * h):
        comp, x = row // h, row % h
        total[comp, x] = 0.0
        for c in range(chunks):
            if slabs[c, 0] <= x <= slabs[c, 1]:
                total[comp, x] += out[c, comp, x]


_CHUNKS = 8  # partial sums of the histogram and the gradient: a fixed count, so the float sums (and
# the field) do not depend on the number of threads (dataset workers run with other counts)


class FusedMIGradient:
    """:func:`mi_gradient_torch` by the numba kernels, with its buffers kept between iterations
    (this VM pays ~5 ms per MB of freshly allocated memory: per-iteration gradient buffers cost
    more than the arithmetic)."""

    def __init__(self, samples: int, coarse: tuple[int, ...], bins: int) -> None:
        chunks = _CHUNKS
        self.points = np.empty((samples, 3), np.int32)
        self.fixed_values = np.empty(samples, np.float32)
        self.positions = np.empty((samples, 3), np.float64)
        self.values = np.empty(samples, np.float32)
        self.gradients = np.empty((samples, 3), np.float32)
        self.hist = np.zeros((chunks, bins, bins), np.float64)
        self.grad = np.zeros((chunks, 3, *coarse), np.float32)
        self.slabs = np.zeros((chunks, 2), np.int64)
        self.total = np.zeros((3, *coarse), np.float32)

    def __call__(self, flat: np.ndarray, so_far: np.ndarray, increment: np.ndarray,
                 cell: tuple[int, ...], fixed: np.ndarray, moving: np.ndarray, bins: int) -> tuple[float, np.ndarray]:
        """``-MI`` of the samples and its gradient with respect to ``increment`` ``(3, h, w, d)``
        (cells), times the sample count (per-sample sums, so Adam's ``eps`` sits below real
        gradients); ``flat`` the samples' C-order indices into the fixed grid, ``so_far``
        ``(3, I*J*K)`` the field so far (voxels; read at the samples inside the kernel, no gathered
        copy), ``fixed`` and ``moving`` ``(I, J, K)`` in ``[0, 1]``, the rest as for
        :func:`mi_loss_torch` (float32 numpy arrays)."""
        use_torch_threads()
        cells = np.asarray(cell, np.float64)
        points, fixed_values = self.points, self.fixed_values
        _sample_pair(flat, so_far, increment, cells, fixed, moving, points, fixed_values, self.positions,
                     self.values, self.gradients)
        self.hist.fill(0.0)
        _joint_histogram(fixed_values, self.values, self.hist)
        joint = self.hist.sum(0)
        _increment_gradient(points, fixed_values, self.values, self.gradients, log_ratio_table(joint), cells,
                            self.grad, self.slabs)
        _sum_slabs(self.grad, self.slabs, self.total)
        return -mutual_information(joint), self.total  # a kept buffer: valid until the next call


def mi_gradient_torch(flat: np.ndarray, so_far: np.ndarray, increment: np.ndarray,
                      cell: tuple[int, ...], fixed: np.ndarray, moving: np.ndarray, bins: int
                      ) -> tuple[float, np.ndarray]:
    """``-MI`` of the samples and its gradient with respect to ``increment`` (cells), times the
    sample count, through :func:`mi_loss_torch` and autograd (the reference of
    :class:`FusedMIGradient`, same arguments)."""
    points = torch.from_numpy(np.stack(np.unravel_index(flat, moving.shape), 1).astype(np.float32))
    base_at = torch.from_numpy(field_at(so_far, flat))
    leaf = torch.from_numpy(np.array(increment, np.float32))[None].requires_grad_(True)
    loss = mi_loss_torch(points, _sample_torch(torch.from_numpy(fixed), points), base_at, leaf, tuple(cell),
                         torch.from_numpy(moving), bins)
    (loss * points.shape[0]).backward()
    return float(loss.detach()), leaf.grad[0].numpy()


def stage_images(pair: RegistrationPair) -> tuple[np.ndarray, np.ndarray]:
    """The pair's fixed and moving images (the moving one warped by ``pair.init`` when there is
    one, as every stage sees it), each normalised to ``[0, 1]`` over its foreground."""
    fixed = normalise_intensities(pair.fixed, pair.fixed_mask)
    if pair.init is None:
        return fixed, normalise_intensities(pair.moving, pair.moving_mask)
    moving, moving_mask = warp_moving(pair, torch.zeros_like(pair.init))
    return fixed, normalise_intensities(moving, moving_mask)


_SELECT_WINDOW = 10  # the starts are compared by their mean MI over this many last shared draws


class IncrementGrid:
    """The MI level's increment on cells of ``grid_sp`` voxels of an image of ``shape``: its
    parameter grid ``coarse``, the Adam stage's filter ``S`` on it, and the objective
    (:meth:`objective`) with its gradient buffers. ``fixed``, ``moving``: ``(I, J, K)`` in ``[0, 1]``."""

    def __init__(self, config: MIConfig, grid_sp: int, shape: tuple[int, ...], fixed: np.ndarray,
                 moving: np.ndarray, fused: bool) -> None:
        self.config, self.grid_sp, self.shape = config, grid_sp, shape
        self.fixed, self.moving, self.fused = fixed, moving, fused
        self.cells = cell_shape(shape, grid_sp)
        self.coarse = tuple(p // c for p, c in zip(padded_shape(shape, grid_sp), self.cells))
        self.smoothing = ParameterMap(self.coarse, self.coarse, torch.device("cpu"))
        self.gradient = FusedMIGradient(config.samples, self.coarse, config.bins) if fused else mi_gradient_torch

    def objective(self, params: torch.Tensor, so_far_field: np.ndarray, flat: np.ndarray) -> tuple[float, torch.Tensor]:
        """MI of the samples ``flat`` under ``so_far_field`` (``(3, I*J*K)``) plus ``S(params)``, and
        the gradient of ``-MI`` (+ the regulariser) with respect to ``params``, times N."""
        config = self.config
        increment = self.increment(params)
        loss, grad = self.gradient(flat, so_far_field, increment[0].numpy(), self.cells, self.fixed, self.moving,
                                   config.bins)
        grad = torch.from_numpy(grad)[None].contiguous()
        if config.lambda_weight > 0:  # gradients are per sample (times N): so is the regulariser's
            grad = _add_diffusion(increment, config.lambda_weight * config.samples, grad, self.fused)
        return -loss, self.smoothing.smooth_adjoint(grad)

    def displacement(self, field: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """``field`` ``(1, 3, I, J, K)`` voxels plus the increment ``S(params)`` on the image grid."""
        with torch.no_grad():
            increment = field_from_cells(self.increment(params), self.shape, self.grid_sp)
            # added into the fresh upsampled increment (the same sum as field + increment, no third field)
            return zero_flat(increment, self.shape).add_(field.cpu())

    def increment(self, params: torch.Tensor) -> torch.Tensor:
        """``S(params)`` ``(1, 3, h, w, d)`` cells, the component along an axis of one voxel zeroed."""
        return zero_flat(self.smoothing.smooth(params), self.shape)


class LevelStart:
    """One start of the MI level: the field so far smoothed by ``kernel`` (``field``
    ``(1, 3, I, J, K)`` voxels), its increment's parameters ``(1, 3, h, w, d)`` on ``grid``'s cells
    with their Adam state and learning-rate schedule (cells), and the MI of every draw it has seen
    (nats, before that draw's step)."""

    def __init__(self, field: torch.Tensor, kernel: int, grid: IncrementGrid, lr: float, lr_end: float) -> None:
        self.field, self.kernel, self.grid = field, kernel, grid
        self.flat = flat_field(field)
        self.params = torch.zeros(1, 3, *grid.coarse, dtype=torch.float32)
        self.optimiser = Adam(self.params, lr=lr)
        self.lr, self.lr_end = lr, lr_end
        self.history: list[float] = []

    def step(self, flat: np.ndarray, progress: float) -> None:
        """One Adam step on the samples ``flat`` at the learning rate for ``progress`` (0 at the
        first iteration, 1 at the last: ``lr * lr_end ** progress``)."""
        value, grad = self.grid.objective(self.params, self.flat, flat)
        self.history.append(value)
        self.optimiser.lr = self.lr * self.lr_end ** progress
        self.optimiser.step(grad)

    def displacement(self) -> torch.Tensor:
        """The field so far plus this start's increment on the image grid, ``(1, 3, I, J, K)`` voxels."""
        return self.grid.displacement(self.field, self.params)

    def edge_score(self, edges: EdgeAlignment) -> float:
        """``edges``' score of :meth:`displacement`, the increment read at the samples (no
        full-size field)."""
        with torch.no_grad():
            increment = self.grid.increment(self.params)[0].numpy()
        return edges.score(self.field, increment, self.grid.cells)

    def recent_mi(self) -> float:
        """Mean MI over the last :data:`_SELECT_WINDOW` draws."""
        return float(np.mean(self.history[-_SELECT_WINDOW:]))


def choose_start(starts: list[LevelStart], progress: Progress) -> LevelStart:
    """The start with the highest :meth:`LevelStart.recent_mi` (the first on a tie). The starts saw
    the same draws, so the comparison is paired. Logs the choice."""
    best = max(starts, key=LevelStart.recent_mi)  # max keeps the first of equal keys
    scores = ", ".join(f"{s.kernel}: {s.recent_mi():.4f}" for s in starts)
    progress.log(f"mi: start smoothed by {best.kernel} voxels kept (MI by start kernel {scores})")
    return best


EDGE_CHECK_ITERATIONS = 10  # on different contrasts, the first start's trial: the level stops after it unless the edges improved


def _edges_improve(edges: EdgeAlignment, score: float, when: str, progress: Progress) -> bool:
    """Whether a field of edge alignment ``score`` aligns the edges better than the field so far
    (the reference of ``edges``). Logs the scores and the decision."""
    better = score > edges.reference_score
    progress.log(f"mi: different contrasts: edge alignment (NGF) {edges.reference_score:.4f} before the level, "
                 f"{score:.4f} {when}: {'better' if better else 'not better, the field so far is kept'}")
    return better


class MutualInformationStage:
    """The MI level (:class:`MIConfig`): an increment on ``grid_sp``-voxel cells added to the field
    so far, optimised by Adam on ``-MI`` of random samples of the fixed foreground (dilated by
    ``sample_margin``), from one or two starts (``select_smoothing``). When the two images show one
    contrast (``min_correlation``) its field is kept; otherwise it is skipped or, with
    ``cross_contrast="check"``, kept only if it aligns the edges better (:mod:`dinoreg.optim.edges`)."""

    name = "mi"

    def __init__(self, config: MIConfig) -> None:
        self.config = config

    def run(self, pair: RegistrationPair, previous: torch.Tensor | None,
            progress: Progress) -> tuple[torch.Tensor, dict[str, float]]:
        config, shape = self.config, pair.shape
        start = time.perf_counter()
        if previous is None:
            previous = torch.zeros(1, 3, *shape, dtype=torch.float32)
        if not pair.fixed_mask.any():
            return previous, {}
        fixed, moving = stage_images(pair)
        foreground = np.flatnonzero(pair.fixed_mask)
        same = self._same_contrast(foreground, flat_field(previous), fixed, moving, progress)
        if not same and config.cross_contrast != "check":
            progress.log("mi: different contrasts: MI level skipped")
            return previous, {"mi_prepare": time.perf_counter() - start}
        domain = sample_domain(pair.fixed_mask, config.sample_margin)  # only once the level runs
        fused = fused_cpu_for(previous.device, previous.dtype)
        grids: dict[int, IncrementGrid] = {}  # one per cell size, shared by the starts that use it

        def start_from(kernel: int, lr_end: float, grid_sp: int) -> LevelStart:
            """A start from the field so far smoothed by ``kernel`` (0: as it is), its increment on
            ``grid_sp``-voxel cells."""
            if grid_sp not in grids:
                grids[grid_sp] = IncrementGrid(config, grid_sp, shape, fixed, moving, fused)
            return LevelStart(final_smooth(previous, kernel), kernel, grids[grid_sp], config.lr, lr_end)

        edges = None if same else self._edge_check(foreground, fixed, moving, previous)
        trial = 0 if same else min(EDGE_CHECK_ITERATIONS, config.iterations)
        schedules = self._schedules()
        starts = [start_from(*schedules[0])]
        prep = time.perf_counter() - start
        with progress.stage(self.name, total=config.iterations) as step:
            if edges is not None:
                # on different contrasts, the first start alone for a few iterations first: the level
                # stops here (its other start never built) unless those already align the edges better
                self._iterate(starts, domain, trial, step, progress)
                if not _edges_improve(edges, starts[0].edge_score(edges), f"after {trial} iterations", progress):
                    return previous, {"mi_prepare": prep}
            starts += [start_from(*schedule) for schedule in schedules[1:]]
            starts = self._iterate(starts, domain, config.iterations, step, progress)
        disp = starts[0].displacement()
        if edges is not None and not _edges_improve(edges, edges.score(disp), "after the level", progress):
            return previous, {"mi_prepare": prep}
        return disp.to(previous.device), {"mi_prepare": prep}

    def _schedules(self) -> list[tuple[int, float, int]]:
        """``(smoothing kernel, learning-rate end, cell size)`` of each start: the field so far
        smoothed by ``base_smoothing`` with its increment on ``grid_sp`` cells and, with
        ``select_smoothing``, smoothed by that kernel with its increment on ``select_grid_sp``
        cells (see :class:`MIConfig`)."""
        config = self.config
        schedules = [(config.base_smoothing, config.lr_end, config.grid_sp)]
        if config.select_smoothing:
            schedules.append((config.select_smoothing, config.select_lr_end, config.select_grid_sp or config.grid_sp))
        return schedules

    def _iterate(self, starts: list[LevelStart], domain: np.ndarray, count: int, step,
                 progress: Progress) -> list[LevelStart]:
        """The first ``count`` draws of ``domain`` (the level's own random stream from its seed, the
        same in every call), each taken by every start that has not yet seen it (a start that ran
        the trial joins the others at its next draw, so the draws stay shared), keeping the better
        start after ``select_iterations`` (:func:`choose_start`); returns the starts left."""
        config = self.config
        decide_at = min(config.select_iterations or config.iterations, config.iterations) if len(starts) > 1 else -1
        seen = max(len(run.history) for run in starts)  # iterations already on the progress bar
        rng = np.random.default_rng(config.seed)
        for it in range(count):
            flat = domain[sorted_draw(rng, domain.size, config.samples)]  # one draw for every start
            for run in starts:
                if len(run.history) == it:
                    run.step(flat, it / max(config.iterations - 1, 1))
            if it + 1 == decide_at:
                starts = [choose_start(starts, progress)]
            if it >= seen:
                step(1)
        return starts

    def _edge_check(self, foreground: np.ndarray, fixed: np.ndarray, moving: np.ndarray,
                    previous: torch.Tensor) -> EdgeAlignment:
        """The edge alignment (:class:`~dinoreg.optim.edges.EdgeAlignment`) of one draw of the
        fixed ``foreground`` (its own random stream) against the field so far ``previous``: the
        test a pair of different contrasts must pass for the level's field to be kept."""
        rng = np.random.default_rng((self.config.seed, 2))
        flat = foreground[sorted_draw(rng, foreground.size, min(EDGE_SAMPLES, foreground.size))]
        return EdgeAlignment(fixed, moving, flat, previous.cpu())

    def _same_contrast(self, foreground: np.ndarray, so_far: np.ndarray, fixed: np.ndarray, moving: np.ndarray,
                       progress: Progress) -> bool:
        """Whether the level should run: :func:`intensity_correlation` of one draw of samples of
        the fixed ``foreground`` (C-order indices; not dilated: background around both images is
        concordant and lifted BraTS FLAIR -> T1 from 0.15 to 0.41) at least ``min_correlation``
        (always when that is -1). The draw has its own random stream (the iterations' draws do
        not depend on it); ``so_far`` the field so far, ``(3, I*J*K)`` voxels. Logs the decision."""
        threshold = self.config.min_correlation
        if threshold <= -1.0:
            return True
        rng = np.random.default_rng((self.config.seed, 1))
        flat = foreground[sorted_draw(rng, foreground.size, min(self.config.samples, foreground.size))]
        rho = intensity_correlation(flat, field_at(so_far, flat), fixed, moving)
        sign = ">=" if rho >= threshold else "<"
        progress.log(f"mi: intensity rank correlation {rho:.2f} {sign} {threshold:g}")
        return rho >= threshold


def _add_diffusion(field: torch.Tensor, weight: float, out: torch.Tensor, fused: bool) -> torch.Tensor:
    """``out`` plus the gradient of ``weight * losses.diffusion(field)``."""
    if fused:
        return cpu_kernels.add_diffusion_gradient(field, weight, out)
    return out + diffusion_gradient(field, weight)
