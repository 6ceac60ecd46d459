"""MIND-SSC: the modality-independent neighbourhood descriptor, self-similarity context.

Heinrich et al. (MICCAI 2013). For every voxel ``x`` the six face neighbours at distance
``dilation`` are taken; the 12 pairs of neighbours that are ``sqrt(2) * dilation`` apart give 12
patch distances ``D_c(x) = box_r((I(x + a_c) - I(x + b_c))^2)`` (``box_r`` a cubic mean filter of
side ``2 * radius + 1``). The descriptor is ``exp(-(D_c - min_c D_c) / V(x))`` with ``V`` the mean
over channels of ``D_c - min_c D_c``, clamped to ``[0.001, 1000] x`` its volume mean.

A volume of one slice (an axis of one voxel, a 2D image stored as ``(I, J, 1)``) gets 2D
MIND-SSC: the four in-plane neighbours, the 4 pairs of them ``sqrt(2) * dilation`` apart plus
the 4 centre-to-neighbour distances, a square box filter (:func:`ssc_pairs` with ``flat``):
8 channels instead of 12, nothing read across the missing axis. With ``far_2d`` > 0 a second,
separately normalised block of 8 channels follows: the centre against its 8 ring neighbours
``far_2d`` voxels away (:func:`far_pairs_2d`, patch radius ``far_radius_2d``). MIND's channels are
all 1 inside any homogeneous region, so its SSD only pulls an edge that lies within a few voxels
of its match; the long-range block says how far (and in which directions) the nearest contrast
lies, which widens the basin (brain mid-slice pair Dice 0.633 -> 0.667, see the README).

On CPU (float32, numba present) fused kernels compute the same descriptor block of planes by
block of planes, pooling as they go, so the full-resolution 12-channel volume is never held
(``pool=2`` returns 1/8 of it). Elsewhere (GPU) shifted slices and one pooling pass do it in
torch.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from dinoreg.features.base import EncodeRequest, EncoderSpec, PairFeatures
from dinoreg.features.registry import volume_encoder
from dinoreg.spec import setting
from dinoreg.jit import fused_cpu, helper, kernel, prange, use_torch_threads

_FACES = [(-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)]


def ssc_pairs(flat: tuple[bool, bool, bool] = (False, False, False)
              ) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """The pairs of face-neighbour offsets that are ``sqrt(2)`` apart (unit dilation).

    12 pairs of the six neighbours in 3D. Along a ``flat`` axis (one voxel) there are no
    neighbours: a 2D image gets the 4 pairs of its four in-plane neighbours and, since 4
    channels alone describe a slice poorly (brain mid-slice Dice 0.58 against 0.63), the 4
    centre-to-neighbour pairs of classic MIND (the centre offset ``(0, 0, 0)``): 8 channels.
    """
    faces = [f for f in _FACES if not any(o != 0 and fl for o, fl in zip(f, flat))]
    pairs = []
    for a, b in itertools.combinations(faces, 2):
        if sum((x - y) ** 2 for x, y in zip(a, b)) == 2:
            pairs.append((a, b))
    if any(flat):  # 2D: also the centre against each in-plane neighbour (MIND's 4-neighbourhood)
        pairs += [((0, 0, 0), f) for f in faces]
    return pairs


_RING = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def far_pairs_2d(flat: tuple[bool, bool, bool], distance: int
                 ) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """The long-range 2D block: the centre against its 8 in-plane ring neighbours ``distance``
    voxels away along each in-plane axis (diagonals ``sqrt(2) * distance``), as voxel offsets.

    ``flat`` marks the one axis of one voxel; the ring lies in the other two.
    """
    axes = [a for a in range(3) if not flat[a]]
    if len(axes) != 2:
        raise ValueError(f"far_pairs_2d needs exactly one flat axis, got {flat}")
    pairs = []
    for u, v in _RING:
        offset = [0, 0, 0]
        offset[axes[0]], offset[axes[1]] = u * distance, v * distance
        pairs.append(((0, 0, 0), tuple(offset)))
    return pairs  # type: ignore[return-value]


def box_filter(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Cubic mean filter of side ``2 * radius + 1`` with replicated borders (square on a volume
    of one slice: axes of one voxel are not filtered).

    ``x`` is ``(N, C, I, J, K)``; the result has the same shape.
    """
    if radius <= 0:
        return x
    flat = _flat_axes(x)
    if any(flat):
        pad = [p for fl in reversed(flat) for p in ((0, 0) if fl else (radius, radius))]
        kernel = tuple(1 if fl else 2 * radius + 1 for fl in flat)
        return F.avg_pool3d(F.pad(x, pad, mode="replicate"), kernel, stride=1)
    padded = F.pad(x, [radius] * 6, mode="replicate")
    return F.avg_pool3d(padded, 2 * radius + 1, stride=1)


