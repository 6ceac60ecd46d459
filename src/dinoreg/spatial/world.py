"""Fields through world space: the one-interpolation warp of an original moving image.

A Learn2Reg field ``disp`` ``(I, J, K, 3)`` is in voxels of the fixed grid, pull-back: fixed
voxel ``p`` reads the point ``q = p + disp(p)``, a position in the fixed grid's voxel
coordinates, i.e. the world point ``A_fixed q`` (RAS mm). The moving image is sampled there
through its own affine, ``A_moving^-1 A_fixed q``: fixed voxel -> moving world -> moving voxel,
one interpolation of the original image, wherever it lies (also outside the fixed field of view).
"""

from __future__ import annotations

import numpy as np


def moving_voxel_coords(disp: np.ndarray, fixed_affine: np.ndarray, moving_affine: np.ndarray) -> np.ndarray:
    """``(3, I, J, K)`` moving-voxel coordinates read by every fixed voxel (float64)."""
    shape = disp.shape[:3]
    grid = np.stack(np.meshgrid(*(np.arange(s, dtype=np.float64) for s in shape), indexing="ij"))
    q = grid + np.moveaxis(np.asarray(disp, dtype=np.float64), -1, 0)
    to_moving = np.linalg.inv(moving_affine) @ fixed_affine
    return np.einsum("ab,b...->a...", to_moving[:3, :3], q) + to_moving[:3, 3].reshape(3, 1, 1, 1)


def warp_original(moving: np.ndarray, moving_affine: np.ndarray, disp: np.ndarray, fixed_affine: np.ndarray,
                  order: int = 1) -> np.ndarray:
    """The original ``moving`` array sampled once at every fixed voxel's composite position
    (``order`` 1: trilinear, 0: nearest for labels; 0 outside the moving field of view)."""
    from scipy.ndimage import map_coordinates

    coords = moving_voxel_coords(disp, fixed_affine, moving_affine)
    src = np.asarray(moving) if order == 0 else np.asarray(moving, dtype=np.float32)
    out = map_coordinates(src, coords, order=order, mode="constant", cval=0.0)
    return out if order == 0 else out.astype(np.float32)


def compose_world_affine(disp: np.ndarray, fixed_affine: np.ndarray, world: np.ndarray) -> np.ndarray:
    """The field of ``p -> world(A_fixed (p + disp(p)))`` in fixed-grid voxels: a deformable field
    followed by a world-space affine ``world`` (fixed world -> moving world, ``(4, 4)``)."""
    shape = disp.shape[:3]
    grid = np.stack(np.meshgrid(*(np.arange(s, dtype=np.float64) for s in shape), indexing="ij"))
    q = grid + np.moveaxis(np.asarray(disp, dtype=np.float64), -1, 0)
    m = np.linalg.inv(fixed_affine) @ world @ fixed_affine
    moved = np.einsum("ab,b...->a...", m[:3, :3], q) + m[:3, 3].reshape(3, 1, 1, 1)
    return np.moveaxis(moved - grid, 0, -1).astype(np.float32)
