"""Learn2Reg evaluation metrics, reproduced from the challenge's evaluation script.

Conventions (DESIGN.md): a displacement field ``disp`` has shape ``(I, J, K, 3)``, is in voxel
units of the fixed grid, components ordered ``(i, j, k)``, and pulls back:
``warped(p) = moving(p + disp(p))``. Segmentations are integer label maps ``[i, j, k]`` on the
fixed grid (the warped moving one) or on the grid ``disp`` indexes (the moving one).

* **Dice** per label; NaN when the label is absent in the fixed segmentation or in the
  moving one (the evaluator skips such labels); the mean is the NaN-mean.
* **HD95** per label: area-weighted 95th-percentile symmetric surface distance
  (:mod:`dinoreg.surface_distance`); Learn2Reg reports it with unit spacing (voxels); the
  same value with the real spacing is in mm. ``inf`` when the warped label vanished.
* **Jacobian determinant** of ``x + u(x)`` with central differences ``[-0.5, 0, 0.5]``
  (zero padding) cropped by 2 voxels on each side; **SDlogJ** is
  ``std(log(clip(detJ + 3, 1e-9, 1e9)))`` (the ``+ 3`` is the evaluator's own), optionally
  inside the fixed mask; the **folding fraction** is the fraction of ``detJ <= 0``.
* **TRE** per landmark, mm: ``|| (fix + u(fix) - mov) * spacing_moving ||`` with ``u``
  sampled by cubic-spline ``scipy.ndimage.map_coordinates`` (its default, order 3).
* **Aggregate** over pairs: mean, standard deviation (``ddof=1``) and the Learn2Reg "30"
  statistic, which is the 30th percentile of the per-pair values (``pandas.Series.quantile(.3)``
  with linear interpolation, NaN skipped) -- *not* the mean of the worst 30 %. For Dice it
  is the value 30 % of cases fall below; for distances it is on the good side.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from dinoreg import jit
from dinoreg.errors import DinoregError
from dinoreg.ndv import ndv as _ndv
from dinoreg.surface_distance import robust_hausdorff, surface_distances

LOG_JAC_OFFSET = 3.0  # the Learn2Reg evaluator adds 3 to detJ before clipping and log
CROP = 2  # voxels removed on each side of the Jacobian determinant


# --------------------------------------------------------------------------- overlap

MAX_COUNTED_LABEL = 1 << 20  # label maps with values in [0, this) are counted with bincount


def _max_label(seg: np.ndarray) -> int | None:
    """The largest value of a label map holding non-negative integers below
    :data:`MAX_COUNTED_LABEL` (booleans included: 0 or 1), the maps :func:`label_counts` and
    :func:`label_boxes` index by label; None for other maps (float, negative or huge labels)."""
    a = np.asarray(seg)
    if a.dtype.kind not in "uib" or a.size == 0:
        return None
    if a.dtype.kind == "b":
        return int(a.any())
    low, high = int(a.min()), int(a.max())
    return high if low >= 0 and high < MAX_COUNTED_LABEL else None


def label_counts(seg: np.ndarray) -> np.ndarray | None:
    """Voxel count per label value (index = label, ``int64``, at least 2 entries): ``np.bincount``'s
    result, counted in the map's own integer type (no ``intp`` copy of it); None for maps
    :func:`_max_label` refuses."""
    top = _max_label(seg)
    if top is None:
        return None
    a = np.asarray(seg)
    flat = a.ravel(order="K")  # a view of C- or Fortran-ordered maps: the order does not change counts
    flat = flat.view(np.uint8) if a.dtype.kind == "b" else flat
    if not jit.available():  # pragma: no cover - exercised only where numba is missing
        return np.bincount(flat, minlength=2)
    out = np.zeros(max(top + 1, 2), np.int64)
    _count_into(flat, out)
    return out


@jit.exact_helper
def _count_into(values: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled by numba
    """``out[v] += 1`` for every ``v`` of the 1D non-negative integer array ``values``."""
    for index in range(values.shape[0]):
        out[values[index]] += 1


def _present(seg: np.ndarray) -> set[int]:
    """The distinct values of a label map."""
    counts = label_counts(seg)
    if counts is not None:
        return {int(v) for v in np.flatnonzero(counts)}
    return {int(v) for v in np.unique(seg)}


def _labels(arrays: Iterable[np.ndarray | None]) -> list[int]:
    found: set[int] = set()
    for a in arrays:
        if a is not None:
            found.update(_present(a))
    return sorted(v for v in found if v != 0)


def dice_per_label(fixed_seg: np.ndarray, warped_seg: np.ndarray, labels: Sequence[int] | None = None,
                   moving_seg: np.ndarray | None = None) -> dict[int, float]:
    """Dice overlap ``2|F∩W| / (|F|+|W|)`` per label between the fixed and warped segmentations.

    Args:
        fixed_seg, warped_seg: integer label maps of the same shape.
        labels: labels to score; ``None`` = every non-zero label of either map.
        moving_seg: the *unwarped* moving segmentation; when given, a label absent from it is
            NaN (as in the evaluator), otherwise absence is judged on ``warped_seg``.

    Returns:
        ``{label: dice}``, NaN when the label is absent in fixed or in moving.
    """
    _check_same_shape(fixed_seg, warped_seg, "warped segmentation")
    reference = warped_seg if moving_seg is None else moving_seg
    labs = labels if labels is not None else _labels((fixed_seg, warped_seg, moving_seg))
    fixed, warped = np.asarray(fixed_seg), np.asarray(warped_seg)
    counted = [label_counts(a) for a in (fixed, warped, reference)]
    if any(c is None for c in counted):
        return {int(lab): _dice_one(fixed == lab, warped == lab, (reference == lab).any()) for lab in labs}
    n_fixed, n_warped, n_reference = counted
    agree = fixed == warped
    agreeing = fixed[agree]
    n_both = label_counts(agreeing) if agreeing.size else np.zeros(1, np.int64)

    def count(table: np.ndarray, lab: int) -> int:
        return int(table[lab]) if 0 <= lab < len(table) else 0

    out = {}
    for lab in labs:
        f, w = count(n_fixed, int(lab)), count(n_warped, int(lab))
        if f == 0 or count(n_reference, int(lab)) == 0:
            out[int(lab)] = float("nan")
        else:
            out[int(lab)] = float(2.0 * np.int64(count(n_both, int(lab))) / np.int64(f + w))
    return out


def _dice_one(f: np.ndarray, w: np.ndarray, in_reference: bool) -> float:
    """Dice of two boolean masks; NaN when ``f`` is empty or the label is not in the reference."""
    if not f.any() or not in_reference:
        return float("nan")
    return float(2.0 * np.logical_and(f, w).sum() / (f.sum() + w.sum()))


def hd95_per_label(fixed_seg: np.ndarray, warped_seg: np.ndarray, labels: Sequence[int] | None = None,
                   spacing: Sequence[float] = (1.0, 1.0, 1.0), moving_seg: np.ndarray | None = None,
                   percent: float = 95.0) -> dict[int, float]:
    """Robust (95th percentile) Hausdorff distance per label, in the units of ``spacing``.

    With unit spacing this is Learn2Reg's HD95 in voxels; pass the fixed grid's spacing for mm.
    NaN for labels absent in fixed or moving (as :func:`dice_per_label`); ``inf`` when present
    in both but absent after warping (the surface-distance package's convention).
    Volumes of shape ``(I, J, 1)`` are treated as 2D images (contour lengths, 2D distances).
    """
    _check_same_shape(fixed_seg, warped_seg, "warped segmentation")
    fixed, warped, ref = fixed_seg, warped_seg, warped_seg if moving_seg is None else moving_seg
    sp = [float(s) for s in spacing]
    if fixed.ndim == 3 and fixed.shape[2] == 1:
        fixed, warped, ref, sp = fixed[..., 0], warped[..., 0], ref[..., 0], sp[:2]
    boxes = _label_boxes(fixed, warped)
    in_fixed, in_reference = _present(fixed), _present(ref)
    labs = [int(lab) for lab in (labels if labels is not None else _labels((fixed_seg, warped_seg, moving_seg)))]
    scored = [lab for lab in labs if lab in in_fixed and lab in in_reference]

    def one(lab: int) -> float:
        box = boxes(lab)  # both masks lie inside: surface_distances crops to them anyway
        return robust_hausdorff(surface_distances(fixed[box] == lab, warped[box] == lab, sp), percent)

    values = {lab: one(lab) for lab in scored}  # one label at a time: the distance transform is parallel
    return {lab: values.get(lab, float("nan")) for lab in labs}


def label_boxes(seg: np.ndarray) -> list[tuple[slice, ...] | None]:
    """``scipy.ndimage.find_objects`` of an integer label map (1 to 3 dimensions): for each label
    ``1 .. max`` its bounding box as slices, or None when absent. One numba pass in the map's own
    type and memory order for the maps :func:`_max_label` accepts (scipy's otherwise)."""
    a = _indexable(seg)
    return _boxes_below(a, _max_label(a))


def _indexable(seg: np.ndarray) -> np.ndarray:
    """``seg`` as an array, booleans viewed as ``uint8`` (labels 0 and 1 that index a table)."""
    a = np.asarray(seg)
    return a.view(np.uint8) if a.dtype.kind == "b" else a


def _boxes_below(a: np.ndarray, top: int | None) -> list[tuple[slice, ...] | None]:
    """:func:`label_boxes` of the map ``a`` (booleans viewed as ``uint8``) whose largest label is
    ``top`` (:func:`_max_label`: None for maps it refuses, which scipy handles)."""
    if not jit.available() or a.ndim > 3 or top is None:  # pragma: no cover - numba missing, odd maps
        from scipy import ndimage

        return ndimage.find_objects(a)
    fortran = not a.flags.c_contiguous and a.flags.f_contiguous
    view = a.T if fortran else a  # walk the memory in order; the axes are swapped back below
    view3 = view.reshape(view.shape + (1,) * (3 - view.ndim))
    low = np.full((top + 1, 3), np.iinfo(np.int64).max, np.int64)
    high = np.full((top + 1, 3), -1, np.int64)
    _boxes_into(view3, low, high)
    axes = list(range(a.ndim))[::-1] if fortran else list(range(a.ndim))
    return [None if high[label, 0] < 0 else
            tuple(slice(int(low[label, axes.index(d)]), int(high[label, axes.index(d)]) + 1) for d in range(a.ndim))
            for label in range(1, top + 1)]


@jit.exact_helper
def _boxes_into(seg: np.ndarray, low: np.ndarray, high: np.ndarray) -> None:  # pragma: no cover - numba
    """Per label ``v > 0`` of the 3D map ``seg``: the smallest (``low[v]``) and largest
    (``high[v]``) index along each axis where it occurs."""
    size_i, size_j, size_k = seg.shape
    for i in range(size_i):
        for j in range(size_j):
            for k in range(size_k):
                v = seg[i, j, k]
                if v > 0:
                    if i < low[v, 0]:
                        low[v, 0] = i
                    if i > high[v, 0]:
                        high[v, 0] = i
                    if j < low[v, 1]:
                        low[v, 1] = j
                    if j > high[v, 1]:
                        high[v, 1] = j
                    if k < low[v, 2]:
                        low[v, 2] = k
                    if k > high[v, 2]:
                        high[v, 2] = k


def _label_boxes(*segs: np.ndarray) -> Callable[[int], tuple[slice, ...]]:
    """``box(label)``: the bounding box of ``label`` in all of ``segs`` together (the whole grid
    for label maps :func:`_max_label` refuses: float, negative or huge labels)."""
    whole = tuple(slice(0, n) for n in segs[0].shape)
    maps = [_indexable(s) for s in segs]
    tops = [_max_label(m) for m in maps]
    if any(top is None for top in tops):
        return lambda label: whole
    found = [_boxes_below(m, top) for m, top in zip(maps, tops)]

    def box(label: int) -> tuple[slice, ...]:
        parts = [f[label - 1] for f in found if 0 < label <= len(f) and f[label - 1] is not None]
        if not parts:
            return whole
        return tuple(slice(min(p[a].start for p in parts), max(p[a].stop for p in parts)) for a in range(len(whole)))

    return box


# --------------------------------------------------------------------------- Jacobian

SLAB = 8  # rows along i per block of the voxel-wise kernels (keeps their temporaries in cache)


def _check_field(disp: np.ndarray) -> np.ndarray:
    """The field as an array (its own dtype: the kernels convert block by block to float64)."""
    disp = np.asarray(disp)
    if disp.ndim != 4 or disp.shape[-1] != 3:
        raise DinoregError(f"displacement field must have shape (I, J, K, 3), got {disp.shape}", "displacement")
    spatial = [s for s in disp.shape[:3] if s != 1]
    if any(s <= 2 * CROP for s in spatial) or len(spatial) < 2:
        raise DinoregError(f"displacement field {disp.shape[:3]} is too small for the Jacobian "
                           f"(needs more than {2 * CROP} voxels along each non-singleton axis)", "displacement")
    return disp


def _gradient(component: np.ndarray, axis: int) -> np.ndarray:
    """Central difference ``(f[x+1] - f[x-1]) / 2`` along ``axis`` with zero padding."""
    shape = [1] * component.ndim
    shape[axis] = 3
    from scipy import ndimage  # imported where used: 0.3 s that a 3D register never needs

    return ndimage.correlate(component, np.array([-0.5, 0.0, 0.5]).reshape(shape), mode="constant", cval=0.0)


def jacobian_determinant(disp: np.ndarray) -> np.ndarray:
    """Determinant of the Jacobian of ``x + u(x)``, exactly as the Learn2Reg evaluator.

    Args:
        disp: ``(I, J, K, 3)`` displacement in voxels. A field with ``K == 1`` is treated as 2D
            (see :func:`jacobian_determinant_2d`).

    Returns:
        ``(I-4, J-4, K-4)`` array (``(I-4, J-4, 1)`` in 2D): the border of 2 voxels, where the
        zero padding makes the differences meaningless, is cropped.
    """
    disp = _check_field(disp)
    if disp.shape[2] == 1:
        return jacobian_determinant_2d(disp)
    size_i = disp.shape[0]
    out = np.empty(tuple(s - 2 * CROP for s in disp.shape[:3]))
    for start in range(CROP, size_i - CROP, SLAB):  # rows of the cropped output, block by block
        stop = min(start + SLAB, size_i - CROP)
        out[start - CROP:stop - CROP] = _det_block(np.asarray(disp[start - 1:stop + 1], dtype=np.float64))
    return out


def _det_block(block: np.ndarray) -> np.ndarray:
    """detJ of the rows ``1 .. n`` of ``block`` (``(n + 2, J, K, 3)`` float64, one row of context
    on each side along i), cropped by :data:`CROP` along j and k.

    The central differences ``0.5 * (f[x+1] - f[x-1])`` are bit-identical to
    :func:`_gradient`'s correlation (two exact half-weights, one rounding), so the result does not
    depend on the block size."""
    n = block.shape[0] - 2
    size_j, size_k = block.shape[1:3]
    jj, kk = slice(CROP, size_j - CROP), slice(CROP, size_k - CROP)
    shifted = {  # (axis, +1/-1) -> the neighbour's rows/columns of the inner region
        (0, 1): block[2:n + 2, jj, kk], (0, -1): block[0:n, jj, kk],
        (1, 1): block[1:n + 1, CROP + 1:size_j - CROP + 1, kk], (1, -1): block[1:n + 1, CROP - 1:size_j - CROP - 1, kk],
        (2, 1): block[1:n + 1, jj, CROP + 1:size_k - CROP + 1], (2, -1): block[1:n + 1, jj, CROP - 1:size_k - CROP - 1],
    }
    jac = [[(shifted[a, 1][..., c] - shifted[a, -1][..., c]) * 0.5 + (1.0 if a == c else 0.0) for c in range(3)]
           for a in range(3)]
    return (jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
            - jac[1][0] * (jac[0][1] * jac[2][2] - jac[0][2] * jac[2][1])
            + jac[2][0] * (jac[0][1] * jac[1][2] - jac[0][2] * jac[1][1]))


def jacobian_determinant_2d(disp: np.ndarray) -> np.ndarray:
    """Jacobian determinant of a 2D field stored as ``(I, J, 1, 3)``.

    The same central differences and zero padding as in 3D, cropped by 2 on ``i`` and ``j``
    only; the third component is ignored (with one slice, ``d/dk`` is 0 and the 3D determinant
    reduces to the 2x2 one): ``(1 + du_i/di)(1 + du_j/dj) - du_i/dj * du_j/di``.
    Returns ``(I-4, J-4, 1)``.
    """
    disp = _check_field(disp)
    if disp.shape[2] != 1:
        raise DinoregError(f"a 2D field must have shape (I, J, 1, 3), got {disp.shape}", "displacement")
    u = np.asarray(disp[:, :, 0, :], dtype=np.float64)
    inner = (slice(CROP, -CROP),) * 2
    g = {(a, c): _gradient(u[..., c], a)[inner] for a in range(2) for c in range(2)}
    det = (1.0 + g[0, 0]) * (1.0 + g[1, 1]) - g[1, 0] * g[0, 1]
    return det[..., None]


def crop_like_jacobian(array: np.ndarray) -> np.ndarray:
    """Crop a fixed-grid array (e.g. the mask) the way :func:`jacobian_determinant` crops."""
    if array.ndim == 3 and array.shape[2] == 1:
        return array[CROP:-CROP, CROP:-CROP, :]
    return array[CROP:-CROP, CROP:-CROP, CROP:-CROP]


def _masked(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is None:
        return values.ravel()
    cropped = crop_like_jacobian(np.asarray(mask))
    if cropped.shape != values.shape:
        raise DinoregError(f"mask shape {np.asarray(mask).shape} does not match the field", "mask")
    return values[cropped > 0]


def _sdlogj_of(detj: np.ndarray, mask: np.ndarray | None, overwrite: bool = False) -> float:
    """SDlogJ of a cropped determinant map; with ``overwrite`` its memory is reused (and lost)."""
    logj = detj if overwrite else np.empty_like(detj, dtype=np.float64)
    np.add(detj, LOG_JAC_OFFSET, out=logj)  # the evaluator's expression, one operation at a time
    np.clip(logj, 1e-9, 1e9, out=logj)
    np.log(logj, out=logj)
    values = logj.ravel() if mask is None else _masked(logj, mask)  # masked: a copy
    return population_std_in_place(values) if values.size else float("nan")


def population_std_in_place(values: np.ndarray) -> float:
    """``float(values.std())`` of a 1D float64 array, bit for bit, overwriting ``values``.

    numpy's ``std`` sums, divides by the count, subtracts the mean into a new array, squares
    it in place, sums again, divides and takes the square root; this does the same operations in
    the same order, only in ``values``' own memory (no second array of the same size)."""
    count = values.shape[0]
    mean = np.add.reduce(values, keepdims=True)
    np.true_divide(mean, count, out=mean, casting="unsafe")
    np.subtract(values, mean, out=values)
    np.multiply(values, values, out=values)
    return float(np.sqrt(np.add.reduce(values) / count))


def _folding_of(detj: np.ndarray, mask: np.ndarray | None) -> float:
    values = _masked(detj, mask)
    return float((values <= 0).mean()) if values.size else float("nan")


def sdlogj(disp: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Learn2Reg SDlogJ: ``std(log(clip(detJ + 3, 1e-9, 1e9)))`` (population std).

    ``mask`` (fixed grid, ``(I, J, K)``, non-zero = inside) restricts the statistic to the
    cropped mask, as the evaluator's masked evaluation. NaN when the mask is empty.
    """
    return _sdlogj_of(jacobian_determinant(disp), mask)


def folding_fraction(disp: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Fraction (0..1) of (cropped, optionally masked) voxels with ``detJ <= 0``, before clipping."""
    return _folding_of(jacobian_determinant(disp), mask)


# --------------------------------------------------------------------------- landmarks

def tre(fix_lms: np.ndarray, mov_lms: np.ndarray, disp: np.ndarray,
        spacing_moving: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Target registration error per landmark, in mm.

    Args:
        fix_lms, mov_lms: ``(N, 3)`` corresponding landmarks in voxel coordinates (fixed grid /
            the grid ``disp`` indexes for the moving image).
        disp: ``(I, J, K, 3)`` displacement in voxels.
        spacing_moving: voxel size (mm) of the moving grid.

    Returns:
        ``(N,)`` array ``|| (fix + u(fix) - mov) * spacing_moving ||``, ``u`` sampled per
        component with cubic-spline ``map_coordinates`` (order 3, outside = 0) as the evaluator.
    """
    fix = np.asarray(fix_lms, dtype=np.float64)
    mov = np.asarray(mov_lms, dtype=np.float64)
    if fix.ndim != 2 or fix.shape[1] != 3 or fix.shape != mov.shape:
        raise DinoregError(f"landmarks must be two (N, 3) arrays of equal shape, got {fix.shape} and {mov.shape}",
                           "landmarks")
    field = np.asarray(disp, dtype=np.float64)
    from scipy import ndimage

    u = np.stack([ndimage.map_coordinates(field[..., c], fix.T) for c in range(3)], axis=1)
    return np.linalg.norm((fix + u - mov) * np.asarray(spacing_moving, dtype=np.float64), axis=1)


# --------------------------------------------------------------------------- one pair

def warp_segmentation(moving_seg: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """Nearest-neighbour pull-back of a label map, as the evaluator
    (``map_coordinates(moving_seg, identity + disp, order=0)``, outside = 0)."""
    seg = np.asarray(moving_seg)
    if seg.ndim != 3:
        raise DinoregError(f"label map must be 3D, got shape {seg.shape}", "moving segmentation")
    shape = disp.shape[:3]
    out = np.empty(shape, seg.dtype)
    grid_jk = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
    flat = seg.ravel()
    for start in range(0, shape[0], SLAB):
        stop = min(start + SLAB, shape[0])
        u = np.asarray(disp[start:stop], dtype=np.float64)
        coords = (np.arange(start, stop).reshape(-1, 1, 1) + u[..., 0], grid_jk[0] + u[..., 1], grid_jk[1] + u[..., 2])
        out[start:stop] = _nearest_lookup(flat, seg.shape, coords)
    return out


def _nearest_lookup(flat: np.ndarray, shape: tuple[int, ...], coords: Sequence[np.ndarray]) -> np.ndarray:
    """``map_coordinates(order=0, mode="constant", cval=0)`` of the C-ordered array ``flat`` of
    ``shape`` at float64 voxel coordinates: the value at ``floor(x + 0.5)`` where every
    coordinate lies in ``[0, n - 1]`` (scipy's rule for the constant mode), else 0."""
    inside = np.ones(coords[0].shape, bool)
    index = np.zeros(coords[0].shape, np.intp)
    for x, n in zip(coords, shape):
        inside &= (x >= 0) & (x <= n - 1)
        nearest = np.floor(x + 0.5).astype(np.intp)
        np.clip(nearest, 0, n - 1, out=nearest)
        index = index * n + nearest
    return np.where(inside, flat[index], np.zeros((), flat.dtype))


def _nanmean(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _check_same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if np.shape(a) != np.shape(b):
        raise DinoregError(f"shape {np.shape(b)} does not match the fixed grid {np.shape(a)}", what)


def evaluate_pair(disp: np.ndarray, fixed_seg: np.ndarray | None = None, moving_seg: np.ndarray | None = None,
                  labels: Sequence[int] | None = None, fixed_lms: np.ndarray | None = None,
                  moving_lms: np.ndarray | None = None, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                  fixed_mask: np.ndarray | None = None, warped_seg: np.ndarray | None = None) -> dict[str, Any]:
    """All Learn2Reg metrics for one registered pair.

    Args:
        disp: ``(I, J, K, 3)`` displacement in voxels of the fixed grid.
        fixed_seg, moving_seg: label maps (moving on the grid ``disp`` indexes); both or neither.
        labels: labels to score (default: non-zero labels of fixed or moving).
        fixed_lms, moving_lms: ``(N, 3)`` voxel landmarks; both or neither.
        spacing: voxel size in mm of the fixed grid (also the moving grid: Learn2Reg assumes one
            grid, and dinoreg resamples the moving image onto the fixed grid).
        fixed_mask: optional fixed-grid mask for SDlogJ and folding.
        warped_seg: the moving labels already warped onto the fixed grid (e.g. sampled once from
            their own grid through world space); ``moving_seg`` then only tells which labels exist.

    Returns:
        a dict of plain Python values (per-label dicts keyed by the label as a string):
        ``dice``, ``dice_mean``, ``hd95_vox``, ``hd95_vox_mean``, ``hd95_mm``, ``hd95_mm_mean``
        (with segmentations), ``tre_mm`` (list), ``tre_mm_mean`` (with landmarks), and always
        ``sdlogj``, ``folding_fraction``, ``ndv_percent``, ``jacobian_masked``. NaN/inf stay floats here;
        :func:`to_jsonable` turns them into ``null``.
    """
    disp = _check_field(disp)
    if (fixed_seg is None) != (moving_seg is None):
        raise DinoregError("give both the fixed and the moving segmentation, or neither", "segmentation")
    if (fixed_lms is None) != (moving_lms is None):
        raise DinoregError("give both the fixed and the moving landmarks, or neither", "landmarks")
    # the surface distances run on a second thread while this one computes the Jacobian metrics:
    # both are partly serial numpy, and the numba kernels of each release the GIL
    per_label: dict[str, dict[int, float]] = {}  # dice, hd95_vox, hd95_mm: in that order
    landmarks: dict[str, Any] = {}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dinoreg-hd95") as pool:
        surface = None
        if fixed_seg is not None:
            _check_same_shape(disp[..., 0], fixed_seg, "fixed segmentation")
            warped = warp_segmentation(moving_seg, disp) if warped_seg is None else warped_seg
            labs = list(labels) if labels is not None else _labels((fixed_seg, moving_seg))
            surface = pool.submit(_surface_metrics, fixed_seg, warped, moving_seg, labs, spacing)
            per_label["dice"] = dice_per_label(fixed_seg, warped, labs, moving_seg=moving_seg)
        if fixed_lms is not None:
            errors = tre(fixed_lms, moving_lms, disp, spacing)
            landmarks = {"tre_mm": [float(e) for e in errors],
                         "tre_mm_mean": float(errors.mean()) if errors.size else float("nan")}
        detj = jacobian_determinant(disp)
        folding = _folding_of(detj, fixed_mask)
        jacobian = {"sdlogj": _sdlogj_of(detj, fixed_mask, overwrite=True), "folding_fraction": folding}
        del detj
        jacobian["ndv_percent"] = _ndv(disp, fixed_mask)  # non-diffeomorphic volume, % (dinoreg.ndv)
        if surface is not None:
            per_label.update(surface.result())
    out: dict[str, Any] = {}
    for key, values in per_label.items():
        out[key] = {str(k): v for k, v in values.items()}
        out[f"{key}_mean"] = _nanmean(values.values())
    return {**out, **landmarks, **jacobian, "jacobian_masked": fixed_mask is not None}


def _surface_metrics(fixed_seg: np.ndarray, warped: np.ndarray, moving_seg: np.ndarray, labs: Sequence[int],
                     spacing: Sequence[float]) -> dict[str, dict[int, float]]:
    """``hd95_vox`` (unit spacing, Learn2Reg's) and ``hd95_mm`` per label."""
    hd_vox = hd95_per_label(fixed_seg, warped, labs, (1.0, 1.0, 1.0), moving_seg=moving_seg)
    unit = all(float(v) == 1.0 for v in spacing)
    hd_mm = hd_vox if unit else hd95_per_label(fixed_seg, warped, labs, spacing, moving_seg=moving_seg)
    return {"hd95_vox": hd_vox, "hd95_mm": hd_mm}


# --------------------------------------------------------------------------- many pairs

def flatten(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Scalar metrics of one pair, the one flattening every table uses: per-label dicts become
    ``metric/label`` and lists ``metric/1``, ``metric/2``, ...; ``None`` and non-finite values
    become NaN; anything else not numeric is left out."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            items = [(f"{key}/{label}", v) for label, v in value.items()]
        elif isinstance(value, (list, tuple)):
            items = [(f"{key}/{n + 1}", v) for n, v in enumerate(value)]
        else:
            items = [(key, value)]
        for name, v in items:
            if v is None:
                flat[name] = float("nan")
            elif isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)):
                flat[name] = float(v) if math.isfinite(float(v)) else float("nan")
    return flat


def _scalar_columns(per_pair: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Per-pair values by metric, NaN where a pair lacks the metric."""
    flats = [flatten(p) for p in per_pair]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    return {k: [f.get(k, float("nan")) for f in flats] for k in keys}


def aggregate(per_pair: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation and the Learn2Reg "30" statistic of every scalar metric.

    For each metric: ``mean`` (NaN skipped), ``std`` (sample, ``ddof=1``, NaN skipped; NaN with
    fewer than 2 values), ``30`` = 30th percentile with linear interpolation over the non-NaN
    values (the evaluator's ``pandas.Series.quantile(.3)``), and ``n`` = number of non-NaN
    values. ``None`` values (JSON ``null``) count as NaN, so the output of :func:`to_jsonable`
    can be aggregated too.
    """
    out = {}
    for key, values in _scalar_columns(per_pair).items():
        vals = np.array([v for v in values if not math.isnan(v)])
        out[key] = {
            "mean": float(vals.mean()) if vals.size else float("nan"),
            "std": float(vals.std(ddof=1)) if vals.size > 1 else float("nan"),
            "30": float(np.quantile(vals, 0.3)) if vals.size else float("nan"),
            "n": int(vals.size),
        }
    return out


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays to Python, NaN and +-inf to ``None``, keys to str."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj
