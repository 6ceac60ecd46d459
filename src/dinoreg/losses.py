"""Similarity and regularisation terms, all stateless functions on torch tensors.

Layout: images and feature maps are ``(N, C, *spatial)`` with 2 or 3 spatial axes;
displacement fields are ``(N, D, *spatial)`` in voxel units. Every similarity here is written
as a *loss* (lower is better) and averaged over voxels, so weights are comparable across
image sizes. An optional ``mask`` ``(N, 1, *spatial)`` restricts the average.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype).expand_as(values)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def ssd(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over voxels of the squared distance between feature vectors (summed over channels)."""
    return _masked_mean((fixed - warped).pow(2).sum(1, keepdim=True), mask)


def _box(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Mean over a cube (square) of side ``kernel`` (odd), borders excluded; axes of one voxel
    (a 2D image stored as one slice) are not filtered."""
    pool = F.avg_pool3d if x.ndim == 5 else F.avg_pool2d
    sizes = tuple(1 if n == 1 else kernel for n in x.shape[2:])
    if len(set(sizes)) > 1:
        return pool(x, sizes, stride=1, padding=tuple(k // 2 for k in sizes), count_include_pad=False)
    return pool(x, kernel, stride=1, padding=kernel // 2, count_include_pad=False)


def lcc(fixed: torch.Tensor, warped: torch.Tensor, kernel: int = 5, eps: float = 1e-5,
        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Negative local (windowed) normalised cross-correlation, averaged over channels and voxels.

    ``kernel`` is the odd side length of the cubic window in voxels. Returns a value in
    ``[-1, 0]``: -1 means perfect local linear agreement.
    """
    mf, mw = _box(fixed, kernel), _box(warped, kernel)
    cov = _box(fixed * warped, kernel) - mf * mw
    vf = (_box(fixed * fixed, kernel) - mf * mf).clamp_min(0)
    vw = (_box(warped * warped, kernel) - mw * mw).clamp_min(0)
    cc = cov * cov / (vf * vw + eps)
    return -_masked_mean(cc.mean(1, keepdim=True), mask)


def ncc(fixed: torch.Tensor, warped: torch.Tensor, eps: float = 1e-8,
        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Negative global normalised cross-correlation per sample and channel, averaged (``[-1, 1]``)."""
    dims = tuple(range(2, fixed.ndim))
    if mask is not None:
        m = mask.to(fixed.dtype).expand_as(fixed)
        n = m.sum(dims, keepdim=True).clamp_min(1.0)
        mf = (fixed * m).sum(dims, keepdim=True) / n
        mw = (warped * m).sum(dims, keepdim=True) / n
        f, w = (fixed - mf) * m, (warped - mw) * m
    else:
        f = fixed - fixed.mean(dims, keepdim=True)
        w = warped - warped.mean(dims, keepdim=True)
    num = (f * w).sum(dims)
    den = torch.sqrt((f * f).sum(dims) * (w * w).sum(dims) + eps)
    return -(num / den).mean()


def diffusion(disp: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser: mean squared forward difference of the field along every axis,
    summed over axes (voxel units)."""
    total = disp.new_zeros(())
    for axis in range(2, disp.ndim):
        n = disp.shape[axis]
        if n > 1:
            total = total + (disp.narrow(axis, 1, n - 1) - disp.narrow(axis, 0, n - 1)).pow(2).mean()
    return total


def cosine_distance(feat_f: torch.Tensor, feat_w: torch.Tensor, mask: torch.Tensor | None = None,
                    eps: float = 1e-8) -> torch.Tensor:
    """Cosine dissimilarity of feature maps: ``1 - cos(f_F(x), f_W(x))`` per location (cosine over
    the channel axis of ``(N, C, *spatial)``), averaged over locations. Range ``[0, 2]``."""
    cos = F.cosine_similarity(feat_f, feat_w, dim=1, eps=eps).unsqueeze(1)
    return _masked_mean(1.0 - cos, mask)


def l1_distance(feat_f: torch.Tensor, feat_w: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute difference of feature maps ``(N, C, *spatial)``: averaged over channels
    (``1/C sum_c |f_F - f_W|``, the MAE of Kögl et al.) and then over locations."""
    return _masked_mean((feat_f - feat_w).abs().mean(1, keepdim=True), mask)
