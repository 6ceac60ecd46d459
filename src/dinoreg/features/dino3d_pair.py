"""3D DINO features for a pair (Kats & Heinrich): one 3D ViT pass per image (sliding windows),
joint foreground-masked PCA, then the same methods as every other encoder. Settings:
:class:`Dino3DSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

from dinoreg.cache import cached
from dinoreg.features.base import EncodeRequest, EncoderSpec, PairFeatures
from dinoreg.features.pca import joint_pca
from dinoreg.features.registry import volume_encoder
from dinoreg.features.slicewise_pair import mask_on_grid, unit_scale
from dinoreg.features.vit3d import SHIPPED_WEIGHTS, Dino3DEncoder
from dinoreg.spec import setting


@dataclass(frozen=True)
class Dino3DSpec(EncoderSpec):
    """Settings of the 3D ViT encoder."""

    name: ClassVar[str] = "dino3d"
    weights: str | None = setting(None, "dino3d safetensors checkpoint (default: the one shipped with dinoreg)")
    window: int | None = setting(None, "sliding-window side, voxels (default: the training crop)", low=8)
    overlap: float = setting(0.25, "sliding-window overlap fraction", low=0.0, high=1.0, high_open=True)
    pca_components: int = setting(24, "channels kept by the joint foreground PCA", low=1, high=4096)


@lru_cache(maxsize=2)
def cached_encoder(weights: str | None, device: str, window: int | None, overlap: float) -> Dino3DEncoder:
    """Load a dino3d checkpoint once per process."""
    return Dino3DEncoder.from_file(weights, window=window, overlap=overlap, device=device)


@volume_encoder("dino3d", Dino3DSpec, "3D ViT trained by dinoreg with DINO + iBOT (Kats & Heinrich)")
def dino3d_pair(req: EncodeRequest) -> PairFeatures:
    """Features of both images from one 3D ViT each, reduced by a joint masked PCA."""
    spec: Dino3DSpec = req.spec  # type: ignore[assignment]
    encoder = cached_encoder(spec.weights, str(req.device), spec.window, spec.overlap)
    images = req.images()
    feats = []
    with req.progress.stage("dino3d", total=len(images)) as step:
        for _, array in images:
            settings = dict(window=encoder.window, overlap=encoder.overlap, blend=encoder.blend)
            feats.append(cached(array, "dino3d", settings, spec.weights or SHIPPED_WEIGHTS,
                                lambda a=array: encoder.encode(a), req.device).to(req.device).float())
            step(1)
    fixed, moving = feats[0], feats[-1]
    fmask = mask_on_grid(req.fixed_mask, tuple(fixed.shape[1:])).to(fixed.device)
    mmask = mask_on_grid(req.moving_mask, tuple(moving.shape[1:])).to(moving.device)
    k = min(spec.pca_components, fixed.shape[0])
    pf, pm, _ = joint_pca(fixed, moving, k, fixed_mask=fmask, moving_mask=mmask, seed=req.seed)
    scale = unit_scale(pf, pm, fmask, mmask)
    return PairFeatures((pf * scale)[None], (pm * scale)[None])
