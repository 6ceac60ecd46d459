"""Trilinear interpolation at single points inside numba kernels (serial helpers, border padding).

The fused CPU kernels that read an image or a coarse field at scattered points (the MI level's
samples, the edge alignment's neighbours) share these; ``grid_sample`` (``dinoreg.spatial.grid``)
is their torch counterpart. Coordinates are voxels of the array read (index space, voxel centres
at integers); an axis of one voxel (a 2D image's flat axis) has fraction 0.
"""

from __future__ import annotations

import numpy as np

from dinoreg.jit import helper


@helper
def axis_cell(x: float, n: int) -> tuple[int, float, float]:
    """Lower index, fraction and inside flag (1: not clamped) of coordinate ``x`` on an axis of
    ``n`` voxels, border-clamped; an axis of one voxel has fraction 0 and flag 0."""
    if n == 1:
        return 0, 0.0, 0.0
    inside = 1.0 if 0.0 <= x <= n - 1.0 else 0.0
    x = min(max(x, 0.0), n - 1.0)
    i0 = min(int(x), n - 2)
    return i0, x - i0, inside


@helper
def upper(i0: int, n: int) -> int:
    """The upper neighbour of index ``i0`` on an axis of ``n`` voxels (``i0`` itself when ``n`` is 1)."""
    return i0 + 1 if n > 1 else i0


@helper
def trilinear_with_gradient(volume: np.ndarray, x: float, y: float, z: float) -> tuple[float, float, float, float]:
    """Trilinear value of ``volume`` ``(I, J, K)`` at ``(x, y, z)`` voxels (border padding) and its
    derivatives along the three axes (0 along a clamped axis, as ``grid_sample`` under autograd)."""
    h, w, d = volume.shape
    x0, fx, ix = axis_cell(x, h)
    y0, fy, iy = axis_cell(y, w)
    z0, fz, iz = axis_cell(z, d)
    x1, y1, z1 = upper(x0, h), upper(y0, w), upper(z0, d)
    gx, gy, gz = 1.0 - fx, 1.0 - fy, 1.0 - fz
    a000, a001 = volume[x0, y0, z0], volume[x0, y0, z1]
    a010, a011 = volume[x0, y1, z0], volume[x0, y1, z1]
    a100, a101 = volume[x1, y0, z0], volume[x1, y0, z1]
    a110, a111 = volume[x1, y1, z0], volume[x1, y1, z1]
    low = gy * (gz * a000 + fz * a001) + fy * (gz * a010 + fz * a011)
    high = gy * (gz * a100 + fz * a101) + fy * (gz * a110 + fz * a111)
    dj = gx * (gz * (a010 - a000) + fz * (a011 - a001)) + fx * (gz * (a110 - a100) + fz * (a111 - a101))
    dk = gx * (gy * (a001 - a000) + fy * (a011 - a010)) + fx * (gy * (a101 - a100) + fy * (a111 - a110))
    return gx * low + fx * high, (high - low) * ix, dj * iy, dk * iz


@helper
def trilinear(volume: np.ndarray, x: float, y: float, z: float) -> float:
    """Trilinear value of ``volume`` ``(I, J, K)`` at ``(x, y, z)`` voxels, border padding."""
    h, w, d = volume.shape
    x0, fx, _ = axis_cell(x, h)
    y0, fy, _ = axis_cell(y, w)
    z0, fz, _ = axis_cell(z, d)
    return lerp3(volume, x0, upper(x0, h), y0, upper(y0, w), z0, upper(z0, d), fx, fy, fz)


@helper
def lerp3(v: np.ndarray, x0: int, x1: int, y0: int, y1: int, z0: int, z1: int, fx: float, fy: float,
          fz: float) -> float:
    """Trilinear blend of the eight corners of one cell of ``v`` ``(h, w, d)``."""
    low = (1 - fy) * ((1 - fz) * v[x0, y0, z0] + fz * v[x0, y0, z1]) + fy * ((1 - fz) * v[x0, y1, z0] + fz * v[x0, y1, z1])
    high = (1 - fy) * ((1 - fz) * v[x1, y0, z0] + fz * v[x1, y0, z1]) + fy * ((1 - fz) * v[x1, y1, z0] + fz * v[x1, y1, z1])
    return (1 - fx) * low + fx * high


@helper
def cell_corners(i: int, j: int, k: int, cells: np.ndarray, h: int, w: int, d: int
                 ) -> tuple[int, int, int, int, int, int, float, float, float]:
    """Where voxel ``(i, j, k)`` falls on a grid of ``(h, w, d)`` cells of ``cells`` voxels
    (cell-centred, border-clamped): the lower and upper corner indices ``x0, x1, y0, y1, z0, z1``
    and the fractions ``fx, fy, fz`` (the weights :func:`lerp3` takes)."""
    x0, fx, _ = axis_cell((i + 0.5) / cells[0] - 0.5, h)
    y0, fy, _ = axis_cell((j + 0.5) / cells[1] - 0.5, w)
    z0, fz, _ = axis_cell((k + 0.5) / cells[2] - 0.5, d)
    return x0, upper(x0, h), y0, upper(y0, w), z0, upper(z0, d), fx, fy, fz


@helper
def cell_field_at(coarse: np.ndarray, cells: np.ndarray, i: int, j: int, k: int) -> tuple[float, float, float]:
    """A field ``coarse`` ``(3, h, w, d)`` in cells of ``cells`` voxels at voxel ``(i, j, k)``, in
    voxels (trilinear, cell-centred, border-clamped: what ``field_from_cells`` upsamples to)."""
    x0, x1, y0, y1, z0, z1, fx, fy, fz = cell_corners(i, j, k, cells, coarse.shape[1], coarse.shape[2],
                                                      coarse.shape[3])
    return (lerp3(coarse[0], x0, x1, y0, y1, z0, z1, fx, fy, fz) * cells[0],
            lerp3(coarse[1], x0, x1, y0, y1, z0, z1, fx, fy, fz) * cells[1],
            lerp3(coarse[2], x0, x1, y0, y1, z0, z1, fx, fy, fz) * cells[2])