def _flat_axes(x: torch.Tensor) -> tuple[bool, bool, bool]:
    """Which spatial axes of ``(N, C, I, J, K)`` have one voxel."""
    return tuple(int(n) == 1 for n in x.shape[2:])  # type: ignore[return-value]


def _shifted(padded: torch.Tensor, offset: tuple[int, int, int], pad: int,
             shape: tuple[int, int, int]) -> torch.Tensor:
    sl = [slice(pad + o, pad + o + s) for o, s in zip(offset, shape)]
    return padded[:, :, sl[0], sl[1], sl[2]]


def _concat(blocks: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """The channel blocks joined along ``dim``; one block as it is (``torch.cat`` would copy it:
    a whole feature volume of fresh memory on a 3D pair)."""
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim)


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2, eps_scale: float = 1e-3,
             pool: int = 1, far_2d: int = 0, far_radius_2d: int = 2) -> torch.Tensor:
    """MIND-SSC descriptor of a volume, optionally average-pooled.

    Args:
        image: ``(N, 1, I, J, K)`` float tensor (any intensity scale; the descriptor is
            invariant to affine intensity changes).
        radius: half side of the patch box filter, voxels.
        dilation: distance of the six neighbours from the centre, voxels.
        eps_scale: lower clamp of the local variance relative to its volume mean.
        pool: average the descriptor over cells of ``pool`` voxels tiling the grid from voxel
            0 (cells cut by the far edges average the voxels they hold). 1 keeps the image grid.
        far_2d: a volume of one slice only: distance of the long-range block
            (:func:`far_pairs_2d`), voxels; 0 leaves it out. Ignored in 3D.
        far_radius_2d: patch radius of the long-range block, voxels.

    Returns:
        ``(N, 12, ceil(I / pool), ceil(J / pool), ceil(K / pool))`` descriptor in ``(0, 1]``;
        for a volume of one slice ``(N, 8, ceil(I / pool), ceil(J / pool), 1)`` (2D, also when
        the flat axis is ``I`` or ``J``), ``(N, 16, ...)`` with ``far_2d`` > 0 (the 8 channels,
        then the long-range block, each normalised by its own ``V``).
    """
    if image.ndim != 5 or image.shape[1] != 1:
        raise ValueError(f"mind_ssc expects (N, 1, I, J, K), got {tuple(image.shape)}")
    flat = _flat_axes(image)
    if sum(flat) > 1:
        raise ValueError(f"MIND-SSC needs at least two axes of more than one voxel, got {tuple(image.shape[2:])}")
    blocks = [(_pair_offsets(int(dilation), flat), radius)]
    if any(flat) and far_2d > 0:
        blocks.append((_offsets(far_pairs_2d(flat, int(far_2d))), far_radius_2d))
    if fused_cpu(image):
        parts = [_concat([_mind_ssc_fused(volume[0].numpy(), r, 0, eps_scale, pool, offsets)
                          for offsets, r in blocks]) for volume in image]
        return parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts)
    out = _concat([_mind_ssc_torch(image, r, 0, eps_scale, offsets) for offsets, r in blocks], 1)
    if pool <= 1:
        return out
    if any(flat):
        kernel = tuple(1 if fl else pool for fl in flat)
        return F.avg_pool3d(out, kernel, stride=kernel, ceil_mode=True)
    return F.avg_pool3d(out, pool, stride=pool, ceil_mode=True)


