"""Adam instance optimisation of a dense displacement field (the "Adam" half of ConvexAdam).

The field lives on a grid of cells of ``grid_sp`` voxels. Each iteration smooths the parameter
grid with three 3x3x3 mean filters (an approximate cubic B-spline), warps the pooled moving
features by it, and minimises ``similarity + lambda * diffusion`` with Adam.

Layouts: features ``(1, C, h, w, d)``; fields ``(1, 3, h, w, d)`` in cell units, ``(i, j, k)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from dinoreg import losses
from dinoreg.spatial.grid import warp

SIMILARITIES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ssd": losses.ssd,
    "lcc": lambda f, w: losses.lcc(f, w, kernel=3),
}


def smooth_field(field: torch.Tensor, passes: int = 3) -> torch.Tensor:
    """``passes`` 3x3x3 mean filters (zero padded, as ConvexAdam does)."""
    for _ in range(passes):
        field = F.avg_pool3d(field, 3, stride=1, padding=1)
    return field


@dataclass
class InstanceConfig:
    """Settings of the Adam stage."""

    grid_sp: int = 2
    iterations: int = 80
    lr: float = 1.0
    lambda_weight: float = 1.25
    similarity: str = "ssd"
    smoothing_passes: int = 3


class InstanceOptimiser:
    """Adam on a dense field; holds the parameter grid and the optimiser state."""

    def __init__(self, config: InstanceConfig) -> None:
        if config.similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {config.similarity!r}; choose from {sorted(SIMILARITIES)}")
        self.config = config

    def optimise(self, feat_fix: torch.Tensor, feat_mov: torch.Tensor, init: torch.Tensor,
                 progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Refine ``init`` (cells, ``(1, 3, h, w, d)``) and return the smoothed field (cells).

        ``progress`` is called with the iteration number after each step.
        """
        cfg = self.config
        similarity = SIMILARITIES[cfg.similarity]
        params = init.detach().clone().requires_grad_(True)
        optimiser = torch.optim.Adam([params], lr=cfg.lr)
        for it in range(cfg.iterations):
            optimiser.zero_grad(set_to_none=True)
            field = smooth_field(params, cfg.smoothing_passes)
            warped = warp(feat_mov, field)
            loss = similarity(feat_fix, warped) + cfg.lambda_weight * losses.diffusion(field)
            loss.backward()
            optimiser.step()
            if progress is not None:
                progress(it + 1)
        with torch.no_grad():
            return smooth_field(params, cfg.smoothing_passes)
