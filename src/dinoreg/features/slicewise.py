"""Volumetric features from a 2D encoder, slice by slice (DINO-Reg Sec. 2.2).

Geometry (the patch-grid-to-voxel mapping). Let the volume be ``(I, J, K)`` and the slicing
axis ``a``; a slice is the 2D array of the two other axes in increasing order, ``(H, W)``
(e.g. ``a = 2``: ``H = I``, ``W = J``). Each slice is resized (bilinear, cell-centred,
``align_corners=False``) to exactly ``(14h, 14w)`` pixels with

    ``h = round(H * upsample / 14)``, ``w = round(W * upsample / 14)``  (at least 1),

so the patch grid ``h x w`` tiles the **whole** slice with no padding or cropping: feature
``y`` covers voxels ``[y * H / h, (y + 1) * H / h)`` and its centre sits at voxel coordinate
``(y + 0.5) * H / h - 0.5`` (likewise for ``x`` and ``W``). The effective upsampling is
``14h / H``, which may differ from ``upsample`` by the rounding. Along the slicing axis the
feature volume keeps one sample per image slice (feature ``s`` is slice ``s``). The result is a
cell-centred feature volume ``(C, I', J', K')`` over the image's field of view, the convention of
:mod:`dinoreg.features.base`: ``I' = I`` along the slicing axis and ``h``/``w`` elsewhere, and
``torch.nn.functional.interpolate(..., align_corners=False)`` maps it back to the image grid.

Only every ``every``-th slice is encoded (``0, every, 2*every, ...`` and always the last one);
features of the other slices are linear interpolations of the two neighbouring encoded slices.
The cls token of each encoded slice is kept, with its slice index, for slice matching
(:mod:`dinoreg.features.slice_match`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dinoreg.errors import DinoregError
from dinoreg.features.base import Encoder2D

FOREGROUND_LEVEL = 0.05  # grey level (of [0, 1]) above which a pixel counts as foreground


@dataclass
class SliceFeatures:
    """Result of :func:`encode_volume`.

    Attributes:
        features: ``(C, I', J', K')`` float32 feature volume (see module docstring).
        cls: ``(n, C)`` global token of each encoded slice, or None if the encoder has none.
        slice_indices: ``(n,)`` int64 voxel index along ``axis`` of each encoded slice.
        foreground: ``(n,)`` fraction of pixels brighter than :data:`FOREGROUND_LEVEL` in each
            encoded slice (used to ignore blank slices when matching).
        axis: the slicing axis of the image array.
        image_shape: ``(I, J, K)`` of the encoded volume.
        every: encoding stride along ``axis``.
    """

    features: torch.Tensor
    cls: torch.Tensor | None
    slice_indices: torch.Tensor
    foreground: torch.Tensor
    axis: int
    image_shape: tuple[int, int, int]
    every: int

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """``(I', J', K')`` of the feature volume."""
        return tuple(int(s) for s in self.features.shape[1:])  # type: ignore[return-value]


def default_slice_axis(affine: np.ndarray) -> int:
    """The array axis whose direction is closest to superior-inferior (axial slicing).

    ``affine`` maps ``(i, j, k, 1)`` to RAS mm; the axis whose unit column has the largest
    absolute S (third) component wins (first such axis on ties).
    """
    rot = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(rot, axis=0)
    norms[norms == 0] = 1.0
    return int(np.argmax(np.abs(rot[2]) / norms))


def patch_grid(height: int, width: int, upsample: float, patch: int) -> tuple[int, int]:
    """Patch grid ``(h, w)`` of an ``H x W`` slice upsampled by ``upsample`` (see module doc)."""
    if height * upsample < patch or width * upsample < patch:
        raise DinoregError(f"slice of {height}x{width} voxels upsampled x{upsample:g} is smaller "
                           f"than one {patch}x{patch} patch; increase --upsample")
    return max(1, round(height * upsample / patch)), max(1, round(width * upsample / patch))


def encoded_indices(n: int, every: int) -> list[int]:
    """Slices to encode: ``0, every, 2*every, ...`` plus the last slice ``n - 1``."""
    if every < 1:
        raise DinoregError(f"--every must be >= 1, got {every}")
    idx = list(range(0, n, every))
    return idx if idx[-1] == n - 1 else idx + [n - 1]


def feature_grid_shape(image_shape: tuple[int, int, int], axis: int, upsample: float,
                       patch: int = 14) -> tuple[int, int, int]:
    """``(I', J', K')`` that :func:`encode_volume` produces for these settings."""
    plane = [s for d, s in enumerate(image_shape) if d != axis]
    h, w = patch_grid(plane[0], plane[1], upsample, patch)
    out = [h, w]
    out.insert(axis, image_shape[axis])
    return tuple(out)  # type: ignore[return-value]


def _encode_batch(encoder: Encoder2D, slices: torch.Tensor, size: tuple[int, int]
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Grey ``(B, H, W)`` -> patch features ``(B, C, h, w)`` and cls ``(B, C)``."""
    grey = slices[:, None]
    shrink = size[0] < grey.shape[-2] or size[1] < grey.shape[-1]
    grey = F.interpolate(grey, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return encoder.forward(encoder.preprocess(grey))


def _fill_between(out: torch.Tensor, encoded: torch.Tensor, indices: list[int]) -> None:
    """Write every slice of ``out`` ``(C, N, h, w)`` (may be a strided view) by linear
    interpolation of ``encoded`` ``(n, C, h, w)`` taken at the sorted slice ``indices``."""
    for j, lo in enumerate(indices):
        out[:, lo].copy_(encoded[j])
        hi = indices[j + 1] if j + 1 < len(indices) else lo
        for s in range(lo + 1, hi):
            out[:, s].copy_(torch.lerp(encoded[j], encoded[j + 1], (s - lo) / (hi - lo)))


def encode_volume(volume: np.ndarray | torch.Tensor, encoder: Encoder2D, axis: int = 2, *,
                  upsample: float = 3.0, every: int = 3, batch_size: int = 8,
                  device: str | torch.device = "cpu", progress: bool = False,
                  grid: tuple[int, int] | None = None) -> SliceFeatures:
    """Encode a volume slice by slice with a 2D encoder.

    Args:
        volume: ``(I, J, K)`` intensities scaled to ``[0, 1]`` (already windowed/clipped).
        encoder: any :class:`~dinoreg.features.base.Encoder2D`; a ``torch.nn.Module`` encoder
            is moved to ``device``.
        axis: slicing axis of the array (see :func:`default_slice_axis`).
        upsample: in-plane upsampling before encoding (paper: 5.3; 3 is close in accuracy).
        every: encode every ``every``-th slice (and the last), interpolate the others.
        batch_size: slices per forward pass.
        device: ``"cpu"`` or ``"cuda"``; the returned tensors live there.
        progress: show a tqdm bar over batches.
        grid: a fixed ``(h, w)`` patch grid for every slice instead of the one ``upsample``
            gives (each slice is resized to ``(14h, 14w)`` pixels whatever its aspect).

    Returns:
        :class:`SliceFeatures` with the ``(C, I', J', K')`` volume described in the module
        docstring.
    """
    vol = torch.as_tensor(np.asarray(volume) if not torch.is_tensor(volume) else volume)
    if vol.ndim != 3:
        raise DinoregError(f"encode_volume expects a 3D volume, got shape {tuple(vol.shape)}")
    if axis not in (0, 1, 2):
        raise DinoregError(f"slicing axis must be 0, 1 or 2, got {axis}")
    device = torch.device(device)
    if isinstance(encoder, torch.nn.Module):
        encoder.to(device)
    slices = vol.to(torch.float32).movedim(axis, 0)  # (N, H, W)
    n, height, width = slices.shape
    h, w = patch_grid(height, width, upsample, encoder.patch_size) if grid is None else grid
    size = (h * encoder.patch_size, w * encoder.patch_size)
    indices = encoded_indices(n, every)
    feats, tokens = [], []
    with torch.inference_mode():
        for start in tqdm(range(0, len(indices), batch_size), disable=not progress,
                          desc=f"{encoder.name} x{upsample:g}/{every}", unit="batch"):
            batch = slices[indices[start:start + batch_size]].to(device)
            patches, cls = _encode_batch(encoder, batch, size)
            if tuple(patches.shape[-2:]) != (h, w):  # encoders that squash slices to a fixed square (SAM)
                patches = F.interpolate(patches, size=(h, w), mode="bilinear", align_corners=False,
                                        antialias=patches.shape[-2] > h or patches.shape[-1] > w)
            feats.append(patches.float())
            tokens.append(None if cls is None else cls.float())
        encoded = torch.cat(feats)
        del feats
        grid = [h, w]
        grid.insert(axis, n)
        out = torch.empty((encoded.shape[1], *grid), dtype=torch.float32, device=device)
        _fill_between(out.movedim(axis + 1, 1), encoded, indices)
    picked = slices[indices].flatten(1)
    return SliceFeatures(
        features=out,
        cls=None if tokens[0] is None else torch.cat(tokens),
        slice_indices=torch.tensor(indices, dtype=torch.int64),
        foreground=(picked > FOREGROUND_LEVEL).float().mean(1),
        axis=axis, image_shape=tuple(int(s) for s in vol.shape), every=every)
