"""Random 3D views for DINO pretraining (multi-crop), in torch, driven by one seeded generator.

One *sample* picks a volume and a centre (preferably inside the foreground) and returns
``2`` global views ``(1, G, G, G)`` and ``n_local`` local views ``(1, L, L, L)`` around it.
Each view is resampled straight from the whole volume in one ``grid_sample`` call through an
affine map built from a scale (physical side / output side), a small rotation, per-axis flips
and a random offset; voxels outside the volume read 0. Then an intensity transform: contrast
scaling, gamma, additive Gaussian noise.

All randomness comes from the ``torch.Generator`` passed in, so a run is reproducible from the
generator's state (saved in training checkpoints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dinoreg.spatial.grid import identity_grid, sample


@dataclass(frozen=True)
class AugmentConfig:
    """Multi-crop parameters (sizes in voxels of the output views).

    Attributes:
        global_size: edge ``G`` of the two global views (multiple of the patch size).
        local_size: edge ``L`` of the local views (multiple of the patch size).
        n_local: local views per sample (0 disables them).
        global_scale: range of input-voxels-per-output-voxel for global views (``>1`` zooms out).
        local_scale: same for local views.
        global_jitter: max offset of a global view's centre, as a fraction of its input side.
        max_rotation_deg: max absolute rotation about each axis, degrees.
        flip_prob: probability of mirroring each axis (independently per view).
        contrast: range of the multiplicative intensity factor.
        gamma: range of the gamma exponent (sampled log-uniformly).
        noise_std: max standard deviation of additive Gaussian noise (sampled uniformly).
        foreground_prob: probability of centring a sample on a foreground voxel (> 0.05).
    """

    global_size: int = 32
    local_size: int = 16
    n_local: int = 4
    global_scale: tuple[float, float] = (0.8, 1.6)
    local_scale: tuple[float, float] = (0.6, 1.2)
    global_jitter: float = 0.15
    max_rotation_deg: float = 10.0
    flip_prob: float = 0.5
    contrast: tuple[float, float] = (0.8, 1.2)
    gamma: tuple[float, float] = (0.7, 1.5)
    noise_std: float = 0.03
    foreground_prob: float = 0.9


def uniform(gen: torch.Generator, low: float, high: float, n: int = 1) -> torch.Tensor:
    """``n`` float64 samples from ``U(low, high)``."""
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """``(3, 3)`` rotation from three angles (radians) about the ``i``, ``j``, ``k`` axes."""
    mats = []
    for axis, a in enumerate(angles.tolist()):
        c, s = math.cos(a), math.sin(a)
        m = torch.eye(3, dtype=torch.float64)
        u, v = [x for x in range(3) if x != axis]
        m[u, u], m[u, v], m[v, u], m[v, v] = c, -s, s, c
        mats.append(m)
    return mats[0] @ mats[1] @ mats[2]


def view_matrix(gen: torch.Generator, scale: tuple[float, float], max_rot_deg: float,
                flip_prob: float) -> torch.Tensor:
    """Random ``(3, 3)`` linear map from output-view offsets to input-voxel offsets."""
    s = float(uniform(gen, *scale))
    angles = uniform(gen, -max_rot_deg, max_rot_deg, 3) * math.pi / 180.0
    flips = torch.where(torch.rand(3, generator=gen, dtype=torch.float64) < flip_prob, -1.0, 1.0)
    return s * rotation_matrix(angles) @ torch.diag(flips.to(torch.float64))


def crop(volume: torch.Tensor, centre: torch.Tensor, matrix: torch.Tensor, size: int) -> torch.Tensor:
    """Resample a cubic view: output voxel ``q`` reads input ``centre + matrix @ (q - (size-1)/2)``.

    Args:
        volume: ``(I, J, K)`` float32.
        centre: ``(3,)`` voxel coordinates ``(i, j, k)`` of the view centre.
        matrix: ``(3, 3)`` float64 linear map.
        size: output edge.

    Returns:
        ``(1, size, size, size)``; outside the volume reads 0 (trilinear inside).
    """
    q = identity_grid((size, size, size), dtype=torch.float64)[0].reshape(3, -1) - (size - 1) / 2.0
    coords = (matrix @ q + centre.reshape(3, 1).to(torch.float64)).reshape(1, 3, size, size, size)
    return sample(volume[None, None], coords.float(), mode="bilinear", padding_mode="zeros")[0]


def intensity(view: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Contrast scaling, gamma and Gaussian noise on a view in ``[0, 1]``."""
    gamma = math.exp(float(uniform(gen, math.log(cfg.gamma[0]), math.log(cfg.gamma[1]))))
    factor = float(uniform(gen, *cfg.contrast))
    out = view.clamp(0.0, 1.0).pow(gamma) * factor
    std = float(uniform(gen, 0.0, cfg.noise_std))
    noise = torch.randn(view.shape, generator=gen, dtype=torch.float32)
    return out + std * noise


