"""Voxel grids, the one place where voxel coordinates become ``grid_sample`` coordinates.

Conventions (see DESIGN.md):

* Tensors are ``(N, C, I, J, K)``; a displacement field is ``(N, 3, I, J, K)`` in **voxel units**
  with components ordered ``(i, j, k)``, used as a pull-back:
  ``warped(p) = moving(p + u(p))``.
* ``torch.nn.functional.grid_sample`` wants coordinates ``(k, j, i)`` normalised to ``[-1, 1]``
  with ``align_corners=True`` (voxel 0 -> -1, voxel n-1 -> +1). :func:`voxel_to_grid_sample`
  is the only function in dinoreg that performs that flip and normalisation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def identity_grid(shape: tuple[int, ...], device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Voxel coordinates of a grid: ``(1, D, *shape)`` with ``D = len(shape)``, in ``(i, j, k)`` order."""
    axes = [torch.arange(s, device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), 0).unsqueeze(0)


def voxel_to_grid_sample(coords: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Convert voxel coordinates ``(N, D, *spatial)`` of a source grid of size ``shape`` to the
    ``(N, *spatial, D)`` normalised, axis-reversed layout ``grid_sample`` expects
    (``align_corners=True``)."""
    ndim = coords.shape[1]
    scale = _grid_scale(shape, coords)
    if _tracks_grad(coords):
        norm = coords * scale.view(1, ndim, *([1] * ndim)) - 1.0
        return norm.flip(1).permute(0, *range(2, ndim + 2), 1)
    grid = coords.new_empty((coords.shape[0], *coords.shape[2:], ndim))
    for axis in range(ndim):  # written straight into the flipped layout: one array, no copies
        channel = grid[..., ndim - 1 - axis]
        torch.mul(coords[:, axis], scale[axis], out=channel)
        channel.sub_(1.0)
    return grid


def _grid_scale(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """``2 / (n - 1)`` per axis of a source grid of ``shape`` (``(D,)``, ``like``'s dtype and device)."""
    sizes = torch.tensor([max(int(s) - 1, 1) for s in shape], device=like.device, dtype=like.dtype)
    return 2.0 / sizes


def _tracks_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _displaced_grid(disp: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """:func:`voxel_to_grid_sample` of ``identity + disp`` (``disp``: ``(N, D, *spatial)``), built
    channel by channel with the same float operations, without the identity and coordinate
    arrays (five field-sized temporaries for a 3D warp)."""
    ndim = disp.shape[1]
    scale = _grid_scale(shape, disp)
    grid = disp.new_empty((disp.shape[0], *disp.shape[2:], ndim))
    for axis in range(ndim):
        index_shape = [1] * ndim
        index_shape[axis] = disp.shape[2 + axis]
        index = torch.arange(disp.shape[2 + axis], device=disp.device, dtype=disp.dtype).view(index_shape)
        channel = grid[..., ndim - 1 - axis]
        torch.add(index, disp[:, axis], out=channel)
        channel.mul_(scale[axis]).sub_(1.0)
    return grid


def sample(volume: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear",
           padding_mode: str = "border") -> torch.Tensor:
    """Sample ``volume`` ``(N, C, *src_shape)`` at voxel coordinates ``coords`` ``(N, D, *out_shape)``.

    ``mode`` is ``bilinear`` (trilinear in 3D) or ``nearest``. Returns ``(N, C, *out_shape)``.
    """
    src_shape = tuple(volume.shape[2:])
    return _grid_sample(volume, voxel_to_grid_sample(coords.to(volume.dtype), src_shape), mode, padding_mode)


def _grid_sample(volume: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    if grid.shape[0] == 1 and volume.shape[0] > 1:
        grid = grid.expand(volume.shape[0], *grid.shape[1:])
    return F.grid_sample(volume, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def warp(volume: torch.Tensor, disp: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "border") -> torch.Tensor:
    """Pull-back warp: ``out(p) = volume(p + disp(p))``.

    Args:
        volume: ``(N, C, I, J, K)`` (or ``(N, C, I, J)`` in 2D) on the grid the field indexes.
        disp: ``(N, 3, I', J', K')`` displacement in voxels of ``volume``'s grid; the output
            has the field's spatial shape.
        mode: ``bilinear`` for intensities/features, ``nearest`` for labels.
    """
    if _tracks_grad(disp) or disp.dtype != volume.dtype:
        coords = identity_grid(tuple(disp.shape[2:]), disp.device, disp.dtype) + disp
        return sample(volume, coords, mode=mode, padding_mode=padding_mode)
    return _grid_sample(volume, _displaced_grid(disp, tuple(volume.shape[2:])), mode, padding_mode)


def resize_field(disp: torch.Tensor, shape: tuple[int, ...], align_corners: bool = False) -> torch.Tensor:
    """Resample a displacement field to another grid covering the same field of view.

    The field is interpolated (trilinear, cell-centred by default) and its vectors scaled by
    the ratio of grid sizes, so that it stays in voxel units of the new grid.
    """
    if tuple(disp.shape[2:]) == tuple(shape):
        return disp
    out, scale = interpolate_field(disp, shape, align_corners)
    return out.mul_(scale)  # in place (autograd allows it: interpolation keeps no output): no second full-size field


def interpolate_field(disp: torch.Tensor, shape: tuple[int, ...], align_corners: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`resize_field` in two parts: the field interpolated onto ``shape`` with its vectors
    still in the old grid's voxels, and the per-component factor ``(1, C, 1, ...)`` that brings
    them to the new grid's (a caller that crops the result scales only what it keeps)."""
    src = tuple(disp.shape[2:])
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    out = F.interpolate(disp, size=tuple(shape), mode=mode, align_corners=align_corners)
    if align_corners:
        scale = [(n - 1) / max(s - 1, 1) for n, s in zip(shape, src)]
    else:
        scale = [n / s for n, s in zip(shape, src)]
    return out, torch.tensor(scale, dtype=out.dtype, device=out.device).view(1, -1, *([1] * len(shape)))


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Field of ``x -> second(first)``: apply ``first`` then look up ``second``.

    For pull-back fields: warping by the result equals warping by ``second`` then by ``first``,
    i.e. ``u(p) = first(p) + second(p + first(p))``.
    """
    return first + warp(second, first, mode="bilinear", padding_mode="border")


def flat_field(field: torch.Tensor) -> np.ndarray:
    """A field ``(1, 3, I, J, K)`` as a float32 numpy view ``(3, I*J*K)`` (components, C-order voxels)."""
    return field[0].detach().cpu().float().reshape(3, -1).numpy()


def field_to_numpy(disp: torch.Tensor):
    """``(1, 3, I, J, K)`` tensor -> ``(I, J, K, 3)`` float32 numpy array (Learn2Reg layout)."""
    return disp[0].detach().permute(*range(1, disp.ndim - 1), 0).cpu().float().numpy()


def field_from_numpy(array, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(I, J, K, 3)`` numpy array -> ``(1, 3, I, J, K)`` float32 tensor."""
    t = torch.as_tensor(array, dtype=torch.float32, device=device)
    return t.permute(t.ndim - 1, *range(t.ndim - 1)).unsqueeze(0).contiguous()
