"""Quality-control pictures of one registration.

:func:`qc_figure` draws one pair in the three orthogonal mid-planes of the fixed grid (rows)
with six panels each: fixed, moving (on the fixed grid), warped moving, a checkerboard of fixed
and warped, the deformation grid (a regular grid pushed through ``p + u(p)``, drawn over the
fixed image) and the Jacobian determinant of ``p + u(p)`` with folds (``detJ <= 0``) in black.
Slices are shown in voxel-index space (``i``/``j``/``k`` axes, spacing-correct aspect), not
reoriented to radiological view.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

PLANE_AXES = (2, 1, 0)  # rows: the voxel axis held fixed (k, j, i)
_ANATOMY = {"S": "axial", "I": "axial", "A": "coronal", "P": "coronal", "L": "sagittal", "R": "sagittal"}
PANELS = ("fixed", "moving", "warped", "checkerboard fixed/warped", "deformation grid", "Jacobian det.")


# --------------------------------------------------------------------------- pure helpers

def window(volume: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Scale to [0, 1] between the ``low``/``high`` percentiles of the non-zero voxels."""
    vol = np.asarray(volume, dtype=np.float32)
    nz = vol[vol != 0]
    if nz.size == 0:
        return np.zeros_like(vol)
    lo, hi = np.percentile(nz, [low, high])
    return np.clip((vol - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)


def mid_slice(volume: np.ndarray, axis: int, index: int | None = None) -> np.ndarray:
    """The 2D slice ``volume`` at ``index`` (default: middle) along ``axis``, remaining axes in order."""
    idx = volume.shape[axis] // 2 if index is None else index
    return np.take(volume, idx, axis=axis)


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """Alternate square tiles of two equally shaped 2D images (about ``tiles`` per side)."""
    size = max(1, max(a.shape) // tiles)
    ii, jj = np.indices(a.shape)
    return np.where(((ii // size) + (jj // size)) % 2 == 0, a, b)


def full_size_jacobian(disp: np.ndarray) -> np.ndarray:
    """Learn2Reg Jacobian determinant ``(I, J, K)``: the evaluator's cropped map, edge-padded back."""
    from dinoreg.metrics import CROP, jacobian_determinant

    detj = jacobian_determinant(disp)
    pad = [(CROP, CROP), (CROP, CROP), (0, 0) if disp.shape[2] == 1 else (CROP, CROP)]
    return np.pad(detj, pad, mode="edge")


def plane_names(affine: np.ndarray | None) -> list[str]:
    """Anatomical name of the slice held at each voxel axis (from the affine's orientation),
    e.g. ``["sagittal", "coronal", "axial"]`` for RAS; ``["i", "j", "k"]`` without an affine."""
    if affine is None:
        return ["i", "j", "k"]
    from nibabel.orientations import aff2axcodes

    return [_ANATOMY.get(code, "ijk"[n]) for n, code in enumerate(aff2axcodes(np.asarray(affine)))]


def _plane_axes(axis: int) -> tuple[int, int]:
    """The two in-plane axes of a slice taken along ``axis``, in index order."""
    a, b = [d for d in range(3) if d != axis]
    return a, b


# --------------------------------------------------------------------------- the figure

def _show(ax: Any, image: np.ndarray, aspect: float, **kwargs: Any) -> Any:
    ax.set_xticks([])
    ax.set_yticks([])
    return ax.imshow(image.T, origin="lower", aspect=aspect, interpolation="nearest", **kwargs)


def _draw_grid(ax: Any, background: np.ndarray, disp2d: np.ndarray, aspect: float, step: int) -> None:
    """Grid lines of ``p + u(p)`` in one plane; ``disp2d`` is ``(A, B, 2)`` (in-plane components)."""
    _show(ax, background, aspect, cmap="gray", vmin=0, vmax=1, alpha=0.45)
    na, nb = background.shape
    aa, bb = np.meshgrid(np.arange(na), np.arange(nb), indexing="ij")
    xa, xb = aa + disp2d[..., 0], bb + disp2d[..., 1]
    style = dict(color="#d62728", linewidth=0.6)
    for b in range(step // 2, nb, step):
        ax.plot(xa[:, b], xb[:, b], **style)
    for a in range(step // 2, na, step):
        ax.plot(xa[a, :], xb[a, :], **style)
    ax.set_xlim(-0.5, na - 0.5)
    ax.set_ylim(-0.5, nb - 0.5)


def qc_figure(fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray, disp: np.ndarray,
              path: str | os.PathLike, title: str | None = None,
              spacing: Sequence[float] = (1.0, 1.0, 1.0), affine: np.ndarray | None = None, grid_step: int | None = None, dpi: int = 80) -> Path:
    """Write the QC figure of one pair as a PNG (atomically).

    Args:
        fixed: ``(I, J, K)`` fixed image.
        moving: ``(I, J, K)`` moving image on the fixed grid (before registration).
        warped: ``(I, J, K)`` moving image warped by ``disp``.
        disp: ``(I, J, K, 3)`` Learn2Reg field (voxels of the fixed grid, pull-back).
        path: the PNG to write.
        title: figure title (e.g. the pair name); the fold fraction is appended.
        spacing: voxel size in mm (sets the aspect ratio of each panel).
        affine: the fixed affine, only to name the planes (axial/coronal/sagittal).
        grid_step: voxels between deformation-grid lines (default: about 24 lines per side).
        dpi: resolution (80 gives a ~1250x680 px figure).

    Returns:
        the written path.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from dinoreg.io.atomic import atomic_write

    f, m, w = window(fixed), window(moving), window(warped)
    disp = np.asarray(disp, dtype=np.float32)
    detj = full_size_jacobian(disp)
    step = grid_step or max(2, max(fixed.shape) // 24)
    fold_cmap = ListedColormap(["black"])
    fig, axes = plt.subplots(3, 6, figsize=(15.5, 8.4), dpi=dpi, squeeze=False)
    names = plane_names(affine)
    for row, axis in enumerate(PLANE_AXES):
        a, b = _plane_axes(axis)
        aspect = float(spacing[b]) / float(spacing[a])
        fs, ms, ws = (mid_slice(v, axis) for v in (f, m, w))
        for col, img in enumerate((fs, ms, ws, checkerboard(fs, ws))):
            _show(axes[row, col], img, aspect, cmap="gray", vmin=0, vmax=1)
        _draw_grid(axes[row, 4], fs, mid_slice(disp, axis)[..., [a, b]], aspect, step)
        js = mid_slice(detj, axis)
        im = _show(axes[row, 5], js, aspect, cmap="RdBu_r", vmin=0.0, vmax=2.0)
        folds = np.ma.masked_where(js > 0, np.ones_like(js))
        _show(axes[row, 5], folds, aspect, cmap=fold_cmap, vmin=0, vmax=1)
        fig.colorbar(im, ax=axes[row, 5], fraction=0.046, pad=0.02)
        axes[row, 0].set_ylabel(f"{names[axis]}\n({'ijk'[axis]} = {fixed.shape[axis] // 2})", fontsize=11)
        for col in range(6):
            axes[row, col].set_xlabel("ijk"[a], fontsize=8, labelpad=1)
    for col, name in enumerate(PANELS):
        axes[0, col].set_title(name, fontsize=11)
    folding = float((detj <= 0).mean())
    head = f"{title} — " if title else ""
    fig.suptitle(f"{head}|u| max {np.abs(disp).max():.1f} vox, detJ ≤ 0: {100 * folding:.3f} % (black)",
                 fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_write(out) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out
