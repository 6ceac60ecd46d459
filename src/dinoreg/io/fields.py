"""Reading displacement fields (the Learn2Reg convention: ``(I, J, K, 3)`` float32 voxels of
the fixed grid, components ``(i, j, k)``, pull-back) from files, arrays or :class:`Image`.

Every field is checked once, here: real numbers, shape ``(I, J, K, 3)``, finite, and no
displacement beyond :data:`MAX_DISPLACEMENT_FACTOR` times the grid's largest dimension (such a
vector leaves the image many times over: a corrupt file, or not a field in voxels of this grid).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from dinoreg.errors import DinoregError
from dinoreg.io.images import Image, check_geometry, check_numeric

MAX_DISPLACEMENT_FACTOR = 10.0


def check_field(array: Any, name: str) -> np.ndarray:
    """The field as ``(I, J, K, 3)`` float32 (trailing singleton axes squeezed); raises a
    :class:`DinoregError` naming ``name`` for a wrong shape or type, NaN/Inf or huge vectors."""
    data = np.asanyarray(array)
    check_numeric(data, name)
    while data.ndim > 4 and data.shape[3] == 1:
        data = data[:, :, :, 0]
    if data.ndim != 4 or data.shape[-1] != 3:
        raise DinoregError(f"expected a displacement field of shape (I, J, K, 3), got {data.shape}", name)
    if not np.isfinite(data).all():
        raise DinoregError("displacement field holds NaN/Inf values", name)
    largest = float(np.abs(data).max()) if data.size else 0.0
    limit = MAX_DISPLACEMENT_FACTOR * max(data.shape[:3])
    if largest > limit:
        raise DinoregError(f"displacement field holds vectors of {largest:.3g} voxels, more than "
                           f"{MAX_DISPLACEMENT_FACTOR:g}x the grid size {data.shape[:3]} (corrupt, or not "
                           "in voxels of the fixed grid)", name)
    return data.astype(np.float32, copy=False)


def load_field(path: str | os.PathLike) -> Image:
    """Read a displacement field ``(I, J, K, 3)`` (voxels of the fixed grid) with its affine."""
    p = Path(path)
    if not p.exists():
        raise DinoregError("file not found", p)
    import nibabel as nib

    try:
        img = nib.load(str(p))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise DinoregError(f"cannot read displacement field ({exc})", p) from exc
    return Image(check_field(data, str(p)), check_geometry(img.affine, str(p)), str(p))


def as_field(disp: Any) -> Image:
    """A field from a path, an :class:`Image` holding ``(I, J, K, 3)``, or the array itself
    (identity affine)."""
    if isinstance(disp, (str, os.PathLike)):
        return load_field(disp)
    if isinstance(disp, Image):
        return Image(check_field(disp.array, disp.name), disp.affine, disp.path)
    return Image(check_field(disp, "<field>"), np.eye(4))


def field_grid(field_img: Image, fixed: Image | None) -> Image:
    """The fixed grid a field indexes (an empty :class:`Image`): ``fixed``'s geometry, whose shape
    must be the field's, or else the field's own affine."""
    shape = tuple(int(s) for s in field_img.array.shape[:3])
    if fixed is None:
        return Image(np.zeros(shape, np.float32), field_img.affine)
    if fixed.shape != shape:
        raise DinoregError(f"field grid {shape} does not match the fixed image {fixed.shape} ({fixed.name})",
                           field_img.name)
    return Image(np.zeros(shape, np.float32), fixed.affine, fixed.path)
