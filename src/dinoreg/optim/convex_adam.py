"""ConvexAdam on any pair of feature volumes: coupled convex search, then Adam refinement.

Features may be MIND-SSC on the image grid or a learned encoder's coarser volume: both are
brought onto cell grids of ``grid_sp`` voxels that tile the image exactly (the image grid is
padded up to a multiple of the cell size, so cell ``c`` covers voxels ``[c*g, (c+1)*g)``).
An optional initial field (e.g. the slice-match translation) is applied to the moving features
first; the caller composes it with the result.

The stages (:class:`ConvexStage`, :class:`AdamStage`, :class:`ReencodedAdamStage`,
:class:`SmoothStage`) are chained by ``dinoreg.methods.convex_adam``; each returns
``(1, 3, I, J, K)`` voxels of the fixed grid, pull-back convention.

2D pairs are volumes of one slice ``(I, J, 1)``: a cell is then ``grid_sp x grid_sp x 1``
voxels (:func:`cell_shape`), the convex search stays in-plane and the displacement's component
along the flat axis is zero (:func:`zero_flat`).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Callable

import numpy as np

import torch
import torch.nn.functional as F

from dinoreg.jit import fused_cpu_for
from dinoreg.optim import cpu_kernels
from dinoreg.optim.convex import ConvexConfig, convex_optimise
from dinoreg.optim.instance import InstanceConfig, InstanceOptimiser
from dinoreg.pair import RegistrationPair
from dinoreg.progress import Progress
from dinoreg.spatial.grid import compose, interpolate_field, sample, warp


Cell = int | tuple[int, ...]


def cell_shape(image_shape: tuple[int, ...], cell: Cell) -> tuple[int, ...]:
    """Cell size per axis, voxels: ``cell`` along every axis but an axis of one voxel (a 2D
    image's flat axis), where a cell is one voxel thick."""
    cells = (cell,) * len(image_shape) if isinstance(cell, int) else tuple(cell)
    return tuple(1 if n == 1 else int(c) for n, c in zip(image_shape, cells))


def padded_shape(shape: tuple[int, ...], cell: Cell) -> tuple[int, ...]:
    """``shape`` rounded up to a multiple of the cell size (:func:`cell_shape`) on every axis."""
    return tuple(int(math.ceil(s / c)) * c for s, c in zip(shape, cell_shape(shape, cell)))


def zero_flat(disp: torch.Tensor, image_shape: tuple[int, ...]) -> torch.Tensor:
    """``disp`` ``(1, 3, I, J, K)`` with the component along every axis of one voxel set to 0."""
    flat = [a for a, n in enumerate(image_shape) if n == 1]
    if flat:
        disp = disp.clone()
        disp[:, flat] = 0.0
    return disp


def _pool(volume: torch.Tensor, factors: tuple[int, ...], ceil_mode: bool = False) -> torch.Tensor:
    """Average pooling by ``factors`` per axis; an axis shorter than its factor is averaged whole
    (its one cell covers it all)."""
    factors = tuple(min(f, int(n)) for f, n in zip(factors, volume.shape[2:]))
    if len(set(factors)) == 1:
        return F.avg_pool3d(volume, factors[0], stride=factors[0], ceil_mode=ceil_mode)
    return F.avg_pool3d(volume, factors, stride=factors, ceil_mode=ceil_mode)


def pooling_factor(feat_shape: tuple[int, ...], image_shape: tuple[int, ...]) -> int | None:
    """The ``p`` with ``feat_shape == ceil(image_shape / p)`` on every axis (1 on the image grid), else None."""
    for p in range(1, max(image_shape) + 1):
        if all(-(-i // p) == n for i, n in zip(image_shape, feat_shape)):
            return p
        if any(-(-i // p) < n for i, n in zip(image_shape, feat_shape)):
            break
    return None


def features_on_cells(feat: torch.Tensor, image_shape: tuple[int, int, int], cell: Cell) -> torch.Tensor:
    """Average features over cells of ``cell`` voxels tiling the (padded) image grid.

    ``feat`` is ``(1, C, I', J', K')`` covering the image's field of view, cell-centred: feature
    voxel ``a`` along an axis of ``n`` covers image voxels ``[a*I/n, (a+1)*I/n)``. Features on the
    image grid itself are average-pooled exactly (partial cells at the far edges average the
    voxels they hold), and so are features already pooled over cells of ``p`` voxels
    (``ceil(I / p)`` per axis, e.g. ``mind_pool``) when ``p`` divides ``cell``. Other volumes are
    first average-pooled by the integer factor that brings them closest to the cell size from
    above (anti-aliasing), then sampled trilinearly at the cell centres.
    """
    sizes = cell_shape(image_shape, cell)
    padded = padded_shape(image_shape, cell)
    cells = tuple(p // c for p, c in zip(padded, sizes))
    feat_shape = tuple(feat.shape[2:])
    pooled_by = pooling_factor(feat_shape, image_shape)
    # along a flat axis (one voxel) the features are one voxel too, whatever the pooling
    pooled = tuple(1 if n == 1 else pooled_by for n in image_shape)
    if pooled_by is not None and all(c % p == 0 for c, p in zip(sizes, pooled)):
        factors = tuple(c // p for c, p in zip(sizes, pooled))
        return feat if all(f == 1 for f in factors) else _pool(feat, factors, ceil_mode=True)
    voxels_per_feature = [i / n for i, n in zip(image_shape, feat_shape)]
    factors = tuple(min(n, max(1, int(c / v))) for n, v, c in zip(feat_shape, voxels_per_feature, sizes))
    if any(f > 1 for f in factors):
        feat = _pool(feat, factors)
        voxels_per_feature = [v * f for v, f in zip(voxels_per_feature, factors)]
    axes = []
    for c, v, size in zip(cells, voxels_per_feature, sizes):
        centres = torch.arange(c, dtype=feat.dtype, device=feat.device) * size + (size - 1) / 2
        axes.append((centres + 0.5) / v - 0.5)
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), 0).unsqueeze(0)
    return sample(feat, coords, mode="bilinear", padding_mode="border")


def field_to_cells(disp: torch.Tensor, image_shape: tuple[int, int, int], cell: Cell) -> torch.Tensor:
    """A voxel-unit field on the image grid as a cell-unit field on the padded cell grid."""
    sizes = cell_shape(image_shape, cell)
    padded = padded_shape(image_shape, cell)
    pad = []
    for s, p in zip(reversed(image_shape), reversed(padded)):
        pad += [0, p - s]
    if any(pad):
        disp = F.pad(disp, pad, mode="replicate")
    if len(set(sizes)) == 1:
        return F.avg_pool3d(disp, sizes[0], stride=sizes[0]) / sizes[0]
    scale = torch.tensor(sizes, dtype=disp.dtype, device=disp.device).view(1, 3, 1, 1, 1)
    return F.avg_pool3d(disp, sizes, stride=sizes) / scale


def field_from_cells(disp: torch.Tensor, image_shape: tuple[int, int, int], cell: Cell) -> torch.Tensor:
    """A cell-unit field back to voxels on the image grid (trilinear, cell-centred)."""
    padded = padded_shape(image_shape, cell)
    if tuple(disp.shape[2:]) == tuple(padded):
        return disp[:, :, :image_shape[0], :image_shape[1], :image_shape[2]].contiguous()
    full, scale = interpolate_field(disp, padded, align_corners=False)
    if tuple(padded) == tuple(image_shape):  # nothing to crop: scale the fresh field in place
        return full.mul_(scale)
    # scaling the cropped view writes the one contiguous result (no scaled copy of the padding)
    return (full[:, :, :image_shape[0], :image_shape[1], :image_shape[2]] * scale).contiguous()


def final_smooth(disp: torch.Tensor, kernel: int) -> torch.Tensor:
    """Three passes of an odd ``kernel`` mean filter (0 disables), borders replicated."""
    if kernel <= 1:
        return disp
    kernel += 1 - kernel % 2
    if fused_cpu_for(disp.device, disp.dtype):
        return cpu_kernels.box_smooth(disp, kernel, 3)
    for _ in range(3):
        disp = F.avg_pool3d(F.pad(disp, [kernel // 2] * 6, mode="replicate"), kernel, stride=1)
    return disp


def pair_on_cells(feat_fix: torch.Tensor, feat_mov: torch.Tensor, image_shape: tuple[int, int, int], cell: Cell,
                  init: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both feature volumes on the cell grid, the moving one pre-warped by ``init`` (voxels)."""
    fix = features_on_cells(feat_fix, image_shape, cell)
    mov = features_on_cells(feat_mov, image_shape, cell)
    if init is not None:
        mov = warp(mov, field_to_cells(init, image_shape, cell))
    return fix, mov


def stage_features(pair: RegistrationPair, refine: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair's fixed and moving feature volumes as float32 (stages that work on features);
    ``refine``: those of the refinement stages (``PairFeatures.refine``) when the pair has them."""
    if pair.features is None:
        raise ValueError("this stage needs the pair's feature volumes (encode the pair first)")
    features = pair.features.refine if refine and pair.features.refine is not None else pair.features
    return features.fixed.float(), features.moving.float()


def reach_half_widths(disp_hw: int, grid_sp: int, spacing: tuple[float, ...], reach_mm: float) -> tuple[int, ...]:
    """Search half-width per axis, cells: at least ``disp_hw``, and enough cells of ``grid_sp``
    voxels of ``spacing`` mm to reach ``reach_mm`` millimetres."""
    return tuple(max(disp_hw, int(math.ceil(reach_mm / (grid_sp * s - 1e-9)))) if reach_mm > 0 else disp_hw
                 for s in spacing)


class ConvexStage:
    """The coupled convex discrete search on cells of ``config.grid_sp`` voxels.

    Works on ``pair.features``, the moving ones pre-warped by ``pair.init``; a ``previous``
    field pre-warps them further and is composed with the search result. On a 2D pair (one
    slice) the search is in-plane and reaches at least ``reach_mm_2d`` millimetres (a 2D cost
    volume has ``(2 h + 1)^2`` labels per cell, not ``(2 h + 1)^3``: a wide search is cheap).
    """

    name = "convex"

    def __init__(self, config: ConvexConfig, reach_mm_2d: float = 0.0) -> None:
        self.config = config
        self.reach_mm_2d = reach_mm_2d

    def run(self, pair: RegistrationPair, previous: torch.Tensor | None,
            progress: Progress) -> tuple[torch.Tensor, dict[str, float]]:
        g, shape = self.config.grid_sp, pair.shape
        config = self.config
        if 1 in shape and self.reach_mm_2d > 0:
            config = replace(config, disp_hw=reach_half_widths(config.disp_hw, g, pair.spacing, self.reach_mm_2d))
        feat_fix, feat_mov = stage_features(pair)
        with torch.no_grad(), progress.stage("convex", total=1) as step:
            fix_c, mov_c = pair_on_cells(feat_fix, feat_mov, shape, g, pair.init)
            if previous is not None:
                mov_c = warp(mov_c, field_to_cells(previous, shape, g))
            coarse = convex_optimise(fix_c, mov_c, config)
            del fix_c, mov_c
            disp = zero_flat(field_from_cells(coarse, shape, g), shape)
            step(1)
        return (disp if previous is None else compose(disp, previous)), {}


class AdamStage:
    """Adam instance optimisation of a dense field on cells of ``config.grid_sp`` voxels on
    ``pair.features``, starting from ``previous`` (or zero); ``name`` keys its timing and
    progress (a second, finer level is another instance); ``config_2d`` (when given) replaces
    ``config`` on a 2D pair (one slice)."""

    def __init__(self, config: InstanceConfig, name: str = "adam", config_2d: InstanceConfig | None = None) -> None:
        self.config = config
        self.name = name
        self.config_2d = config_2d

    def run(self, pair: RegistrationPair, previous: torch.Tensor | None,
            progress: Progress) -> tuple[torch.Tensor, dict[str, float]]:
        config = self.config_2d if self.config_2d is not None and 1 in pair.shape else self.config
        ga, shape = config.grid_sp, pair.shape
        feat_fix, feat_mov = stage_features(pair, refine=True)
        with torch.no_grad():
            fix_a, mov_a = pair_on_cells(feat_fix, feat_mov, shape, ga, pair.init)
            if previous is None:
                previous = torch.zeros(1, 3, *shape, device=feat_fix.device, dtype=torch.float32)
            start = field_to_cells(previous, shape, ga)
        with progress.stage(self.name, total=config.iterations) as step:
            refined = InstanceOptimiser(config).optimise(fix_a, mov_a, start, progress=lambda it: step(1))
        return zero_flat(field_from_cells(refined, shape, ga), shape), {}


MovingEncoder = Callable[[np.ndarray, np.ndarray, RegistrationPair], tuple[torch.Tensor | None, torch.Tensor]]
"""``(image, mask, pair) -> (fixed, moving)`` features ``(1, C, I', J', K')`` of an ``(I, J, K)``
image (and boolean mask) on the fixed grid of ``pair``, made as the pair's moving features were;
``fixed`` is the fixed image encoded again with it (joint encoders) or None (the pair's own
fixed features still match: per-image encoders)."""


def warp_moving(pair: RegistrationPair, field: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``pair.moving`` ``(I, J, K)`` pulled back by ``field`` (voxels, relative to ``pair.init``,
    which is applied too; trilinear) and its mask (nearest): the moving image as the stages see
    it after ``field``."""
    total = (field if pair.init is None else compose(field, pair.init)).float()

    def pull(array: np.ndarray, mode: str) -> np.ndarray:
        volume = torch.from_numpy(np.ascontiguousarray(array, np.float32)).to(total.device)[None, None]
        return warp(volume, total, mode=mode)[0, 0].cpu().numpy()

    with torch.no_grad():
        return pull(pair.moving, "bilinear"), pull(pair.moving_mask, "nearest") > 0.5


class ReencodedAdamStage:
    """A finer level: the moving *image* warped by the field so far and encoded again, then Adam
    on an increment (regularised alone, from zero) composed with that field.

    Descriptors such as MIND-SSC are not warp-equivariant: the moving image's features under a
    strong local stretch or rotation differ from the fixed ones even at the right displacement,
    which biases the first level towards too small a field (known-warp brains: mean ``|u|`` 0.89-0.91
    of the true one, 0.98-1.02 after this level). After the warp the residual is small and the
    re-encoded features match better. ``encode`` (:data:`MovingEncoder`) makes the warped
    image's features as the pair's moving features were made.
    """

    def __init__(self, config: InstanceConfig, encode: MovingEncoder, name: str = "adam_reencoded") -> None:
        self.config = config
        self.encode = encode
        self.name = name

    def run(self, pair: RegistrationPair, previous: torch.Tensor | None,
            progress: Progress) -> tuple[torch.Tensor, dict[str, float]]:
        ga, shape = self.config.grid_sp, pair.shape
        feat_fix, _ = stage_features(pair, refine=True)
        if previous is None:
            previous = torch.zeros(1, 3, *shape, device=feat_fix.device, dtype=torch.float32)
        start_time = time.perf_counter()
        with torch.no_grad():
            feat_fix_again, feat_mov = self.encode(*warp_moving(pair, previous), pair)
            if feat_fix_again is not None:  # a joint encoder: the fixed side in the new basis
                feat_fix = feat_fix_again.float()
            feat_mov = feat_mov.float()
            fix_a, mov_a = pair_on_cells(feat_fix, feat_mov, shape, ga, None)
            start = torch.zeros(1, 3, *fix_a.shape[2:], device=fix_a.device, dtype=fix_a.dtype)
        encode_s = time.perf_counter() - start_time
        with progress.stage(self.name, total=self.config.iterations) as step:
            refined = InstanceOptimiser(self.config).optimise(fix_a, mov_a, start, progress=lambda it: step(1))
        disp = zero_flat(field_from_cells(refined, shape, ga), shape)
        return compose(disp, previous), {"reencode": encode_s}


class SmoothStage:
    """Three passes of an odd mean filter of ``kernel`` voxels over the field so far."""

    name = "smooth"

    def __init__(self, kernel: int) -> None:
        self.kernel = kernel

    def run(self, pair: RegistrationPair, previous: torch.Tensor | None,
            progress: Progress) -> tuple[torch.Tensor, dict[str, float]]:
        if previous is None:
            previous = torch.zeros(1, 3, *pair.shape, device=pair.device)
        return final_smooth(previous, self.kernel), {}
