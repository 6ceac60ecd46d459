"""Export dinoreg displacement fields to ITK / ANTs / 3D Slicer and to world millimetres.

dinoreg's field ``u`` is ``(I, J, K, 3)`` in voxels of the fixed grid, components ``(i, j, k)``,
pull-back: fixed voxel ``p`` looks up the moving image at world point ``A_f (p + u(p))`` (``A_f``
the fixed affine, voxel -> RAS mm), whatever the moving image's own grid. In world terms the
transform is ``x -> x + A_f[:3, :3] u(A_f^-1 x)``, so it can be written without the moving image:

* ``itk`` / ``ants`` (the same file; ANTs uses ITK's convention for its forward ``*Warp.nii.gz``):
  a 3-component vector image on the fixed image's physical grid (LPS: ITK's origin, spacing and
  direction), vectors in **LPS millimetres**, such that the fixed physical point ``x`` maps to the
  moving physical point ``x + d(x)``. That is ITK's ``DisplacementFieldTransform``:
  ``sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field))``,
  ``antsApplyTransforms -d 3 -i moving -r fixed -t field.nii.gz -o warped.nii.gz`` and 3D Slicer
  (load as a transform) all warp the moving image onto the fixed one. Written with SimpleITK:
  ``.nii``/``.nii.gz`` (ITK writes a 5D NIfTI, ``dim[5] = 3``, intent code 1007 "vector", as
  ANTs writes its own warps), ``.mha`` or ``.nrrd`` (single files, so the rename is atomic).
* ``mm``: ``(I, J, K, 3)`` NIfTI with the fixed affine, vectors in **RAS millimetres**:
  ``d(p) = A_f[:3, :3] u(p)``, so fixed voxel ``p`` maps to the RAS point ``A_f p + d(p)``
  (nibabel-friendly; *not* an ITK transform, whose vectors are LPS).

``inverse``: the inverse of the mapping, sampled on the *fixed* grid (the only grid the field
defines): ``v`` with ``v(x) = -u(x + v(x))`` (fixed-point iteration), in fixed voxels. In world
terms it maps a moving-space point back to the fixed-space point that lands on it, so it
warps the fixed image onto the moving image (``-r moving`` in ANTs), but only where that point
lies inside the fixed field of view; this holds whatever the moving grid, because both fields
live in the one world coordinate system and only the fixed grid indexes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dinoreg.errors import DinoregError
from dinoreg.io.atomic import atomic_write, check_output_file
from dinoreg.io.images import LPS_TO_RAS, Image, load_image

FORMATS = ("itk", "ants", "mm")
ITK_FIELD_SUFFIXES = (".nii", ".nii.gz", ".mha", ".nrrd")  # single-file formats (atomic rename)
MM_SUFFIXES = (".nii", ".nii.gz")


# --------------------------------------------------------------------------- conversions

def field_to_ras_mm(disp: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel field ``(I, J, K, 3)`` of the grid ``affine`` -> displacement in RAS mm (float32).

    ``d(p) = affine[:3, :3] @ u(p)``: voxel ``p`` maps to the RAS point ``affine @ p + d(p)``.
    """
    lin = np.asarray(affine, dtype=np.float64)[:3, :3]
    return np.einsum("ab,...b->...a", lin, np.asarray(disp, dtype=np.float64)).astype(np.float32)