def foreground_points(volume: torch.Tensor, step: int = 4, threshold: float = 0.05) -> torch.Tensor:
    """Voxel coordinates ``(M, 3)`` (long) of foreground voxels on a ``step``-subsampled grid."""
    pts = (volume[::step, ::step, ::step] > threshold).nonzero() * step
    return pts if len(pts) else torch.zeros(1, 3, dtype=torch.long)


def sample_centre(gen: torch.Generator, volume: torch.Tensor, fg: torch.Tensor, fg_prob: float) -> torch.Tensor:
    """A view centre ``(3,)`` float64: a random foreground point (prob ``fg_prob``) or any voxel."""
    if float(torch.rand(1, generator=gen)) < fg_prob:
        idx = int(torch.randint(len(fg), (1,), generator=gen))
        return fg[idx].to(torch.float64)
    shape = torch.tensor(volume.shape, dtype=torch.float64)
    return torch.rand(3, generator=gen, dtype=torch.float64) * (shape - 1)


def multi_crop(volume: torch.Tensor, fg: torch.Tensor, gen: torch.Generator,
               cfg: AugmentConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two global and ``n_local`` local views of one volume (see module docstring)."""
    centre = sample_centre(gen, volume, fg, cfg.foreground_prob)
    globals_, locals_ = [], []
    for _ in range(2):
        m = view_matrix(gen, cfg.global_scale, cfg.max_rotation_deg, cfg.flip_prob)
        side = float(m.abs().sum(0).max()) * cfg.global_size
        offset = uniform(gen, -cfg.global_jitter, cfg.global_jitter, 3) * side
        globals_.append(intensity(crop(volume, centre + offset, m, cfg.global_size), gen, cfg))
    for _ in range(cfg.n_local):
        m = view_matrix(gen, cfg.local_scale, cfg.max_rotation_deg, cfg.flip_prob)
        offset = uniform(gen, -0.5, 0.5, 3) * cfg.global_size * cfg.global_scale[0]
        locals_.append(intensity(crop(volume, centre + offset, m, cfg.local_size), gen, cfg))
    return globals_, locals_


def make_batch(volumes: list[torch.Tensor], fgs: list[torch.Tensor], weights: torch.Tensor,
               batch_size: int, gen: torch.Generator, cfg: AugmentConfig
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A training batch, view-major (all first global views, then all second ones).

    Args:
        volumes: preprocessed ``(I, J, K)`` volumes in ``[0, 1]``.
        fgs: their :func:`foreground_points`.
        weights: sampling probability of each volume (any positive scale).
        batch_size: samples (volumes drawn with replacement) per batch.

    Returns:
        ``(globals (2B, 1, G, G, G), locals (n_local*B, 1, L, L, L) or None)``.
    """
    picks = torch.multinomial(weights.double(), batch_size, replacement=True, generator=gen).tolist()
    views = [multi_crop(volumes[i], fgs[i], gen, cfg) for i in picks]
    g = torch.stack([v[0][n] for n in range(2) for v in views])
    if cfg.n_local == 0:
        return g, None
    loc = torch.stack([v[1][n] for n in range(cfg.n_local) for v in views])
    return g, loc
