"""Coupled convex discrete optimisation (the "Convex" half of ConvexAdam).

Heinrich et al., Siebert et al. (Learn2Reg 2021). Features are average-pooled to a coarse grid
of cells of ``grid_sp`` voxels; for every cell a dense SSD cost volume over the integer
displacements ``[-disp_hw, disp_hw]^3`` (in cells) is computed and box-filtered. The field is then
found by alternating a per-cell argmin of ``cost + coeff * ||d - smooth(d)||^2`` with a spatial
smoothing of the chosen displacements, with ``coeff`` growing over a few coupling iterations.
Optionally a backward field is computed too and both are made inverse consistent.

Layouts: feature volumes ``(1, C, h, w, d)`` on the coarse grid; cost matrices ``(cells, L)``
with ``L = prod(2 * disp_hw[a] + 1)`` displacements enumerated in ``(i, j, k)`` C order;
displacement fields ``(1, 3, h, w, d)`` in cell units, components ``(i, j, k)``.

2D pairs (one slice, ``d == 1``) search in-plane only: the half-width along the flat axis is 0
(:func:`search_half_widths`), and the box filters and the choice smoothing skip that axis (a
3-wide zero-padded mean over one cell would only scale it by 1/3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dinoreg.jit import fused_cpu
from dinoreg.optim import cpu_kernels
from dinoreg.spatial.grid import warp

DEFAULT_COUPLING = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


HalfWidth = int | tuple[int, int, int]


def half_widths(disp_hw: HalfWidth) -> tuple[int, int, int]:
    """``disp_hw`` per axis ``(i, j, k)``: an int applies to every axis."""
    if isinstance(disp_hw, int):
        return (disp_hw, disp_hw, disp_hw)
    return tuple(int(h) for h in disp_hw)  # type: ignore[return-value]


def search_half_widths(disp_hw: HalfWidth, cells: tuple[int, ...]) -> tuple[int, int, int]:
    """The search half-width per axis of a cell grid: ``disp_hw``, or 0 along an axis of one
    cell (a 2D pair: nothing to search through-plane)."""
    return tuple(0 if n == 1 else h for n, h in zip(cells, half_widths(disp_hw)))  # type: ignore[return-value]


def displacement_candidates(disp_hw: HalfWidth, device: torch.device | str = "cpu") -> torch.Tensor:
    """All integer displacements in ``[-hw_a, hw_a]`` per axis as ``(3, L)`` (i, j, k), C order
    (``disp_hw`` an int: the cube ``[-disp_hw, disp_hw]^3``)."""
    axes = [torch.arange(-h, h + 1, device=device, dtype=torch.float32) for h in half_widths(disp_hw)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), 0).reshape(3, -1)


def ssd_cost_volume(feat_fix: torch.Tensor, feat_mov: torch.Tensor, disp_hw: HalfWidth,
                    reuse: torch.Tensor | None = None) -> torch.Tensor:
    """Box-filtered SSD between each fixed cell and the moving cell displaced by each candidate.

    Moving cells outside the volume read zeros (as in the reference implementation). The raw
    SSD (summed over channels) is smoothed twice by a 3x3x3 mean filter (zero padded; axes of
    one cell are not filtered). On CPU a fused numba kernel computes the same values, into
    ``reuse`` when given (a cost matrix of the same size no longer needed: no second large
    allocation). ``disp_hw``: half-width in cells, one for every axis or one per axis.

    Returns:
        ``(h * w * d, L)`` cost matrix: one row per cell (C order), one column per candidate
        of :func:`displacement_candidates`.
    """
    if fused_cpu(feat_fix):
        cost = cpu_kernels.ssd_cost_volume(cpu_kernels.channels_last(feat_fix), cpu_kernels.channels_last(feat_mov),
                                           half_widths(disp_hw), None if reuse is None else reuse.numpy())
        return torch.from_numpy(cost)
    return _ssd_cost_volume_torch(feat_fix, feat_mov, disp_hw)


def _box3(volume: torch.Tensor) -> torch.Tensor:
    """3-wide zero-padded mean (divided by 3 per axis) along every axis of ``(N, C, h, w, d)``
    that has more than one cell."""
    sizes = tuple(int(n) for n in volume.shape[2:])
    if min(sizes) >= 3:
        return F.avg_pool3d(volume, 3, stride=1, padding=1)
    # torch's pooling refuses inputs smaller than the kernel: pad explicitly
    kernel = tuple(3 if n > 1 else 1 for n in sizes)
    pad = [p for k in reversed(kernel) for p in (k // 2, k // 2)]
    return F.avg_pool3d(F.pad(volume, pad), kernel, stride=1)


def _ssd_cost_volume_torch(feat_fix: torch.Tensor, feat_mov: torch.Tensor, disp_hw: HalfWidth) -> torch.Tensor:
    _, _, h, w, d = feat_fix.shape
    ha, hb, hc = half_widths(disp_hw)
    na, nb, nc = 2 * ha + 1, 2 * hb + 1, 2 * hc + 1
    padded = F.pad(feat_mov, [hc, hc, hb, hb, ha, ha])[0]
    fix = feat_fix[0].unsqueeze(3)  # (C, h, w, 1, d)
    cost = feat_fix.new_empty((na, nb, h, w, nc, d))
    for a in range(na):
        for b in range(nb):
            window = padded[:, a:a + h, b:b + w].unfold(3, d, 1)  # (C, h, w, nc, d)
            cost[a, b] = (fix - window).pow(2).sum(0)
    labels = na * nb * nc
    cost = cost.permute(0, 1, 4, 2, 3, 5).reshape(labels, 1, h, w, d)
    cost = _box3(_box3(cost))
    return cost.reshape(labels, -1).t().contiguous()


def _smooth_choice(candidates: torch.Tensor, choice: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    field = candidates[:, choice].reshape(1, 3, *shape)
    return _box3(field)


def coupled_convex(cost: torch.Tensor, shape: tuple[int, int, int], disp_hw: HalfWidth,
                   coupling: tuple[float, ...] = DEFAULT_COUPLING) -> torch.Tensor:
    """Solve the coupled convex problem for one direction.

    Args:
        cost: ``(h * w * d, L)`` cost matrix from :func:`ssd_cost_volume`.
        shape: the cell grid ``(h, w, d)``.
        disp_hw: half width of the search range, cells (per axis, or one for all).
        coupling: the coupling weights, one argmin/smoothing round each.

    Returns:
        ``(1, 3, h, w, d)`` displacement in cells.
    """
    candidates = displacement_candidates(disp_hw, cost.device).to(cost.dtype)  # (3, L)
    cand_sq = candidates.pow(2).sum(0)  # (L,)
    # ties (flat background: every candidate costs the same) go to the smallest displacement
    tie_break = 1e-6 * float(cost.mean()) + 1e-12  # SSD costs are >= 0: the mean of |cost| without a copy
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
    disp_hw: HalfWidth = 4  # cells, one for all axes or one per axis; 0 along an axis of one cell
    coupling: tuple[float, ...] = DEFAULT_COUPLING
    inverse_consistent: bool = True
    ic_iterations: int = 15


def convex_optimise(feat_fix: torch.Tensor, feat_mov: torch.Tensor, config: ConvexConfig) -> torch.Tensor:
    """Coarse field (cells) aligning pooled moving features to pooled fixed features.

    ``feat_fix`` and ``feat_mov`` are ``(1, C, h, w, d)`` on the coarse grid.
    """
    shape = tuple(feat_fix.shape[2:])
    hw = search_half_widths(config.disp_hw, shape)
    cost = ssd_cost_volume(feat_fix, feat_mov, hw)
    field = coupled_convex(cost, shape, hw, config.coupling)
    if not config.inverse_consistent:
        return field
    cost_back = ssd_cost_volume(feat_mov, feat_fix, hw, reuse=cost)  # the forward costs are spent
    del cost
    back = coupled_convex(cost_back, shape, hw, config.coupling)
    field, _ = inverse_consistency(field, back, config.ic_iterations)
    return field
