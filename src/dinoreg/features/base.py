"""The interfaces every encoder implements.

Two kinds of encoder exist:

* :class:`Encoder2D` - a frozen 2D network (DINOv2, SAM, LiteMedSAM) applied to slices.
  ``preprocess`` turns grey slices ``(B, 1, H, W)`` scaled to ``[0, 1]`` into the network's input
  ``(B, 3, H', W')`` (channel repeat, normalisation, any size constraint), and ``forward`` returns
  patch features ``(B, C, h, w)`` plus a global token ``(B, C)`` (``None`` when the network has
  none). Patch ``(y, x)`` covers input pixels ``[y*s, (y+1)*s) x [x*s, (x+1)*s)`` with
  ``s = patch_size`` (cell-centred alignment).
* A volumetric encoder - ``encode(volume) -> (C, I', J', K')``: a feature volume covering the
  same field of view as the ``(I, J, K)`` input, cell-centred (feature voxel ``a`` along an axis
  of ``n`` covers input ``[a*I/n, (a+1)*I/n)``). MIND returns features on the image grid itself.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from dinoreg.errors import DinoregError


@runtime_checkable
class Encoder2D(Protocol):
    """A frozen 2D image encoder (see module docstring for layouts)."""

    name: str
    patch_size: int
    embed_dim: int

    def preprocess(self, grey: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` in ``[0, 1]`` -> network input ``(B, 3, H', W')``."""
        ...

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Network input -> ``(patch features (B, C, h, w), global token (B, C) or None)``."""
        ...


def square_rgb(grey: torch.Tensor, size: int, name: str) -> torch.Tensor:
    """Grey slices ``(B, 1, H, W)`` resized to ``size x size`` (bilinear, anti-aliased when
    shrinking) and repeated to 3 channels: the input of the SAM-family encoders."""
    if grey.ndim != 4 or grey.shape[1] != 1:
        raise DinoregError(f"{name} expects grey slices (B, 1, H, W), got {tuple(grey.shape)}")
    if tuple(grey.shape[2:]) != (size, size):
        shrink = grey.shape[2] > size or grey.shape[3] > size
        grey = F.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return grey.expand(-1, 3, -1, -1)
