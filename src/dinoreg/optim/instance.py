"""Adam instance optimisation of a dense displacement field (the "Adam" half of ConvexAdam).

The field lives on a grid of cells of ``grid_sp`` voxels. Each iteration smooths the parameter
grid ``S(p)`` (three 3x3x3 box filters, i.e. a separable ``[1, 3, 6, 7, 6, 3, 1] / 27`` kernel: an
approximate cubic B-spline), warps the pooled moving features by it, and takes an Adam step on
``similarity(F, M o S(p)) + lambda * diffusion(S(p))``.

On CPU, SSD (the default) takes its gradient from a fused kernel
(:func:`dinoreg.optim.cpu_kernels.ssd_gradient`: the exact gradient of the trilinear warp, as
autograd would give it) and applies the smoothing/upsampling operator and its adjoint
explicitly (:class:`ParameterMap`), so no autograd graph is built. On GPU, and for LCC, the
same loss goes through autograd. (A demons-style gradient with the *fixed* image's spatial
gradient converged faster on the brain pair but cost 0.3-0.8 mm TRE and folded 0.15% of
voxels on the BraTS-Reg pairs; it was dropped.)

Layouts: features ``(1, C, h, w, d)``; fields ``(1, 3, h, w, d)`` in cell units, ``(i, j, k)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from dinoreg import losses
from dinoreg.jit import fused_cpu, fused_cpu_for
from dinoreg.optim import cpu_kernels
from dinoreg.spatial.grid import resize_field, warp
from dinoreg.spatial.separable import apply_separable, apply_separable_adjoint, filter_matrix, linear_resize_matrix

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


class Adam:
    """Adam (Kingma & Ba) on one tensor, the update of ``torch.optim.Adam`` without its import cost.

    ``torch.optim.Adam`` pulls in ``torch._dynamo`` on construction, several seconds on a cold
    start; this is the same arithmetic (bias-corrected moments, ``eps`` added after the square
    root) in a dozen lines.
    """

    def __init__(self, params: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.step_count = 0
        self.first = torch.zeros_like(params)
        self.second = torch.zeros_like(params)

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        """Move ``params`` in place along the Adam direction for ``grad``."""
        beta1, beta2 = self.betas
        self.step_count += 1
        if fused_cpu(self.params) and self.params.is_contiguous():  # one pass, not six
            cpu_kernels.adam_step(self.params, self.first, self.second, grad, self.betas,
                                  self.lr / (1.0 - beta1 ** self.step_count),
                                  1.0 / math.sqrt(1.0 - beta2 ** self.step_count), self.eps)
            return
        self.first.lerp_(grad, 1.0 - beta1)
        self.second.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        correction1 = 1.0 - beta1 ** self.step_count
        correction2 = 1.0 - beta2 ** self.step_count
        denom = (self.second.sqrt() / correction2 ** 0.5).add_(self.eps)
        self.params.addcdiv_(self.first, denom, value=-self.lr / correction1)


@dataclass
class InstanceConfig:
    """Settings of the Adam stage (``grid_sp`` voxels per cell, learning rate in cells)."""

    grid_sp: int = 2
    iterations: int = 40
    lr: float = 1.0
    lambda_weight: float = 1.25
    similarity: str = "ssd"
    param_factor: int = 1  # parameters on a grid this many times coarser, upsampled to compare


class ParameterMap:
    """The linear map from the parameter grid to the field on the feature grid, and its adjoint.

    ``field = scale * U(S(params))``: ``S`` the separable ``[1, 3, 6, 7, 6, 3, 1] / 27`` smoothing
    (:func:`smooth_field`), ``U`` trilinear resizing to the feature grid (cell-centred, as
    :func:`dinoreg.spatial.grid.resize_field`; identity when the grids agree), ``scale`` the
    per-component grid ratio that keeps vectors in feature-grid cells. Both are small dense
    matrices per axis (:mod:`dinoreg.spatial.separable`).
    """

    def __init__(self, coarse: tuple[int, ...], fine: tuple[int, ...], device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        taps = [t / 27.0 for t in _SMOOTH_TAPS]
        # an axis of one cell (a 2D pair) is not smoothed: the zero-padded filter would scale it by 7/27
        self.smoothing = [filter_matrix(n, taps if n > 1 else [1.0], dtype, device) for n in coarse]
        # on CPU the banded filter (numba) beats dense matrices on grids of more than a few dozen cells
        self.fused_taps = np.array(taps, np.float32) if fused_cpu_for(device, dtype) else None
        self.resize = None
        if tuple(coarse) != tuple(fine):
            self.resize = [linear_resize_matrix(f, c, dtype, device) for f, c in zip(fine, coarse)]
        ratio = [f / c for f, c in zip(fine, coarse)]
        self.scale = torch.tensor(ratio, dtype=dtype, device=device).view(1, 3, 1, 1, 1)

    def smooth(self, params: torch.Tensor) -> torch.Tensor:
        """``S(params)`` on the parameter grid, ``(1, 3, h', w', d')``."""
        if self.fused_taps is not None and not params.requires_grad:
            return cpu_kernels.separable_filter(params, self.fused_taps)
        return apply_separable(params[0], self.smoothing).unsqueeze(0)

    def expand(self, smooth: torch.Tensor) -> torch.Tensor:
        """``scale * U(smooth)``: a smoothed parameter field on the feature grid, ``(1, 3, h, w, d)``."""
        if self.resize is None:
            return smooth
        return apply_separable(smooth[0], self.resize).unsqueeze(0) * self.scale

    def field(self, params: torch.Tensor) -> torch.Tensor:
        """The field on the feature grid for ``params``."""
        return self.expand(self.smooth(params))

    def expand_adjoint(self, grad: torch.Tensor) -> torch.Tensor:
        """Transpose of :meth:`expand`: a feature-grid gradient onto the parameter grid."""
        if self.resize is None:
            return grad
        return apply_separable_adjoint((grad * self.scale)[0], self.resize).unsqueeze(0)

    def smooth_adjoint(self, grad: torch.Tensor) -> torch.Tensor:
        """Transpose of :meth:`smooth` (the filter is symmetric and zero padded: the same filter)."""
        if self.fused_taps is not None:
            return cpu_kernels.separable_filter(grad, self.fused_taps)
        return apply_separable_adjoint(grad[0], self.smoothing).unsqueeze(0)


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
        self._map = ParameterMap(tuple(init.shape[2:]), shape, feat_fix.device, feat_fix.dtype)
        self._cells = math.prod(shape)
        params = init.detach().clone()
        # gradients are per cell (sums over cells, not means), so eps can sit above the float32
        # noise of grid_sample (~1e-4 per cell for an identical pair) and below real gradients
        # (~0.1..1); otherwise Adam, being scale invariant, turns noise into steps of size lr
        optimiser = Adam(params, lr=self.config.lr, eps=ADAM_EPS)
        gradient = self._autograd_gradient
        h, w = feat_fix.shape[2:4]
        if self.config.similarity == "ssd" and fused_cpu(feat_fix) and min(h, w) >= 2:  # d == 1: a 2D pair
            self._mov_cl, self._fix_cl = cpu_kernels.channels_last(feat_mov), cpu_kernels.channels_last(feat_fix)
            gradient = self._fused_ssd_gradient
        for it in range(self.config.iterations):
            optimiser.step(gradient(params, feat_fix, feat_mov))
            if progress is not None:
                progress(it + 1)
        with torch.no_grad():
            return self._map.field(params)

    @torch.no_grad()
    def _fused_ssd_gradient(self, params: torch.Tensor, feat_fix: torch.Tensor, feat_mov: torch.Tensor
                            ) -> torch.Tensor:
        smooth = self._map.smooth(params)
        grad = cpu_kernels.ssd_gradient(self._mov_cl, self._fix_cl, self._map.expand(smooth))
        # differences across parameter cells are param_factor times those across feature cells;
        # the per-cell scaling of the similarity gradient applies to the regulariser too
        weight = self.config.lambda_weight / self.config.param_factor ** 2 * self._cells
        grad = cpu_kernels.add_diffusion_gradient(smooth, weight, self._map.expand_adjoint(grad).contiguous())
        return self._map.smooth_adjoint(grad)

    def _autograd_gradient(self, params: torch.Tensor, feat_fix: torch.Tensor, feat_mov: torch.Tensor
                           ) -> torch.Tensor:
        similarity = SIMILARITIES[self.config.similarity]
        leaf = params.detach().requires_grad_(True)
        field = self._map.field(leaf)
        loss = similarity(feat_fix, warp(feat_mov, field)) + self.config.lambda_weight * losses.diffusion(field)
        (loss * feat_fix[0, 0].numel()).backward()  # per-cell gradients, see ADAM_EPS
        return leaf.grad
