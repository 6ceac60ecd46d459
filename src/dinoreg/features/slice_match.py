"""Slice matching with per-slice cls tokens: a coarse translation (DINO-Reg Sec. 2.3).

Both volumes are encoded slice by slice along the same axis (:func:`~dinoreg.features.slicewise.
encode_volume`), keeping the cls token of every encoded slice. The cls tokens of both volumes
are projected onto one joint PCA basis, the ``n_f x n_m`` matrix of Euclidean distances between
fixed and moving slices is formed, and the ``n_pairs`` (10) pairs with the lowest distance vote:
the mean of ``moving_index - fixed_index`` over those pairs is the offset along the slicing axis.

Sign (pull-back, DESIGN.md): if fixed slice ``a`` shows what moving slice ``b`` shows, then
``warped(p) = moving(p + t)`` needs ``t = b - a``. The translation is returned in voxels of the
(common) grid, components ``(i, j, k)``, non-zero only along the slicing axis. Slice indices are
true voxel indices, so the encoding stride ``every`` is accounted for.

Deviation from the paper: slices whose foreground fraction is below ``min_foreground`` are left
out before matching. Blank slices (air above the head, zero padding) all have nearly the same
cls token, so blank-to-blank pairs would otherwise win the vote with arbitrary offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dinoreg.errors import DinoregError
from dinoreg.features.pca import fit_pca
from dinoreg.features.slicewise import SliceFeatures


@dataclass
class SliceMatch:
    """Result of :func:`match_slices`.

    Attributes:
        translation: ``(3,)`` float64 voxel translation ``(i, j, k)``, pull-back convention.
        offset: the same along ``axis`` (moving index minus fixed index), voxels.
        axis: slicing axis.
        pairs: ``(n_pairs, 2)`` int64 ``(fixed_index, moving_index)`` slice indices voting.
        distances: ``(n_pairs,)`` their distances in the joint PCA space.
    """

    translation: np.ndarray
    offset: float
    axis: int
    pairs: np.ndarray
    distances: np.ndarray


def lowest_pairs(distance: torch.Tensor, n_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row/column indices of the ``n_pairs`` smallest entries of a 2D matrix (ascending)."""
    n = min(n_pairs, distance.numel())
    values, flat = torch.topk(distance.reshape(-1), n, largest=False)
    return torch.stack([flat // distance.shape[1], flat % distance.shape[1]], 1), values


def cls_offset(fixed_cls: torch.Tensor, fixed_idx: torch.Tensor, moving_cls: torch.Tensor,
               moving_idx: torch.Tensor, n_pairs: int = 10, components: int = 24, seed: int = 0
               ) -> tuple[float, np.ndarray, np.ndarray]:
    """Offset (voxels) from cls tokens ``(n_f, C)``/``(n_m, C)`` at slice indices ``(n_f,)``/``(n_m,)``.

    Returns ``(offset, pairs (p, 2) of slice indices, distances (p,))``.
    """
    if len(fixed_cls) == 0 or len(moving_cls) == 0:
        raise DinoregError("slice matching needs at least one non-blank slice in each image")
    tokens = torch.cat([fixed_cls, moving_cls]).float()
    k = max(1, min(components, tokens.shape[0] - 1, tokens.shape[1]))
    basis = fit_pca(tokens, k, seed=seed)
    zf = basis.transform(fixed_cls.float().T).T
    zm = basis.transform(moving_cls.float().T).T
    rows_cols, dist = lowest_pairs(torch.cdist(zf, zm), n_pairs)
    fi = fixed_idx.cpu()[rows_cols[:, 0].cpu()]
    mi = moving_idx.cpu()[rows_cols[:, 1].cpu()]
    offset = float((mi - fi).double().mean())
    return offset, torch.stack([fi, mi], 1).numpy(), dist.cpu().double().numpy()


def match_slices(fixed: SliceFeatures, moving: SliceFeatures, n_pairs: int = 10,
                 components: int = 24, min_foreground: float = 0.05, seed: int = 0) -> SliceMatch:
    """Coarse translation of ``moving`` onto ``fixed`` from their per-slice cls tokens.

    Both must come from the same encoder, slicing axis and (resampled) grid.
    ``min_foreground`` drops encoded slices with a smaller fraction of bright pixels.
    """
    if fixed.cls is None or moving.cls is None:
        raise DinoregError("slice matching needs an encoder with a global (cls) token")
    if fixed.axis != moving.axis:
        raise DinoregError(f"fixed and moving were sliced along axes {fixed.axis} and "
                           f"{moving.axis}; slice matching needs the same axis")
    keep_f = fixed.foreground.cpu() >= min_foreground
    keep_m = moving.foreground.cpu() >= min_foreground
    offset, pairs, dist = cls_offset(
        fixed.cls[keep_f.to(fixed.cls.device)], fixed.slice_indices[keep_f],
        moving.cls[keep_m.to(moving.cls.device)], moving.slice_indices[keep_m],
        n_pairs, components, seed)
    translation = np.zeros(3)
    translation[fixed.axis] = offset
    return SliceMatch(translation, offset, fixed.axis, pairs, dist)
