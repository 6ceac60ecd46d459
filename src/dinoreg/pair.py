"""What every registration stage works on: a normalised pair on the fixed grid, and the
stage protocol (``run(pair, previous, progress) -> (field, timings)``).

Fields passed between stages are ``(1, 3, I, J, K)`` float32 displacements in voxels of the
fixed grid, pull-back (``warped(p) = moving(p + u(p))``), **relative to the pair's initial field**
``pair.init`` (an initial alignment such as DINO-Reg's slice-match translation): a stage sees the
moving image (or its features) already warped by ``pair.init``, and the method composes
``pair.init`` with the last stage's field at the end. ``previous`` is ``None`` for the first stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from dinoreg.features.base import PairFeatures
from dinoreg.progress import Progress
from dinoreg.spatial.grid import compose


@dataclass
class RegistrationPair:
    """A pair ready for the stages.

    Attributes:
        fixed, moving: ``(I, J, K)`` float32 intensities in ``[0, 1]``, both on the fixed grid.
        fixed_mask, moving_mask: ``(I, J, K)`` boolean foregrounds (given or thresholded).
        user_fixed_mask: the fixed mask the user gave, or None (some losses use only that one).
        affine: the fixed grid's voxel-to-RAS-mm affine ``(4, 4)``.
        spacing: fixed voxel size in mm ``(3,)``.
        device: where the stages compute.
        features: encoded feature volumes, for methods that work on features.
        init: initial field ``(1, 3, I, J, K)`` voxels, or None.
    """

    fixed: np.ndarray
    moving: np.ndarray
    fixed_mask: np.ndarray
    moving_mask: np.ndarray
    user_fixed_mask: np.ndarray | None
    affine: np.ndarray
    spacing: tuple[float, float, float]
    device: torch.device
    features: PairFeatures | None = None
    init: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(I, J, K)`` of the fixed grid."""
        return tuple(int(s) for s in self.fixed.shape)  # type: ignore[return-value]


class Stage(Protocol):
    """One step of a registration method (initial alignment, convex search, Adam, FFD, ...)."""

    name: str

    def run(self, pair: RegistrationPair, previous: torch.Tensor | None,
            progress: Progress) -> tuple[torch.Tensor, dict[str, float]]:
        """The field after this stage (relative to ``pair.init``) and seconds spent, by name."""
        ...


def run_stages(stages: Sequence[Stage], pair: RegistrationPair,
               progress: Progress) -> tuple[torch.Tensor, dict[str, float]]:
    """Chain ``stages`` (each takes the previous one's field), then compose ``pair.init``.

    Returns the ``(1, 3, I, J, K)`` float32 field and the seconds of each stage.
    """
    field: torch.Tensor | None = None
    timings: dict[str, float] = {}
    for stage in stages:
        start = time.perf_counter()
        field, extra = stage.run(pair, field, progress)
        timings.update(extra)
        timings.setdefault(stage.name, time.perf_counter() - start)
    if field is None:
        field = torch.zeros(1, 3, *pair.shape, device=pair.device)
    if pair.init is not None:
        field = compose(field, pair.init)
    return field.float(), timings