def field_to_lps_mm(disp: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel field -> displacement in LPS mm (ITK's physical space), ``(I, J, K, 3)`` float32."""
    lin = (LPS_TO_RAS[:3, :3] @ np.asarray(affine, dtype=np.float64)[:3, :3])
    return np.einsum("ab,...b->...a", lin, np.asarray(disp, dtype=np.float64)).astype(np.float32)


def itk_geometry(affine: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """ITK ``(spacing, origin, direction)`` (LPS) of a grid with the RAS ``affine``."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing[None, :]
    return ([float(s) for s in spacing], [float(o) for o in lps[:3, 3]],
            [float(d) for d in direction.ravel()])


def field_to_itk(disp: np.ndarray, affine: np.ndarray) -> Any:
    """A SimpleITK vector image (float32, 3 components, LPS mm) on the grid ``affine``:
    ITK's displacement field for dinoreg's voxel field ``disp`` (see the module docstring)."""
    import SimpleITK as sitk

    lps = field_to_lps_mm(disp, affine)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(lps, (2, 1, 0, 3))), isVector=True)
    spacing, origin, direction = itk_geometry(affine)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


# --------------------------------------------------------------------------- inverse

@dataclass
class InverseResidual:
    """How well ``v`` inverts ``u`` (voxels), over the voxels whose composed point stays inside
    the grid (and the mask, if any):

    * ``max``, ``mean``: ``|u(x + v(x)) + v(x)|``, the equation the iteration solves
      (``x -> x + v`` then ``u``: the identity);
    * ``max_other``, ``mean_other``: ``|v(x + u(x)) + u(x)|``, the other composition, an
      independent check (the iteration never looks at it).
    """

    max: float
    mean: float
    max_other: float
    mean_other: float
    inside: int
    total: int
    iterations: int = 0

    def line(self) -> str:
        its = f", {self.iterations} iterations" if self.iterations else ""
        return (f"inverse residual (voxels): |u(x+v(x)) + v(x)| max {self.max:.3g} mean {self.mean:.3g}; "
                f"|v(x+u(x)) + u(x)| max {self.max_other:.3g} mean {self.mean_other:.3g} "
                f"({self.inside} of {self.total} voxels{its})")


def _sample(disp_t: Any, coords_disp_t: Any) -> Any:
    from dinoreg.spatial.grid import warp as warp_tensor

    return warp_tensor(disp_t, coords_disp_t, mode="bilinear", padding_mode="border")


def _composition_error(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """``|a(x + b(x)) + b(x)|`` and whether ``x + b(x)`` is inside the grid."""
    import torch

    from dinoreg.spatial.grid import identity_grid

    err = (_sample(a, b) + b).norm(dim=1)[0].numpy()
    shape = tuple(b.shape[2:])
    pos = (identity_grid(shape, dtype=torch.float64) + b)[0].numpy()
    inside = np.ones(shape, dtype=bool)
    for axis, size in enumerate(shape):
        inside &= (pos[axis] >= 0) & (pos[axis] <= size - 1)
    return err, inside


def inverse_residual(disp: np.ndarray, inv: np.ndarray, mask: np.ndarray | None = None,
                     iterations: int = 0) -> InverseResidual:
    """Residuals of ``inv`` as the inverse of ``disp`` (both voxel fields on one grid)."""
    from dinoreg.spatial.grid import field_from_numpy

    u = field_from_numpy(disp).double()
    v = field_from_numpy(inv).double()
    err, inside = _composition_error(u, v)
    err_o, inside_o = _composition_error(v, u)
    inside &= inside_o
    if mask is not None:
        inside &= np.asarray(mask) > 0
    a, b = err[inside], err_o[inside]
    nan = float("nan")
    return InverseResidual(float(a.max()) if a.size else nan, float(a.mean()) if a.size else nan,
                           float(b.max()) if b.size else nan, float(b.mean()) if b.size else nan,
                           int(inside.sum()), int(inside.size), iterations)


def invert_field(disp: np.ndarray, iterations: int = 100, tol: float = 1e-4,
                 mask: np.ndarray | None = None) -> tuple[np.ndarray, InverseResidual]:
    """Inverse of a voxel field on its own grid by fixed-point iteration ``v <- -u(x + v)``.

    Converges where ``x + u(x)`` is invertible with ``|grad u| < 1`` (the iteration is then a
    contraction); ``u`` is sampled trilinearly, clamped at the border.

    Args:
        disp: ``(I, J, K, 3)`` voxel field ``u``.
        iterations: maximum number of iterations.
        tol: stop when no vector changes by more than ``tol`` voxels.
        mask: restricts the reported residual (not the computation) to a region.

    Returns:
        ``(v, residual)``: ``v`` ``(I, J, K, 3)`` float32 with ``x + v(x)`` the inverse of
        ``x + u(x)``, and its :class:`InverseResidual`.
    """
    from dinoreg.spatial.grid import field_from_numpy, field_to_numpy

    u = field_from_numpy(disp).double()
    v = -u
    done = 0
    for done in range(1, iterations + 1):
        new = -_sample(u, v)
        change = float((new - v).abs().max())
        v = new
        if change < tol:
            break
    inv = field_to_numpy(v).astype(np.float32)
    return inv, inverse_residual(np.asarray(disp, np.float32), inv, mask, done)


# --------------------------------------------------------------------------- writing

@dataclass
class ExportResult:
    """What :func:`export_field` wrote."""

    path: Path
    to: str
    inverse: bool
    residual: InverseResidual | None = None
    notes: list[str] = field(default_factory=list)


def _load_inputs(disp: Any, fixed: Any, moving: Any) -> tuple[Image, Image, Image | None]:
    from dinoreg.io.fields import as_field, field_grid
    from dinoreg.io.images import as_image

    field_img = as_field(disp)
    fixed_img = load_image(fixed) if isinstance(fixed, (str, os.PathLike)) else as_image(fixed, "fixed")
    field_grid(field_img, fixed_img)  # the same grid, or an error naming both
    moving_img = None
    if moving is not None:
        moving_img = load_image(moving) if isinstance(moving, (str, os.PathLike)) else as_image(moving, "moving")
    return field_img, fixed_img, moving_img


def outside_moving_fraction(disp: np.ndarray, fixed_affine: np.ndarray, moving: Image) -> float:
    """Fraction of fixed voxels whose mapped point falls outside the moving image's grid."""
    shape = disp.shape[:3]
    idx = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)
    pts = idx + disp
    to_moving = np.linalg.inv(moving.affine) @ np.asarray(fixed_affine, dtype=np.float64)
    q = pts @ to_moving[:3, :3].T + to_moving[:3, 3]
    inside = np.ones(shape, dtype=bool)
    for a, s in enumerate(moving.shape):
        inside &= (q[..., a] >= -0.5) & (q[..., a] <= s - 0.5)
    return float(1.0 - inside.mean())


def export_field(disp: Any, fixed: Any, output: str | os.PathLike, to: str = "itk", *, moving: Any = None,
                 inverse: bool = False, iterations: int = 100, tol: float = 1e-4) -> ExportResult:
    """Write dinoreg's voxel field as an ITK/ANTs displacement field or a RAS-mm field.

    Args:
        disp: the field (path, :class:`Image` or ``(I, J, K, 3)`` array), voxels of the fixed grid.
        fixed: the fixed image (path or image); its grid (shape and affine) defines the output.
        output: the file to write (``.nii.gz``/``.mha``/... for ``itk``/``ants``, NIfTI for ``mm``).
        to: ``itk``, ``ants`` (the same file) or ``mm``.
        moving: optional moving image; only checked (readable) and used to report how much of
            the fixed grid maps outside it.
        inverse: write the inverse mapping instead (see the module docstring).
        iterations, tol: fixed-point iteration of the inverse.

    Returns:
        an :class:`ExportResult` (path, and the inverse residual with ``inverse``).

    Raises:
        DinoregError: before anything is written, for a missing or unreadable file, a field that
            is not ``(I, J, K, 3)``, holds NaN/Inf or does not match ``fixed``'s grid, an unknown
            ``to``, a wrong suffix or an unwritable destination.
    """
    to = str(to).lower()
    if to not in FORMATS:
        raise DinoregError(f"unknown export format {to!r} (choose {', '.join(FORMATS)})", "--to")
    if int(iterations) < 1:
        raise DinoregError(f"must be >= 1, got {iterations}", "--iterations")
    out = check_output_file(output, MM_SUFFIXES if to == "mm" else ITK_FIELD_SUFFIXES, f"--to {to} output")
    field_img, fixed_img, moving_img = _load_inputs(disp, fixed, moving)
    result = ExportResult(out, to, inverse)
    affine = fixed_img.affine
    if isinstance(disp, (str, os.PathLike)) and not np.allclose(field_img.affine, affine, atol=1e-3):
        result.notes.append("the field file's affine differs from the fixed image's; the fixed image's is used")
    array = field_img.array.astype(np.float32)
    if moving_img is not None:
        frac = outside_moving_fraction(array, affine, moving_img)
        result.notes.append(f"{100 * frac:.1f}% of the fixed grid maps outside the moving image")
    if inverse:
        array, result.residual = invert_field(array, iterations=iterations, tol=tol)
    try:
        with atomic_write(out) as tmp:
            if to == "mm":
                import nibabel as nib

                img = nib.Nifti1Image(field_to_ras_mm(array, affine), np.asarray(affine, dtype=np.float64))
                img.header.set_xyzt_units("mm")
                nib.save(img, str(tmp))
            else:
                import SimpleITK as sitk

                sitk.WriteImage(field_to_itk(array, affine), str(tmp))
    except DinoregError:
        raise
    except OSError as exc:
        raise DinoregError(f"cannot write ({exc.strerror or exc})", out) from exc
    except Exception as exc:
        raise DinoregError(f"cannot write ({type(exc).__name__}: {exc})", out) from exc
    return result