def _mind_ssc_torch(image: torch.Tensor, radius: int, dilation: int, eps_scale: float,
                    offsets: tuple[np.ndarray, np.ndarray] | None = None) -> torch.Tensor:
    """Unpooled MIND of ``(N, 1, I, J, K)`` by shifted slices; ``offsets``: the pairs as two
    ``(C, 3)`` voxel-offset arrays (default: :func:`ssc_pairs` scaled by ``dilation``)."""
    shape = tuple(image.shape[2:])
    first, second = offsets if offsets is not None else _pair_offsets(int(dilation), _flat_axes(image))
    d = int(max(np.abs(first).max(), np.abs(second).max(), 1))
    padded = F.pad(image, [d] * 6, mode="replicate")
    dist = image.new_empty((image.shape[0], len(first), *shape))
    for c, (a, b) in enumerate(zip(first.tolist(), second.tolist())):
        va = _shifted(padded, tuple(a), d, shape)  # type: ignore[arg-type]
        vb = _shifted(padded, tuple(b), d, shape)  # type: ignore[arg-type]
        torch.sub(va, vb, out=dist[:, c:c + 1]).pow_(2)
    del padded
    dist = box_filter(dist, radius)
    dist -= dist.min(1, keepdim=True).values
    var = dist.mean(1, keepdim=True)
    mean_var = var.mean()
    var = var.clamp(mean_var * eps_scale, mean_var / eps_scale)
    return dist.div_(var).neg_().exp_()


