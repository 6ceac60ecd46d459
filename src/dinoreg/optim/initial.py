"""Initial alignment before the deformable stages (``init``: none, centre, moments, affine).

The result is a world affine ``T`` ``(4, 4)``: fixed world point (RAS mm) -> moving world point.
The pipeline resamples the *original* moving image through ``T`` onto the fixed grid once
(:func:`dinoreg.pipeline.prepare`), the deformable stages run on that, and the Learn2Reg field is
the composite ``p -> A_fixed^-1 T A_fixed (p + u(p))`` (:func:`dinoreg.spatial.world.compose_world_affine`).

* ``centre``: the centres of the two fields of view coincide.
* ``moments``: the intensity centres of mass of the two foregrounds coincide.
* ``affine``: 12 parameters (a 3x3 matrix about the fixed grid's centre + a translation, in
  fixed voxels) from the ``moments`` start, Adam on the SSD of MIND-SSC features, two levels
  (features pooled by 4 then 2 voxels).
"""

from __future__ import annotations

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
        if self.mode == "centre":
            return _translation(fov_centre(moving) - fov_centre(fixed))
        start = _translation(centre_of_mass(moving, moving_norm * (moving_norm > threshold))
                             - centre_of_mass(fixed, fixed_norm * (fixed_norm > threshold)))
        if self.mode == "moments":
            return start
        with progress.stage("affine", total=2 * self.iterations) as step:
            return self._affine(fixed, fixed_norm, moving, moving_norm, start, device, step)

    def _affine(self, fixed: Image, fixed_norm: np.ndarray, moving: Image, moving_norm: np.ndarray,
                start: np.ndarray, device: torch.device, step) -> np.ndarray:
        from dinoreg.features.mind import mind_ssc
        from dinoreg.optim.instance import Adam

        # the moving image through the start transform on the fixed grid (only for the search)
        to_moving = np.linalg.inv(moving.affine) @ start @ fixed.affine
        on_fixed = resample_through(moving_norm, to_moving, fixed.shape)
        shape = np.asarray(fixed.shape, dtype=np.float64)
        centre = torch.tensor((shape - 1) / 2, dtype=torch.float32, device=device).view(1, 3, 1, 1, 1)
        params = torch.zeros(12, dtype=torch.float32, device=device)
        fix_t = torch.from_numpy(np.ascontiguousarray(fixed_norm, dtype=np.float32)).to(device)[None, None]
        mov_t = torch.from_numpy(np.ascontiguousarray(on_fixed, dtype=np.float32)).to(device)[None, None]
        for level in (4, 2):
            pool = tuple(min(level, n) if n > 1 else 1 for n in fixed.shape)
            with torch.no_grad():
                ff = mind_ssc(fix_t, 1, 2, pool=1)
                fm = mind_ssc(mov_t, 1, 2, pool=1)
                ff = torch.nn.functional.avg_pool3d(ff, pool, stride=pool, ceil_mode=True)
                fm = torch.nn.functional.avg_pool3d(fm, pool, stride=pool, ceil_mode=True)
            cells = tuple(ff.shape[2:])
            scale = torch.tensor(pool, dtype=torch.float32, device=device).view(1, 3, 1, 1, 1)
            offset = (scale - 1) / 2
            points = identity_grid(cells, device) * scale + offset  # fixed voxels of the cell centres
            optimiser = Adam(params, lr=0.05)
            for _ in range(self.iterations):
                leaf = params.detach().requires_grad_(True)
                matrix = torch.eye(3, device=device) + 0.1 * leaf[:9].view(3, 3)
                shift = leaf[9:].view(1, 3, 1, 1, 1) * scale
                rel = (points - centre).reshape(3, -1)
                moved = (matrix @ rel).view(1, 3, *cells) + centre + shift
                warped = sample(fm, (moved - offset) / scale, padding_mode="zeros")
                loss = (warped - ff).pow(2).sum(1).mean()
                loss.backward()
                optimiser.step(leaf.grad)
                step(1)
        p = params.detach().cpu().double().numpy()
        matrix = np.eye(3) + 0.1 * p[:9].reshape(3, 3)
        c = (shape - 1) / 2
        vox = np.eye(4)
        vox[:3, :3] = matrix
        vox[:3, 3] = c - matrix @ c + p[9:]
        return start @ fixed.affine @ vox @ np.linalg.inv(fixed.affine)


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
