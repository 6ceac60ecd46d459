"""Joint, foreground-masked, low-rank PCA of two feature volumes (DINO-Reg Eq. 1).

The fixed and moving feature volumes ``(C, I', J', K')`` are reduced to ``k`` channels (24 in
DINO-Reg) with **one** basis fitted on the foreground feature voxels of both, so that the
reduced channels mean the same thing in both volumes. Fitting on the foreground only keeps the
dominant components from describing "body versus air". The basis comes from a randomized
low-rank SVD (Halko et al. 2011, ``torch.svd_lowrank``) with a fixed seed, so results are
reproducible.

Conventions:

* **Centre**: the mean of the fitting tokens is subtracted before projecting.
* **Scale**: projections are *not* whitened; reduced channel ``c`` is
  ``components[c] . (x - mean)``, in the encoder's feature units; channel 0 has the largest
  variance. ``explained_variance`` is ``S**2 / (N - 1)`` of the fitting tokens.
* **Sign**: each component is flipped so that its entry of largest magnitude is positive
  (independent of token order and of the random sketch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dinoreg.errors import DinoregError

DEFAULT_THRESHOLD = 0.05


@dataclass
class PCABasis:
    """A fitted PCA basis.

    Attributes:
        mean: ``(C,)`` mean of the fitting tokens.
        components: ``(k, C)`` orthonormal rows, by decreasing variance, sign-normalised.
        explained_variance: ``(k,)`` variance of the fitting tokens along each component.
    """

    mean: torch.Tensor
    components: torch.Tensor
    explained_variance: torch.Tensor

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        """``(C, *grid)`` -> ``(k, *grid)`` (centred, unwhitened projection)."""
        flat = features.reshape(features.shape[0], -1).to(self.components)
        shift = self.components @ self.mean
        out = self.components @ flat - shift[:, None]
        return out.reshape(self.components.shape[0], *features.shape[1:])


def foreground_mask(volume: np.ndarray | torch.Tensor, grid_shape: tuple[int, ...],
                    threshold: float = DEFAULT_THRESHOLD, min_fraction: float = 0.5) -> torch.Tensor:
    """Boolean mask on a feature grid from image intensities.

    A feature voxel is foreground when at least ``min_fraction`` of the image voxels it covers
    are brighter than ``threshold`` (image scaled to ``[0, 1]``). The covered voxels are those
    of the cell-centred mapping, computed as an area average (``adaptive_avg_pool``).

    Args:
        volume: ``(I, J, K)`` image.
        grid_shape: ``(I', J', K')`` of the feature volume over the same field of view.
    """
    vol = torch.as_tensor(np.asarray(volume) if not torch.is_tensor(volume) else volume)
    bright = (vol.float() > threshold).float()[None, None]
    frac = F.interpolate(bright, size=tuple(int(s) for s in grid_shape), mode="area")[0, 0]
    return frac >= min_fraction


def _check_mask(mask: torch.Tensor | None, features: torch.Tensor, which: str) -> torch.Tensor:
    if mask is None:
        return torch.ones(features.shape[1:], dtype=torch.bool, device=features.device)
    mask = torch.as_tensor(mask, device=features.device).bool()
    if tuple(mask.shape) != tuple(features.shape[1:]):
        raise DinoregError(f"{which} mask shape {tuple(mask.shape)} does not match its feature "
                           f"grid {tuple(features.shape[1:])}")
    return mask


def _sign_normalise(components: torch.Tensor) -> torch.Tensor:
    """Flip rows so that each row's largest-magnitude entry is positive."""
    idx = components.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(components.gather(1, idx))
    signs[signs == 0] = 1
    return components * signs


def fit_pca(tokens: torch.Tensor, k: int = 24, *, seed: int = 0, niter: int = 4,
            oversample: int = 8) -> PCABasis:
    """Randomized low-rank PCA of ``tokens`` ``(N, C)`` to ``k`` components (fixed seed)."""
    n, c = tokens.shape
    if k < 1 or k > min(n, c):
        raise DinoregError(f"cannot fit {k} principal components to {n} tokens of {c} channels")
    tokens = tokens.float()
    mean = tokens.mean(0)
    centred = tokens - mean
    q = min(k + oversample, n, c)
    devices = [tokens.device] if tokens.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        _, s, v = torch.svd_lowrank(centred, q=q, niter=niter)
    components = _sign_normalise(v[:, :k].T.contiguous())
    return PCABasis(mean, components, s[:k] ** 2 / max(n - 1, 1))


def _masked_tokens(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(N_fg, C)`` feature vectors at the mask's true voxels."""
    return features.reshape(features.shape[0], -1)[:, mask.reshape(-1)].T


def joint_pca(fixed: torch.Tensor, moving: torch.Tensor, k: int = 24, *,
              fixed_mask: torch.Tensor | None = None, moving_mask: torch.Tensor | None = None,
              seed: int = 0, max_tokens: int | None = 200_000
              ) -> tuple[torch.Tensor, torch.Tensor, PCABasis]:
    """Reduce two feature volumes with one PCA fitted on their foreground.

    Args:
        fixed, moving: ``(C, *grid)`` feature volumes (grids may differ; channels must match).
        k: number of output channels.
        fixed_mask, moving_mask: boolean ``grid``-shaped foreground masks (see
            :func:`foreground_mask`); None uses every feature voxel.
        seed: seed of the token subsample and of the randomized SVD.
        max_tokens: fit on at most this many foreground tokens (a seeded random subset);
            None uses all.

    Returns:
        ``(fixed_reduced (k, *grid_f), moving_reduced (k, *grid_m), basis)``; every feature voxel
        is projected, not only the foreground.
    """
    if fixed.shape[0] != moving.shape[0]:
        raise DinoregError(f"fixed and moving features have {fixed.shape[0]} and "
                           f"{moving.shape[0]} channels; encode both with the same encoder")
    fmask = _check_mask(fixed_mask, fixed, "fixed")
    mmask = _check_mask(moving_mask, moving, "moving")
    basis = fit_joint_pca([(fixed, fmask), (moving, mmask)], k, seed=seed, max_tokens=max_tokens)
    return basis.transform(fixed), basis.transform(moving), basis


def fit_joint_pca(volumes: Sequence[tuple[torch.Tensor, torch.Tensor]], k: int = 24, *, seed: int = 0,
                  max_tokens: int | None = 200_000) -> PCABasis:
    """One PCA basis fitted on the foreground tokens of several feature volumes together.

    Args:
        volumes: ``(features (C, *grid), boolean mask (*grid))`` pairs; grids may differ, channels
            must match (e.g. both images encoded along each of three axes).
        k, seed, max_tokens: as :func:`joint_pca`.
    """
    if not any(bool(mask.any()) for _, mask in volumes):
        raise DinoregError("PCA foreground mask is empty in both images; lower the foreground "
                           "threshold or check the intensity scaling")
    tokens = torch.cat([_masked_tokens(features, mask) for features, mask in volumes])
    if max_tokens is not None and tokens.shape[0] > max_tokens:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(tokens.shape[0], generator=gen)[:max_tokens].to(tokens.device)
        tokens = tokens[pick]
    return fit_pca(tokens, k, seed=seed)