def _pair_offsets(dilation: int, flat: tuple[bool, bool, bool] = (False, False, False)
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The SSC pairs as two ``(12, 3)`` (``(8, 3)`` with a flat axis) int64 arrays of voxel offsets."""
    first, second = _offsets(ssc_pairs(flat))
    return first * dilation, second * dilation


def _offsets(pairs: list[tuple[tuple[int, int, int], tuple[int, int, int]]]) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of offsets as two ``(C, 3)`` int64 arrays (first and second of each pair)."""
    return np.array([a for a, _ in pairs], np.int64), np.array([b for _, b in pairs], np.int64)


def _mind_ssc_fused(volume: np.ndarray, radius: int, dilation: int, eps_scale: float, pool: int,
                    offsets: tuple[np.ndarray, np.ndarray] | None = None) -> torch.Tensor:
    """:func:`mind_ssc` of one ``(I, J, K)`` volume by the numba kernels -> ``(12, I', J', K')``
    (``offsets``: the pairs as two ``(C, 3)`` voxel-offset arrays, default :func:`ssc_pairs`
    scaled by ``dilation``; then ``C`` channels).

    Two passes over the volume, block of planes by block of planes, so the full-resolution
    12-channel descriptor is never held: the first stores each voxel's variance ``V`` (its
    volume mean sets the clamp), the second recomputes the distances, normalises them and
    average-pools them by ``pool``.
    """
    use_torch_threads()
    volume = np.ascontiguousarray(volume, dtype=np.float32)
    flat = tuple(n == 1 for n in volume.shape)
    first, second = offsets if offsets is not None else _pair_offsets(int(dilation), flat)  # type: ignore[arg-type]
    radius, pool = max(int(radius), 0), max(int(pool), 1)
    variance = np.empty(volume.shape, np.float32)
    _mind_variance(volume, first, second, radius, variance)
    mean_var = float(variance.mean(dtype=np.float64))
    out = np.zeros((len(first), *(-(-n // pool) for n in volume.shape)), np.float32)
    _mind_pooled(volume, first, second, radius, variance, np.float32(mean_var * eps_scale),
                 np.float32(mean_var / eps_scale), pool, out)
    return torch.from_numpy(out)


@helper
def _plane_distances(volume: np.ndarray, first: np.ndarray, second: np.ndarray, radius: int, x: int,
                     out: np.ndarray) -> None:
    """``out[c]`` = the ``(j, k)``-box-filtered ``(V(y + first[c]) - V(y + second[c]))^2`` on plane ``x``.

    All indices clamp to the volume (replicated borders); ``out`` is ``(12, J, K)``.
    """
    h, w, d = volume.shape
    width = 2 * radius + 1
    scale = np.float32(1.0 / (width * width))
    sq = np.empty(d + 2 * radius, np.float32)
    rows = np.empty((w, d), np.float32)
    for c in range(first.shape[0]):
        ia = min(max(x + first[c, 0], 0), h - 1)
        ib = min(max(x + second[c, 0], 0), h - 1)
        fa, fb = first[c, 2], second[c, 2]
        lo, hi = max(0, -fa, -fb), min(d, d - fa, d - fb)  # k needing no clamping
        for j in range(w):
            va = volume[ia, min(max(j + first[c, 1], 0), w - 1)]
            vb = volume[ib, min(max(j + second[c, 1], 0), w - 1)]
            for k in range(lo, hi):
                diff = va[k + fa] - vb[k + fb]
                sq[k + radius] = diff * diff
            for k in range(0, lo):
                diff = va[min(max(k + fa, 0), d - 1)] - vb[min(max(k + fb, 0), d - 1)]
                sq[k + radius] = diff * diff
            for k in range(hi, d):
                diff = va[min(max(k + fa, 0), d - 1)] - vb[min(max(k + fb, 0), d - 1)]
                sq[k + radius] = diff * diff
            for t in range(radius):  # replicated ends for the k-box
                sq[t] = sq[radius]
                sq[d + radius + t] = sq[d + radius - 1]
            row = rows[j]
            row[:] = sq[:d]
            for t in range(1, width):  # direct sums: a running sum's drift is amplified by 1 / V
                for k in range(d):
                    row[k] += sq[k + t]
        target = out[c]
        for j in range(w):
            acc = target[j]
            acc[:] = 0.0
            for t in range(-radius, radius + 1):
                source = rows[min(max(j + t, 0), w - 1)]
                for k in range(d):
                    acc[k] += source[k]
            for k in range(d):
                acc[k] *= scale


@helper
def _block_distances(volume: np.ndarray, first: np.ndarray, second: np.ndarray, radius: int, start: int,
                     stop: int, planes: np.ndarray, dist: np.ndarray, variance: np.ndarray) -> None:
    """Box-filtered, min-subtracted distances of planes ``start..stop-1`` into ``dist`` ``(n, 12, J, K)``
    and their channel means into ``variance`` ``(n, J, K)``. ``planes`` is scratch for the
    ``stop - start + 2 radius`` plane distances the ``i``-box needs."""
    h = volume.shape[0]
    channels, w, d = dist.shape[1], dist.shape[2], dist.shape[3]
    for p in range(stop - start + 2 * radius):
        _plane_distances(volume, first, second, radius, min(max(start - radius + p, 0), h - 1), planes[p])
    scale = np.float32(1.0 / (2 * radius + 1))
    low = np.empty(d, np.float32)
    for n in range(stop - start):
        for c in range(channels):
            for j in range(w):
                row = dist[n, c, j]
                row[:] = 0.0
                for t in range(2 * radius + 1):
                    source = planes[n + t, c, j]
                    for k in range(d):
                        row[k] += source[k]
                for k in range(d):
                    row[k] *= scale
        for j in range(w):
            low[:] = dist[n, 0, j]
            for c in range(1, channels):
                row = dist[n, c, j]
                for k in range(d):
                    low[k] = min(low[k], row[k])
            total = variance[n, j]
            total[:] = 0.0
            for c in range(channels):
                row = dist[n, c, j]
                for k in range(d):
                    row[k] -= low[k]
                    total[k] += row[k]
            for k in range(d):
                total[k] *= np.float32(1.0 / channels)


_BLOCK = 8  # planes per block: the i-box recomputes 2 * radius planes per block


@kernel
def _mind_variance(volume: np.ndarray, first: np.ndarray, second: np.ndarray, radius: int,
                   variance: np.ndarray) -> None:
    """Pass 1: ``variance[x]`` = channel mean of the min-subtracted distances (MIND's ``V``)."""
    h, w, d = volume.shape
    channels = first.shape[0]
    for b in prange(-(-h // _BLOCK)):
        start, stop = b * _BLOCK, min((b + 1) * _BLOCK, h)
        planes = np.empty((stop - start + 2 * radius, channels, w, d), np.float32)
        dist = np.empty((stop - start, channels, w, d), np.float32)
        _block_distances(volume, first, second, radius, start, stop, planes, dist, variance[start:stop])


@kernel
def _mind_pooled(volume: np.ndarray, first: np.ndarray, second: np.ndarray, radius: int, variance: np.ndarray,
                 low: np.float32, high: np.float32, pool: int, out: np.ndarray) -> None:
    """Pass 2: ``exp(-dist / clamp(V, low, high))`` averaged over cells of ``pool`` voxels into ``out``
    (cells cut by the far edges average the voxels they hold)."""
    h, w, d = volume.shape
    channels = first.shape[0]
    per_block = max(1, _BLOCK // pool)  # cells (of pool planes each) per block
    for blk in prange(-(-out.shape[1] // per_block)):
        first_cell, last_cell = blk * per_block, min((blk + 1) * per_block, out.shape[1])
        start, stop = first_cell * pool, min(last_cell * pool, h)
        planes = np.empty((stop - start + 2 * radius, channels, w, d), np.float32)
        dist = np.empty((stop - start, channels, w, d), np.float32)
        var = np.empty((stop - start, w, d), np.float32)
        _block_distances(volume, first, second, radius, start, stop, planes, dist, var)
        inv = np.empty(d, np.float32)
        for n in range(stop - start):
            for j in range(w):
                stored = variance[start + n, j]
                for k in range(d):
                    inv[k] = np.float32(-1.0) / min(max(stored[k], low), high)
                for c in range(channels):
                    row = dist[n, c, j]
                    target = out[c, (start + n) // pool, j // pool]
                    for k in range(d):
                        target[k // pool] += np.exp(row[k] * inv[k])
        for ic in range(first_cell, last_cell):
            count_i = min(pool, h - ic * pool)
            for c in range(channels):
                for jc in range(out.shape[2]):
                    count_ij = count_i * min(pool, w - jc * pool)
                    target = out[c, ic, jc]
                    for kc in range(out.shape[3]):
                        target[kc] /= count_ij * min(pool, d - kc * pool)


# --------------------------------------------------------------------------- the registered encoder

@dataclass(frozen=True)
class MindSpec(EncoderSpec):
    """MIND-SSC settings (voxels of the image grid)."""

    name: ClassVar[str] = "mind"
    mind_radius: int = setting(1, "patch radius of the self-similarity distances, voxels", low=1, high=4)
    mind_dilation: int = setting(2, "distance between the six-neighbourhood pairs, voxels", low=1, high=8)
    mind_downsample: int = setting(1, "compute on the image average-pooled by this factor (dilation divided alike)",
                                   low=1, high=4)
    mind_pool: int = setting(2, "average the descriptor over cells of p voxels (memory / p^3); capped by the "
                                "gcd of the method's cell sizes; 2D images are not pooled", low=1, high=8)
    mind_far_2d: int = setting(8, "2D images: distance of the long-range block (the centre against its 8 ring "
                                  "neighbours this far, 8 more channels), voxels; 0: off", low=0, high=32)
    mind_far_radius_2d: int = setting(2, "2D images: patch radius of the long-range block, voxels", low=0, high=8)


def _to_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)[None, None]


@volume_encoder("mind", MindSpec, "MIND-SSC, 12 hand-crafted self-similarity channels (Heinrich et al.)",
                per_image=True)
def mind_pair(req: EncodeRequest) -> PairFeatures:
    """MIND-SSC of both images on the image grid (pooled over ``mind_pool`` cells when the
    method's cells allow it, exactly what its cell grids would average anyway). A 2D image (one
    slice) gets the long-range block too (``mind_far_2d``) and is not pooled: its method may use
    finer cells in 2D (``grid_sp_adam_2d``) and the unpooled 2D descriptor is small."""
    spec: MindSpec = req.spec  # type: ignore[assignment]
    down = spec.mind_downsample
    pool = math.gcd(spec.mind_pool, *req.cell_sizes)  # pooling must not cross any stage's cells
    out = []
    images = req.images()
    with torch.no_grad(), req.progress.stage("MIND-SSC", total=len(images)) as step:
        for _, array in images:
            image = _to_tensor(array, req.device)
            flat = 1 in image.shape[2:]
            if down > 1 and min(image.shape[2:]) >= 2 * down:
                image = F.avg_pool3d(image, down, stride=down, ceil_mode=True)
                out.append(mind_ssc(image, spec.mind_radius, max(1, spec.mind_dilation // down),
                                    far_2d=spec.mind_far_2d // down, far_radius_2d=spec.mind_far_radius_2d))
            else:
                out.append(mind_ssc(image, spec.mind_radius, spec.mind_dilation, pool=1 if flat else pool,
                                    far_2d=spec.mind_far_2d, far_radius_2d=spec.mind_far_radius_2d))
            step(1)
    return PairFeatures(out[0], out[-1])
