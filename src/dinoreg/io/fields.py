"""Reading displacement fields (the Learn2Reg convention: ``(I, J, K, 3)`` float32 voxels of
the fixed grid, components ``(i, j, k)``, pull-back) from files, arrays or :class:`Image`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from dinoreg.errors import DinoregError
from dinoreg.io.images import Image


def load_field(path: str | os.PathLike) -> Image:
    """Read a displacement field ``(I, J, K, 3)`` (voxels of the fixed grid) with its affine."""
    p = Path(path)
    if not p.exists():
        raise DinoregError("file not found", p)
    import nibabel as nib

    try:
        img = nib.load(str(p))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise DinoregError(f"cannot read displacement field ({exc})", p) from exc
    while data.ndim > 4 and data.shape[3] == 1:
        data = data[:, :, :, 0]
    if data.ndim != 4 or data.shape[-1] != 3:
        raise DinoregError(f"expected a displacement field of shape (I, J, K, 3), got {data.shape}", p)
    if not np.isfinite(data).all():
        raise DinoregError("displacement field holds NaN/Inf values", p)
    return Image(data, np.asarray(img.affine, dtype=np.float64), str(p))


def as_field(disp: Any) -> Image:
    """A field from a path, an :class:`Image` holding ``(I, J, K, 3)``, or the array itself
    (identity affine)."""
    if isinstance(disp, (str, os.PathLike)):
        return load_field(disp)
    if isinstance(disp, Image):
        return disp
    return Image(np.asarray(disp, dtype=np.float32), np.eye(4))
