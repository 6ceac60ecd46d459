"""Adam on a dense field smoothed inside every iteration, without a convex stage: the
instance optimisation of the DINO-Reg authors' published inference script.

The parameters are a displacement field on cells of ``grid_sp`` voxels (1: the image grid). Each
iteration smooths it with ``smooth_passes`` box filters of ``smooth_kernel`` cells (stride 1,
edge-replicated), warps the moving features by it, and steps Adam on
``mean_x sum_c (F_c(x) - M_c(x + u(x)))^2 + lambda_weight * diffusion(u)``; the returned field
is the smoothed one. Features are first brought onto the cell grid (averaged over cells, or
interpolated from a coarser volume).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dinoreg import losses
from dinoreg.optim.convex_adam import field_from_cells, field_to_cells, pair_on_cells, stage_features
from dinoreg.optim.instance import Adam
from dinoreg.pair import RegistrationPair
from dinoreg.progress import Progress
from dinoreg.spatial.grid import warp


@dataclass(frozen=True)
class SmoothedAdamConfig:
    """Settings (the authors' values: grid 1, 1000 iterations, lr 3, weight 2, kernel 7 x 5)."""

    grid_sp: int = 1
    iterations: int = 1000
    lr: float = 3.0
    lambda_weight: float = 2.0
    smooth_kernel: int = 7
    smooth_passes: int = 5


def _box_along(field: torch.Tensor, dim: int, kernel: int) -> torch.Tensor:
    """Stride-1 mean over ``kernel`` samples along ``dim`` (edge-replicated), by a running sum."""
    pad = kernel // 2
    n = field.shape[dim]
    index = torch.clamp(torch.arange(-pad, n + pad, device=field.device), 0, n - 1)
    padded = field.index_select(dim, index)
    csum = torch.cumsum(padded, dim)
    zero = torch.zeros_like(csum.narrow(dim, 0, 1))
    csum = torch.cat([zero, csum], dim)
    return (csum.narrow(dim, kernel, n) - csum.narrow(dim, 0, n)) / kernel


def box_smooth(field: torch.Tensor, kernel: int, passes: int) -> torch.Tensor:
    """``passes`` stride-1 box filters of odd size ``kernel`` over ``(N, C, I, J, K)``, edges
    replicated (applied axis by axis with running sums: the same filter at a cost independent of
    ``kernel``)."""
    if kernel <= 1 or passes <= 0:
        return field
    for _ in range(passes):
        for dim in (2, 3, 4):
            field = _box_along(field, dim, kernel)
    return field


class SmoothedAdamStage:
    """The stage (see module docstring); starts from ``previous`` when given."""

    name = "smoothed-adam"

    def __init__(self, config: SmoothedAdamConfig) -> None:
        self.config = config

    def run(self, pair: RegistrationPair, previous: torch.Tensor | None,
            progress: Progress) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, shape = self.config, pair.shape
        feat_fix, feat_mov = stage_features(pair)
        with torch.no_grad():
            fix, mov = pair_on_cells(feat_fix, feat_mov, shape, cfg.grid_sp, pair.init)
            start = (torch.zeros(1, 3, *fix.shape[2:], device=fix.device) if previous is None
                     else field_to_cells(previous, shape, cfg.grid_sp))
        params = start.clone()
        optimiser = Adam(params, lr=cfg.lr)
        with progress.stage("smoothed adam", total=cfg.iterations) as step:
            for _ in range(cfg.iterations):
                leaf = params.detach().requires_grad_(True)
                field = box_smooth(leaf, cfg.smooth_kernel, cfg.smooth_passes)
                similarity = (fix - warp(mov, field)).pow(2).sum(1).mean()
                loss = similarity + cfg.lambda_weight * losses.diffusion(field)
                loss.backward()
                optimiser.step(leaf.grad)
                step(1)
        with torch.no_grad():
            smooth = box_smooth(params, cfg.smooth_kernel, cfg.smooth_passes)
            return field_from_cells(smooth, shape, cfg.grid_sp), {}
