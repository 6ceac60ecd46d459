"""Encoders by name: each turns a normalised fixed/moving pair into feature volumes.

A registered *pair encoder* takes the two images (numpy ``(I, J, K)`` float32 in ``[0, 1]``, on
the same grid) and their foreground masks, and returns a :class:`PairFeatures`: the two feature
volumes ``(1, C, I', J', K')`` covering the image field of view (cell-centred), and optionally an
initial displacement ``(1, 3, I, J, K)`` in voxels (DINO-Reg's slice-match translation).
Encoders that need a joint step (PCA of fixed + moving features) do it here.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from dinoreg.errors import DinoregError
from dinoreg.features.mind import mind_ssc
from dinoreg.progress import Progress


@dataclass
class PairFeatures:
    """Feature volumes of a pair (``(1, C, I', J', K')`` each) and an optional initial field."""

    fixed: torch.Tensor
    moving: torch.Tensor
    init: torch.Tensor | None = None


@dataclass
class EncodeRequest:
    """What a pair encoder receives. Arrays are ``(I, J, K)``; masks boolean."""

    fixed: np.ndarray
    moving: np.ndarray
    fixed_mask: np.ndarray
    moving_mask: np.ndarray
    affine: np.ndarray
    device: torch.device
    progress: Progress
    options: dict[str, Any]


PairEncoder = Callable[[EncodeRequest], PairFeatures]
_REGISTRY: dict[str, PairEncoder] = {}


def register_encoder(name: str) -> Callable[[PairEncoder], PairEncoder]:
    """Decorator adding a pair encoder under ``name``."""

    def wrap(fn: PairEncoder) -> PairEncoder:
        _REGISTRY[name] = fn
        return fn

    return wrap


def available_encoders() -> list[str]:
    """Names accepted by ``--features`` (single names; ``a+b`` ensembles combine them)."""
    _load_optional()
    return sorted(_REGISTRY)


def get_encoder(name: str) -> PairEncoder:
    """The pair encoder called ``name``; a :class:`DinoregError` listing the choices otherwise."""
    _load_optional()
    if name not in _REGISTRY:
        raise DinoregError(f"unknown encoder {name!r}; choose from {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _load_optional() -> None:
    """Import the modules that register learned encoders (they need only torch)."""
    import importlib

    for module in ("dinoreg.features.dinov2_pair", "dinoreg.features.dino3d_pair"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def _to_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)[None, None]


@register_encoder("mind")
def mind_pair(req: EncodeRequest) -> PairFeatures:
    """MIND-SSC of both images. Options: ``mind_radius`` (1), ``mind_dilation`` (2) in voxels of
    the image grid, ``mind_downsample`` (1 = image grid; 2 = computed on the 2x average-pooled
    image with the dilation halved, 8x cheaper), ``mind_pool`` (1; p = the full-resolution
    descriptor averaged over cells of p voxels, exactly what ConvexAdam's cell grids of a
    multiple of p voxels would compute from it, 1/p^3 of the memory)."""
    radius = int(req.options.get("mind_radius", 1))
    dilation = int(req.options.get("mind_dilation", 2))
    down = int(req.options.get("mind_downsample", 1))
    # pooling must not cross the cells of either ConvexAdam stage
    pool = math.gcd(int(req.options.get("mind_pool", 1)), int(req.options.get("grid_sp", 1)),
                    int(req.options.get("grid_sp_adam", 1)))
    out = []
    images = (req.fixed,) if req.moving is req.fixed else (req.fixed, req.moving)  # encode: one image
    with torch.no_grad(), req.progress.stage("MIND-SSC", total=len(images)) as step:
        for array in images:
            image = _to_tensor(array, req.device)
            if down > 1 and min(image.shape[2:]) >= 2 * down:
                image = F.avg_pool3d(image, down, stride=down, ceil_mode=True)
                out.append(mind_ssc(image, radius, max(1, dilation // down)))
            else:
                out.append(mind_ssc(image, radius, dilation, pool=pool))
            step(1)
    return PairFeatures(out[0], out[-1])
