"""Initial alignment before the deformable stages (``init``: none, centre, moments, affine).

The result is a world affine ``T`` ``(4, 4)``: fixed world point (RAS mm) -> moving world point.
The pipeline resamples the *original* moving image through ``T`` onto the fixed grid once
(:func:`dinoreg.pipeline.prepare`), the deformable stages run on that, and the Learn2Reg field is
the composite ``p -> A_fixed^-1 T A_fixed (p + u(p))`` (:func:`dinoreg.spatial.world.compose_world_affine`).

* ``centre``: the centres of the two fields of view coincide.
* ``moments``: the intensity centres of mass of the two foregrounds coincide.
* ``affine``: 12 parameters (a 3x3 matrix about the fixed grid's centre + a translation, in
  fixed voxels), Adam on the SSD of MIND-SSC features, two levels (features pooled by 4 then 2
  voxels). Both the ``centre`` and the ``moments`` starts are optimised at the coarse level and
  the one with the lower cost is refined (:class:`AffineFit`): the intensity centres of mass of
  a CT and an MR of different fields of view can lie 10 cm apart.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from dinoreg.io.images import Image
from dinoreg.progress import Progress
from dinoreg.spatial.grid import identity_grid, sample

INIT_MODES = ("none", "centre", "moments", "affine")


def _translation(shift: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, 3] = shift
    return out


def fov_centre(img: Image) -> np.ndarray:
    """World centre of an image's field of view, mm."""
    return img.affine[:3, :3] @ ((np.asarray(img.shape, dtype=np.float64) - 1) / 2) + img.affine[:3, 3]


def centre_of_mass(img: Image, weights: np.ndarray) -> np.ndarray:
    """World centre of mass of ``weights`` (an ``(I, J, K)`` array on ``img``'s grid), mm."""
    total = float(weights.sum())
    if total <= 0:
        return fov_centre(img)
    idx = [np.arange(n, dtype=np.float64) for n in img.shape]
    centre = np.array([float((weights.sum(axis=tuple(b for b in range(3) if b != a)) * idx[a]).sum()) / total
                       for a in range(3)])
    return img.affine[:3, :3] @ centre + img.affine[:3, 3]


class InitialStage:
    """The initial alignment stage: ``align`` gives the world affine fixed -> moving."""

    name = "init"

    def __init__(self, mode: str, iterations: int = 80) -> None:
        if mode not in INIT_MODES:
            raise ValueError(f"unknown init {mode!r}; choose from {INIT_MODES}")
        self.mode, self.iterations = mode, iterations

    def align(self, fixed: Image, fixed_norm: np.ndarray, moving: Image, moving_norm: np.ndarray,
              threshold: float, device: torch.device, progress: Progress) -> np.ndarray:
        """``T`` (4, 4): fixed world -> moving world. ``*_norm``: ``[0, 1]`` intensities on each image's
        own grid; ``threshold``: their foreground threshold."""
        if self.mode == "none":
            return np.eye(4)
        centred = _translation(fov_centre(moving) - fov_centre(fixed))
        if self.mode == "centre":
            return centred
        moments = _translation(centre_of_mass(moving, moving_norm * (moving_norm > threshold))
                               - centre_of_mass(fixed, fixed_norm * (fixed_norm > threshold)))
        if self.mode == "moments":
            return moments
        fit = AffineFit(fixed, fixed_norm, moving, moving_norm, device)
        starts = (centred, moments)  # both optimised at the coarse level, the better one refined
        with progress.stage("affine", total=(len(starts) + len(LEVELS) - 1) * self.iterations) as step:
            return fit.run(starts, self.iterations, step)


LEVELS = (4, 2)  #: pooling of the MIND features per level of ``affine``, voxels


