"""Adam instance optimisation of a dense displacement field (the "Adam" half of ConvexAdam).

The field lives on a grid of cells of ``grid_sp`` voxels. Each iteration smooths the parameter
grid ``S(p)`` (three 3x3x3 box filters, i.e. a separable ``[1, 3, 6, 7, 6, 3, 1] / 27`` kernel: an
approximate cubic B-spline), warps the pooled moving features by it, and takes an Adam step on
``similarity(F, M o S(p)) + lambda * diffusion(S(p))``.

For SSD (the default) the gradient is computed in closed form, demons-style, with the spatial
gradient of the *fixed* features: ``dSSD/du = 2 (M(x + u) - F(x)) . grad F(x)`` per cell, zero where
``x + u`` leaves the moving grid (where the exact gradient of the border-clamped warp is zero). This needs
only a forward ``grid_sample`` per iteration (no autograd graph) and on the brain benchmark
converges in half the iterations of the autograd version to the same Dice. LCC (and anything
else) uses autograd.

Layouts: features ``(1, C, h, w, d)``; fields ``(1, 3, h, w, d)`` in cell units, ``(i, j, k)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from dinoreg import losses
from dinoreg.spatial.grid import identity_grid, resize_field, warp

SIMILARITIES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ssd": losses.ssd,
    "lcc": lambda f, w: losses.lcc(f, w, kernel=3),
}
ADAM_EPS = 1e-4
_SMOOTH_TAPS = (1.0, 3.0, 6.0, 7.0, 6.0, 3.0, 1.0)  # three box-3 passes, composed


def smooth_field(field: torch.Tensor) -> torch.Tensor:
    """Separable ``[1, 3, 6, 7, 6, 3, 1] / 27`` filter along each axis, zero padded.

    Symmetric and zero padded, hence self-adjoint: the same function maps a gradient with
    respect to the smoothed field back to the parameters.
    """
    n, c = field.shape[:2]
    taps = torch.tensor(_SMOOTH_TAPS, dtype=field.dtype, device=field.device) / 27.0
    x = field.reshape(n * c, 1, *field.shape[2:])
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(taps)
        padding = [0, 0, 0]
        padding[axis] = len(taps) // 2
        x = F.conv3d(x, taps.view(shape), padding=tuple(padding))
    return x.reshape(n, c, *field.shape[2:])


def spatial_gradient(features: torch.Tensor) -> list[torch.Tensor]:
    """Central differences of ``(1, C, h, w, d)`` features along ``i, j, k`` (one-sided at edges)."""
    grads = []
    for axis in (2, 3, 4):
        grads.append(torch.gradient(features, dim=axis)[0])
    return grads


def inside_mask(field: torch.Tensor) -> torch.Tensor:
    """``(1, 1, h, w, d)`` 1 where ``x + field(x)`` lies inside the grid, else 0.

    Outside, the warped features are border-clamped copies whose true gradient is zero; the
    fixed-image gradient would otherwise keep pulling there and bias the field.
    """
    coords = identity_grid(tuple(field.shape[2:]), field.device, field.dtype) + field
    inside = torch.ones_like(field[:, :1])
    for axis, n in enumerate(field.shape[2:]):
        c = coords[:, axis:axis + 1]
        inside = inside * ((c >= 0) & (c <= n - 1)).to(field.dtype)
    return inside


def diffusion_gradient(field: torch.Tensor, weight: float) -> torch.Tensor:
    """Gradient of ``weight * losses.diffusion(field)`` with respect to ``field``."""
    grad = torch.zeros_like(field)
    for axis in range(2, field.ndim):
        n = field.shape[axis]
        if n < 2:
            continue
        diff = field.narrow(axis, 1, n - 1) - field.narrow(axis, 0, n - 1)
        scaled = diff * (2.0 * weight / diff.numel())
        grad.narrow(axis, 1, n - 1).add_(scaled)
        grad.narrow(axis, 0, n - 1).sub_(scaled)
    return grad


@dataclass
class InstanceConfig:
    """Settings of the Adam stage (``grid_sp`` voxels per cell, learning rate in cells)."""

    grid_sp: int = 2
    iterations: int = 40
    lr: float = 1.0
    lambda_weight: float = 1.25
    similarity: str = "ssd"
    param_factor: int = 1  # parameters on a grid this many times coarser, upsampled to compare


class InstanceOptimiser:
    """Adam on a dense field; holds the settings, creates the parameter grid per call."""

    def __init__(self, config: InstanceConfig) -> None:
        if config.similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {config.similarity!r}; choose from {sorted(SIMILARITIES)}")
        self.config = config

    def optimise(self, feat_fix: torch.Tensor, feat_mov: torch.Tensor, init: torch.Tensor,
                 progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Refine ``init`` (cells, ``(1, 3, h, w, d)``) and return the smoothed field (cells).

        ``progress`` is called with the iteration number after each step.
        """
        shape = tuple(feat_fix.shape[2:])
        if self.config.param_factor > 1:
            coarse = tuple(max(1, -(-n // self.config.param_factor)) for n in shape)
            init = resize_field(init, coarse)
        self._shape = shape
        params = init.detach().clone().requires_grad_(True)
        # gradients are per cell (sums over cells, not means), so eps can sit above the float32
        # noise of grid_sample (~1e-4 per cell for an identical pair) and below real gradients
        # (~0.1..1); otherwise Adam, being scale invariant, turns noise into steps of size lr
        optimiser = torch.optim.Adam([params], lr=self.config.lr, eps=ADAM_EPS)
        step = self._ssd_step if self.config.similarity == "ssd" else self._autograd_step
        fixed_grad = spatial_gradient(feat_fix) if self.config.similarity == "ssd" else None
        for it in range(self.config.iterations):
            optimiser.zero_grad(set_to_none=True)
            step(params, feat_fix, feat_mov, fixed_grad)
            optimiser.step()
            if progress is not None:
                progress(it + 1)
        with torch.no_grad():
            return self._expand(smooth_field(params))

    def _expand(self, field: torch.Tensor) -> torch.Tensor:
        """Parameter-grid field -> feature-grid field (identity unless ``param_factor > 1``)."""
        if tuple(field.shape[2:]) == self._shape:
            return field
        return resize_field(field, self._shape)

    def _ssd_step(self, params: torch.Tensor, feat_fix: torch.Tensor, feat_mov: torch.Tensor,
                  fixed_grad: list[torch.Tensor] | None) -> None:
        assert fixed_grad is not None
        with torch.no_grad():
            smooth = smooth_field(params)
        coarse = smooth.requires_grad_(True)
        field = self._expand(coarse)
        with torch.no_grad():
            residual = (warp(feat_mov, field) - feat_fix) * inside_mask(field)
            scale = 2.0
            grad = torch.cat([(residual * g).sum(1, keepdim=True) for g in fixed_grad], 1) * scale
        if field is coarse:
            grad_coarse = grad
        else:  # adjoint of the upsampling, by autograd (cheap: 3 channels)
            field.backward(grad)
            grad_coarse = coarse.grad
        with torch.no_grad():
            # differences across coarse cells are param_factor times those across feature cells;
            # the per-cell scaling of the similarity gradient applies to the regulariser too
            weight = self.config.lambda_weight / self.config.param_factor ** 2 * residual[0, 0].numel()
            grad_coarse = grad_coarse + diffusion_gradient(smooth, weight)
            params.grad = smooth_field(grad_coarse)

    def _autograd_step(self, params: torch.Tensor, feat_fix: torch.Tensor, feat_mov: torch.Tensor,
                       fixed_grad: list[torch.Tensor] | None) -> None:
        similarity = SIMILARITIES[self.config.similarity]
        field = self._expand(smooth_field(params))
        loss = similarity(feat_fix, warp(feat_mov, field)) + self.config.lambda_weight * losses.diffusion(field)
        (loss * feat_fix[0, 0].numel()).backward()  # per-cell gradients, see ADAM_EPS
