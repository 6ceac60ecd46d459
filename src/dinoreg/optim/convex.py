"""Coupled convex discrete optimisation (the "Convex" half of ConvexAdam).

Heinrich et al., Siebert et al. (Learn2Reg 2021). Features are average-pooled to a coarse grid
of cells of ``grid_sp`` voxels; for every cell a dense SSD cost volume over the integer
displacements ``[-disp_hw, disp_hw]^3`` (in cells) is computed and box-filtered. The field is then
found by alternating a per-cell argmin of ``cost + coeff * ||d - smooth(d)||^2`` with a spatial
smoothing of the chosen displacements, with ``coeff`` growing over a few coupling iterations.
Optionally a backward field is computed too and both are made inverse consistent.

Layouts: feature volumes ``(1, C, h, w, d)`` on the coarse grid; cost matrices ``(cells, L)``
with ``L = (2 * disp_hw + 1) ** 3`` displacements enumerated in ``(i, j, k)`` C order;
displacement fields ``(1, 3, h, w, d)`` in cell units, components ``(i, j, k)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dinoreg.jit import fused_cpu
from dinoreg.optim import cpu_kernels
from dinoreg.spatial.grid import warp

DEFAULT_COUPLING = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def displacement_candidates(disp_hw: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """All integer displacements in ``[-disp_hw, disp_hw]^3`` as ``(3, L)`` (i, j, k), C order."""
    r = torch.arange(-disp_hw, disp_hw + 1, device=device, dtype=torch.float32)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), 0).reshape(3, -1)


def ssd_cost_volume(feat_fix: torch.Tensor, feat_mov: torch.Tensor, disp_hw: int) -> torch.Tensor:
    """Box-filtered SSD between each fixed cell and the moving cell displaced by each candidate.

    Moving cells outside the volume read zeros (as in the reference implementation). The raw
    SSD (summed over channels) is smoothed twice by a 3x3x3 mean filter (zero padded).
    On CPU a fused numba kernel computes the same values.

    Returns:
        ``(h * w * d, L)`` cost matrix: one row per cell (C order), one column per candidate
        of :func:`displacement_candidates`.
    """
    if fused_cpu(feat_fix):
        cost = cpu_kernels.ssd_cost_volume(cpu_kernels.channels_last(feat_fix),
                                           cpu_kernels.channels_last(feat_mov), disp_hw)
        return torch.from_numpy(cost)
    return _ssd_cost_volume_torch(feat_fix, feat_mov, disp_hw)


def _ssd_cost_volume_torch(feat_fix: torch.Tensor, feat_mov: torch.Tensor, disp_hw: int) -> torch.Tensor:
    _, _, h, w, d = feat_fix.shape
    n = 2 * disp_hw + 1
    padded = F.pad(feat_mov, [disp_hw] * 6)[0]
    fix = feat_fix[0].unsqueeze(3)  # (C, h, w, 1, d)
    cost = feat_fix.new_empty((n, n, h, w, n, d))
    for a in range(n):
        for b in range(n):
            window = padded[:, a:a + h, b:b + w].unfold(3, d, 1)  # (C, h, w, n, d)
            cost[a, b] = (fix - window).pow(2).sum(0)
    cost = cost.permute(0, 1, 4, 2, 3, 5).reshape(n ** 3, 1, h, w, d)
    cost = F.avg_pool3d(F.avg_pool3d(cost, 3, stride=1, padding=1), 3, stride=1, padding=1)
    return cost.reshape(n ** 3, -1).t().contiguous()


def _smooth_choice(candidates: torch.Tensor, choice: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    field = candidates[:, choice].reshape(1, 3, *shape)
    return F.avg_pool3d(field, 3, stride=1, padding=1)


def coupled_convex(cost: torch.Tensor, shape: tuple[int, int, int], disp_hw: int,
                   coupling: tuple[float, ...] = DEFAULT_COUPLING) -> torch.Tensor:
    """Solve the coupled convex problem for one direction.

    Args:
        cost: ``(h * w * d, L)`` cost matrix from :func:`ssd_cost_volume`.
        shape: the cell grid ``(h, w, d)``.
        disp_hw: half width of the search range, cells.
        coupling: the coupling weights, one argmin/smoothing round each.

    Returns:
        ``(1, 3, h, w, d)`` displacement in cells.
    """
    candidates = displacement_candidates(disp_hw, cost.device).to(cost.dtype)  # (3, L)
    cand_sq = candidates.pow(2).sum(0)  # (L,)
    # ties (flat background: every candidate costs the same) go to the smallest displacement
    tie_break = 1e-6 * float(cost.abs().mean()) + 1e-12
    field = torch.zeros(1, 3, *shape, dtype=cost.dtype, device=cost.device)
    for coeff in (0.0, *coupling):
        # coeff * ||c - f||^2 = coeff * (|c|^2 - 2 c.f) + const(f): the constant leaves the argmin
        choice = _coupled_argmin(cost, field.reshape(3, -1).t(), candidates, (tie_break + coeff) * cand_sq, coeff)
        field = _smooth_choice(candidates, choice, shape)
    return field


def _coupled_argmin(cost: torch.Tensor, field: torch.Tensor, candidates: torch.Tensor, penalty: torch.Tensor,
                    coeff: float) -> torch.Tensor:
    """Per cell the candidate minimising ``cost + penalty - 2 coeff * candidate . field``.

    ``cost`` ``(N, L)``, ``field`` ``(N, 3)`` cells, ``candidates`` ``(3, L)``, ``penalty`` ``(L,)``.
    """
    if fused_cpu(cost):
        choice = cpu_kernels.coupled_argmin(cost.numpy(), field.contiguous().numpy(),
                                            candidates.t().contiguous().numpy(), penalty.contiguous().numpy(),
                                            float(coeff))
        return torch.from_numpy(choice)
    return torch.addmm(cost + penalty, field, candidates, alpha=-2.0 * coeff).argmin(1)


def inverse_consistency(forward: torch.Tensor, backward: torch.Tensor, iterations: int = 15
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Make two fields (same grid, same units) approximately inverse to each other.

    Iterates ``u <- (u - v o (id + u)) / 2`` and symmetrically for ``v``.
    """
    u, v = forward, backward
    for _ in range(iterations):
        u_next = 0.5 * (u - warp(v, u))
        v_next = 0.5 * (v - warp(u, v))
        u, v = u_next, v_next
    return u, v


@dataclass
class ConvexConfig:
    """Settings of the discrete stage (ConvexAdam's defaults)."""

    grid_sp: int = 6
    disp_hw: int = 4
    coupling: tuple[float, ...] = DEFAULT_COUPLING
    inverse_consistent: bool = True
    ic_iterations: int = 15


def convex_optimise(feat_fix: torch.Tensor, feat_mov: torch.Tensor, config: ConvexConfig) -> torch.Tensor:
    """Coarse field (cells) aligning pooled moving features to pooled fixed features.

    ``feat_fix`` and ``feat_mov`` are ``(1, C, h, w, d)`` on the coarse grid.
    """
    shape = tuple(feat_fix.shape[2:])
    cost = ssd_cost_volume(feat_fix, feat_mov, config.disp_hw)
    field = coupled_convex(cost, shape, config.disp_hw, config.coupling)
    if not config.inverse_consistent:
        return field
    del cost
    cost_back = ssd_cost_volume(feat_mov, feat_fix, config.disp_hw)
    back = coupled_convex(cost_back, shape, config.disp_hw, config.coupling)
    field, _ = inverse_consistency(field, back, config.ic_iterations)
    return field
