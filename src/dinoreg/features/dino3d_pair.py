"""3D DINO features for a pair (Kats & Heinrich): one 3D ViT pass per image (sliding windows),
joint foreground-masked PCA, then the same ConvexAdam as every other encoder.

Options (preset keys): ``weights`` (safetensors checkpoint; default: the one shipped with
dinoreg), ``window``, ``overlap``, ``pca_components``.
"""

from __future__ import annotations

from functools import lru_cache

from dinoreg.features.dinov2_pair import mask_on_grid, unit_scale
from dinoreg.features.pca import joint_pca
from dinoreg.features.registry import EncodeRequest, PairFeatures, register_encoder
from dinoreg.cache import cached
from dinoreg.features.vit3d import SHIPPED_WEIGHTS, Dino3DEncoder


@lru_cache(maxsize=2)
def cached_encoder(weights: str | None, device: str, window: int | None, overlap: float) -> Dino3DEncoder:
    """Load a dino3d checkpoint once per process."""
    return Dino3DEncoder.from_file(weights, window=window, overlap=overlap, device=device)


@register_encoder("dino3d")
def dino3d_pair(req: EncodeRequest) -> PairFeatures:
    """Features of both images from one 3D ViT each, reduced by a joint masked PCA."""
    opts = req.options
    window = opts.get("window")
    encoder = cached_encoder(opts.get("weights"), str(req.device), None if window is None else int(window),
                             float(opts.get("overlap", 0.5)))
    images = (("fixed", req.fixed),) if req.moving is req.fixed else (("fixed", req.fixed), ("moving", req.moving))
    feats = []
    with req.progress.stage("dino3d", total=len(images)) as step:
        for _, array in images:
            settings = dict(window=encoder.window, overlap=encoder.overlap, blend=encoder.blend)
            feats.append(cached(array, "dino3d", settings, opts.get("weights") or SHIPPED_WEIGHTS,
                                lambda a=array: encoder.encode(a), req.device).to(req.device).float())
            step(1)
    fixed, moving = feats[0], feats[-1]
    fmask = mask_on_grid(req.fixed_mask, tuple(fixed.shape[1:])).to(fixed.device)
    mmask = mask_on_grid(req.moving_mask, tuple(moving.shape[1:])).to(moving.device)
    k = min(int(opts.get("pca_components", 24)), fixed.shape[0])
    pf, pm, _ = joint_pca(fixed, moving, k, fixed_mask=fmask, moving_mask=mmask)
    scale = unit_scale(pf, pm, fmask, mmask)
    return PairFeatures((pf * scale)[None], (pm * scale)[None])
