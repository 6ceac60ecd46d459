"""Affines of derived grids."""

from __future__ import annotations

import numpy as np


def feature_affine(image_affine: np.ndarray, image_shape: tuple[int, ...], grid: tuple[int, ...]) -> np.ndarray:
    """Voxel-to-world affine ``(4, 4)`` of a cell-centred feature grid covering the image: feature
    voxel ``a`` of ``n`` along an axis of ``I`` voxels sits at image voxel ``(a + 0.5) * I / n - 0.5``."""
    scale = np.array([i / n for i, n in zip(image_shape, grid)], dtype=np.float64)
    to_image = np.eye(4)
    to_image[:3, :3] = np.diag(scale)
    to_image[:3, 3] = (scale - 1.0) / 2.0
    return image_affine @ to_image
