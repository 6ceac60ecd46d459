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

Encoders reach registrations through :mod:`dinoreg.features.registry`; this module holds the
types they share: their settings (:class:`EncoderSpec`, :class:`SlicewiseSpec`), what a pair
encoder receives (:class:`EncodeRequest`) and returns (:class:`PairFeatures`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from dinoreg.errors import DinoregError
from dinoreg.progress import Progress
from dinoreg.spec import Spec, setting


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


# --------------------------------------------------------------------------- what every encoder takes and gives

@dataclass(frozen=True)
class EncoderSpec(Spec):
    """Settings of one encoder; each encoder module subclasses it with its own fields."""


@dataclass(frozen=True)
class SlicewiseSpec(EncoderSpec):
    """Settings every 2D encoder shares when it is lifted to volumes slice by slice
    (``features.slicewise_pair``): DINO-Reg's slicing, joint PCA and slice-match start."""

    weights: str | None = setting(None, "encoder weights file (default: resolved from DINOREG_WEIGHTS_DIR / cache)")
    upsample: float = setting(3.0, "in-plane slice upsampling before the encoder", low=0.0, low_open=True, high=16.0)
    patch_grid: tuple[int, ...] | None = setting(None, "fixed patch grid (h, w) for every slice instead of "
                                                       "upsample (DINO-Reg's script: 112 96)", length=2, low=1,
                                                 high=512)
    every: int = setting(3, "encode every k-th slice, interpolate the others", low=1)
    token_mm: float | None = setting(None, "in-plane size of one patch token in mm: sets each image's upsampling "
                                           "from its voxel size (patch * spacing / token_mm), instead of upsample",
                                     low=0.0, low_open=True, high=1000.0)
    every_mm: float | None = setting(None, "distance between encoded slices in mm: sets every from the slice "
                                           "spacing (at least 1), instead of every", low=0.0, low_open=True,
                                     high=1000.0)
    slice_axis: object = setting("auto", "slicing array axis (auto: the one closest to superior-inferior)",
                                 choices=("auto", 0, 1, 2))
    planes: str = setting("single", "single: slices along the slicing axis only; tri: slices along all three "
                                    "array axes, one joint PCA, the three projections averaged (every axis gets "
                                    "per-slice resolution)", choices=("single", "tri"))
    batch_size: int = setting(8, "slices per forward pass", low=1)
    pca_components: int = setting(24, "channels kept by the joint foreground PCA", low=1, high=4096)
    slice_match: bool = setting(True, "cls-token slice-match translation as the initial field")
    slice_match_pairs: int = setting(10, "most similar slice pairs averaged by the slice match", low=1)


@dataclass
class PairFeatures:
    """Feature volumes of a pair (``(1, C, I', J', K')`` each, cell-centred over the image field
    of view) and an optional initial field ``(1, 3, I, J, K)`` in voxels (pull-back).

    ``refine`` holds other feature volumes for the refinement stages (Adam) when they differ from
    the ones of the search (an ensemble whose blocks are weighted per stage); None: the same.
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    init: torch.Tensor | None = None
    refine: PairFeatures | None = None


@dataclass
class EncodeRequest:
    """What a pair encoder receives.

    Attributes:
        fixed, moving: ``(I, J, K)`` float32 intensities in ``[0, 1]`` on the fixed grid (the same
            object twice when one image is encoded, as ``dinoreg encode`` does).
        fixed_mask, moving_mask: ``(I, J, K)`` boolean foregrounds.
        affine: the fixed grid's voxel-to-RAS-mm affine ``(4, 4)``.
        device: where the features are computed.
        progress: progress reporter.
        spec: this encoder's settings (its own :class:`EncoderSpec` subclass).
        seed: the registration's seed (randomised PCA and the like).
        cell_sizes: cell sizes (voxels) of the method's stages: an encoder may pool its output
            over any common divisor of them without changing what the stages see.
    """

    fixed: np.ndarray
    moving: np.ndarray
    fixed_mask: np.ndarray
    moving_mask: np.ndarray
    affine: np.ndarray
    device: torch.device
    progress: Progress
    spec: EncoderSpec
    seed: int = 0
    cell_sizes: tuple[int, ...] = (1,)

    def images(self) -> tuple[tuple[str, np.ndarray], ...]:
        """``(("fixed", array), ("moving", array))``, or only the fixed one when both are the same."""
        if self.moving is self.fixed:
            return (("fixed", self.fixed),)
        return (("fixed", self.fixed), ("moving", self.moving))