class AffineFit:
    """12-parameter affine on MIND-SSC features: every start is optimised at the coarse level,
    the one with the lowest cost is refined at the finer levels.

    Parameters (fixed voxels): a matrix ``I + 0.1 P`` about the fixed grid's centre and a
    translation, composed after the start's world translation."""

    def __init__(self, fixed: Image, fixed_norm: np.ndarray, moving: Image, moving_norm: np.ndarray,
                 device: torch.device) -> None:
        self.fixed, self.moving, self.moving_norm, self.device = fixed, moving, moving_norm, device
        self.fix_t = torch.from_numpy(np.ascontiguousarray(fixed_norm, dtype=np.float32)).to(device)[None, None]
        shape = np.asarray(fixed.shape, dtype=np.float64)
        self.centre = torch.tensor((shape - 1) / 2, dtype=torch.float32, device=device).view(1, 3, 1, 1, 1)

    def run(self, starts: tuple[np.ndarray, ...], iterations: int, step: Callable[[int], object]) -> np.ndarray:
        """The world affine fixed -> moving after the multi-start coarse level and the refinement."""
        fixed = self._pooled_mind(self.fix_t)  # encoded once for every start and level
        trials = []
        for start in starts:
            moving = self._pooled_mind(self._moving_on_fixed(start))
            params = torch.zeros(12, dtype=torch.float32, device=self.device)
            cost = self._optimise(fixed[LEVELS[0]], moving[LEVELS[0]], params, LEVELS[0], iterations, step)
            trials.append((cost, start, moving, params))
        _, start, moving, params = min(trials, key=lambda trial: trial[0])
        for level in LEVELS[1:]:
            self._optimise(fixed[level], moving[level], params, level, iterations, step)
        return start @ self.fixed.affine @ self._voxel_affine(params) @ np.linalg.inv(self.fixed.affine)

    def _moving_on_fixed(self, start: np.ndarray) -> torch.Tensor:
        """The moving intensities resampled through ``start`` onto the fixed grid, ``(1, 1, I, J, K)``."""
        to_moving = np.linalg.inv(self.moving.affine) @ start @ self.fixed.affine
        on_fixed = resample_through(self.moving_norm, to_moving, self.fixed.shape)
        return torch.from_numpy(np.ascontiguousarray(on_fixed, dtype=np.float32)).to(self.device)[None, None]

    def _pool(self, level: int) -> tuple[int, ...]:
        """Cell size per axis of ``level`` (an axis of one voxel is not pooled)."""
        return tuple(min(level, n) if n > 1 else 1 for n in self.fixed.shape)

    def _pooled_mind(self, volume: torch.Tensor) -> dict[int, torch.Tensor]:
        """MIND-SSC of ``(1, 1, I, J, K)`` average-pooled for every level: ``{level: (1, 12, cells)}``."""
        from dinoreg.features.mind import mind_ssc

        with torch.no_grad():
            mind = mind_ssc(volume, 1, 2, pool=1)
            return {level: torch.nn.functional.avg_pool3d(mind, self._pool(level), stride=self._pool(level),
                                                          ceil_mode=True) for level in LEVELS}

    def _optimise(self, ff: torch.Tensor, fm: torch.Tensor, params: torch.Tensor, level: int, iterations: int,
                  step: Callable[[int], object]) -> float:
        """Adam on ``params`` (in place) at one level, on the fixed and moving features pooled for
        it; returns the last cost (mean SSD per cell)."""
        from dinoreg.optim.instance import Adam

        cells = tuple(ff.shape[2:])
        scale = torch.tensor(self._pool(level), dtype=torch.float32, device=self.device).view(1, 3, 1, 1, 1)
        offset = (scale - 1) / 2
        rel = ((identity_grid(cells, self.device) * scale + offset) - self.centre).reshape(3, -1)
        optimiser = Adam(params, lr=0.05)
        cost = float("inf")
        for _ in range(iterations):
            leaf = params.detach().requires_grad_(True)
            matrix = torch.eye(3, device=self.device) + 0.1 * leaf[:9].view(3, 3)
            moved = (matrix @ rel).view(1, 3, *cells) + self.centre + leaf[9:].view(1, 3, 1, 1, 1) * scale
            loss = (sample(fm, (moved - offset) / scale, padding_mode="zeros") - ff).pow(2).sum(1).mean()
            loss.backward()
            optimiser.step(leaf.grad)
            cost = float(loss.detach())
            step(1)
        return cost

    def _voxel_affine(self, params: torch.Tensor) -> np.ndarray:
        """The fitted fixed-voxel affine ``(4, 4)``: ``p -> c + M (p - c) + t``."""
        p = params.detach().cpu().double().numpy()
        matrix = np.eye(3) + 0.1 * p[:9].reshape(3, 3)
        c = (np.asarray(self.fixed.shape, dtype=np.float64) - 1) / 2
        vox = np.eye(4)
        vox[:3, :3] = matrix
        vox[:3, 3] = c - matrix @ c + p[9:]
        return vox


def resample_through(moving: np.ndarray, fixed_to_moving_voxel: np.ndarray, shape: tuple[int, ...],
                     order: int = 1) -> np.ndarray:
    """``moving`` sampled at ``fixed_to_moving_voxel @ p`` for every fixed voxel ``p`` (order 1:
    trilinear, float32; 0: nearest, the input dtype; 0 outside)."""
    from scipy.ndimage import affine_transform

    src = np.asarray(moving) if order == 0 else np.asarray(moving, dtype=np.float32)
    return affine_transform(src, fixed_to_moving_voxel[:3, :3], offset=fixed_to_moving_voxel[:3, 3],
                            output_shape=tuple(shape), order=order, mode="constant", cval=0.0,
                            output=src.dtype)


def share_inside(moving_shape: tuple[int, ...], fixed_to_moving_voxel: np.ndarray, fixed_shape: tuple[int, ...]) -> float:
    """Share of fixed voxels (a lattice of at most 16 per axis) whose position falls inside the
    moving field of view (within half a voxel of its outer voxel centres)."""
    axes = [np.linspace(0, n - 1, min(n, 16)) for n in fixed_shape]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    inside = points @ fixed_to_moving_voxel[:3, :3].T + fixed_to_moving_voxel[:3, 3]
    limit = np.asarray(moving_shape, dtype=np.float64) - 0.5
    return float(np.all((inside >= -0.5) & (inside <= limit), axis=1).mean())
