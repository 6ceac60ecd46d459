"""Cubic B-spline free-form deformations (FFD) in 2D and 3D.

Control lattice (per axis, spacing ``s`` voxels, image size ``n``):

* control point ``c`` sits at voxel position ``(c - 1) * s``; there is one control point before
  voxel 0 and enough after voxel ``n - 1`` that every voxel has its full 4-point support, so the
  lattice has ``floor((n - 1) / s) + 4`` points along the axis;
* the dense displacement at voxel ``x`` is ``sum_c phi_c * B3(x / s - (c - 1))`` with the
  cubic B-spline ``B3`` (support ``|t| < 2``, ``B3(0) = 2/3``, ``B3(+-1) = 1/6``), applied
  separably along every axis.

Layouts: control displacements are ``(N, D, *ctrl_shape)``, dense fields ``(N, D, *shape)``,
both in **voxel units** of the grid the lattice was built for, components ordered ``(i, j, k)``
(the same pull-back convention as :mod:`dinoreg.spatial.grid`). ``s`` may be fractional, which
is how a spacing in millimetres is honoured (see :func:`spacing_from_mm`).

Evaluation uses one small basis matrix ``(n, n_ctrl)`` per axis, contracted with the control
tensor one axis at a time: exact, differentiable and cheap (no ``grid_sample``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from dinoreg.errors import DinoregError

Spacing = float | Sequence[float]


def cubic_bspline(t: torch.Tensor) -> torch.Tensor:
    """Uniform cubic B-spline kernel ``B3(t)`` (dimensionless), zero for ``|t| >= 2``."""
    a = t.abs()
    inner = (4.0 - 6.0 * a**2 + 3.0 * a**3) / 6.0
    outer = (2.0 - a).clamp_min(0.0) ** 3 / 6.0
    return torch.where(a < 1.0, inner, outer)


def _per_axis(spacing: Spacing, ndim: int) -> tuple[float, ...]:
    values = (float(spacing),) * ndim if isinstance(spacing, (int, float)) else tuple(float(s) for s in spacing)
    if len(values) != ndim or any(not math.isfinite(s) or s <= 0 for s in values):
        raise DinoregError(f"grid spacing must be {ndim} positive numbers (voxels), got {spacing!r}")
    return values


def control_shape(shape: Sequence[int], spacing: Spacing) -> tuple[int, ...]:
    """Number of control points per axis covering an image of ``shape`` voxels with
    control spacing ``spacing`` (voxels, scalar or per axis)."""
    steps = _per_axis(spacing, len(shape))
    return tuple(int(math.floor((int(n) - 1) / s + 1e-9)) + 4 for n, s in zip(shape, steps))


def spacing_from_mm(spacing_mm: Spacing, voxel_size_mm: Sequence[float]) -> tuple[float, ...]:
    """Control spacing in voxels from a spacing in millimetres and the image voxel size (mm)."""
    mm = _per_axis(spacing_mm, len(voxel_size_mm))
    return tuple(m / float(v) for m, v in zip(mm, voxel_size_mm))


def bspline_basis(n: int, spacing: float, n_ctrl: int, n_out: int | None = None,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Basis matrix ``(n_out, n_ctrl)`` along one axis.

    Row ``x`` holds the weights of the control points for output voxel ``x``. When ``n_out``
    differs from ``n`` (a coarser or finer grid over the same field of view) output voxel ``x``
    is placed at lattice-grid position ``x * (n - 1) / (n_out - 1)`` (corner-aligned, as
    ``grid_sample(align_corners=True)``).
    """
    n_out = n if n_out is None else int(n_out)
    scale = (n - 1) / max(n_out - 1, 1) if n_out != n else 1.0
    x = torch.arange(n_out, device=device, dtype=torch.float64) * scale
    c = torch.arange(n_ctrl, device=device, dtype=torch.float64)
    return cubic_bspline(x[:, None] / spacing - (c[None, :] - 1.0)).to(dtype)


def bspline_field(control: torch.Tensor, shape: Sequence[int], spacing: Spacing,
                  out_shape: Sequence[int] | None = None) -> torch.Tensor:
    """Dense displacement ``(N, D, *out_shape)`` from control displacements ``(N, D, *ctrl)``.

    Args:
        control: control-point displacements in voxels of ``shape``; ``ctrl`` must equal
            :func:`control_shape` ``(shape, spacing)``.
        shape: the image grid the lattice was built for (2 or 3 axes).
        spacing: control spacing in voxels of ``shape`` (scalar or per axis, may be fractional).
        out_shape: grid to evaluate on (same field of view, corner-aligned); the returned
            vectors are rescaled to voxel units of ``out_shape``. Defaults to ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    out_shape = shape if out_shape is None else tuple(int(s) for s in out_shape)
    ndim = len(shape)
    steps = _per_axis(spacing, ndim)
    expected = control_shape(shape, steps)
    if control.ndim != ndim + 2 or tuple(control.shape[2:]) != expected or len(out_shape) != ndim:
        raise DinoregError(f"control lattice {tuple(control.shape)} does not fit image {shape} "
                           f"at spacing {steps}: expected (N, D, *{expected})")
    field = control
    for axis in range(ndim):
        basis = bspline_basis(shape[axis], steps[axis], expected[axis], out_shape[axis],
                              control.device, control.dtype)
        field = torch.movedim(torch.tensordot(field, basis, dims=([2 + axis], [1])), -1, 2 + axis)
    if out_shape != shape:
        ratio = [(o - 1) / max(s - 1, 1) for o, s in zip(out_shape, shape)]
        field = field * torch.tensor(ratio, dtype=field.dtype, device=field.device).view(1, ndim, *[1] * ndim)
    return field
