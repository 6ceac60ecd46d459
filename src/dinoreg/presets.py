"""Named settings bundles (``--preset``). Any key can be overridden from the CLI or the API.

Keys:
    features: encoder name, or ``a+b`` for an ensemble (see ``dinoreg.features.registry``).
    grid_sp, disp_hw, coupling, ic: the convex stage (cells of ``grid_sp`` voxels, search
        ``[-disp_hw, disp_hw]`` cells per axis, coupling weights, inverse consistency).
    grid_sp_adam, iterations, lr, lambda_weight, similarity: the Adam stage.
    final_smoothing: odd mean-filter size applied three times to the final field (0 = off).
    Encoder options (``mind_radius``, ``mind_dilation``, ``mind_downsample``, ``mind_pool``, ...)
    are passed on.
"""

from __future__ import annotations

from typing import Any

from dinoreg.errors import DinoregError

PRESETS: dict[str, dict[str, Any]] = {
    # MIND-SSC + ConvexAdam, the reference settings with 50 instead of 80 Adam iterations (the
    # same Dice and TRE on the dev pairs, see the README's benchmark table).
    "mind": dict(features="mind", mind_radius=1, mind_dilation=2, mind_downsample=1, mind_pool=2,
                 grid_sp=6, disp_hw=4, ic=True, grid_sp_adam=2, iterations=50, lr=1.0,
                 lambda_weight=1.25, similarity="ssd", final_smoothing=0),
    # The reference ConvexAdam settings (convexadam 0.2.0 defaults), slower.
    "convexadam": dict(features="mind", mind_radius=1, mind_dilation=2, mind_downsample=1, mind_pool=2,
                       grid_sp=6, disp_hw=4, ic=True, grid_sp_adam=2, iterations=80, lr=1.0,
                       lambda_weight=1.25, similarity="ssd", final_smoothing=0),
    # DINO-Reg with ViT-S/14 (paper: ViT-L, upsample 5.3, every 3rd slice): upsample 3.
    "dinoreg": dict(features="dinov2", arch=None, upsample=3.0, every=3, slice_axis="auto", batch_size=8,
                    pca_components=24, slice_match=True, grid_sp=6, disp_hw=4, ic=True, grid_sp_adam=2,
                    iterations=40, lr=1.0, lambda_weight=5.0, similarity="ssd", final_smoothing=0),
    # CPU-friendly DINO-Reg: coarser patch grid, every 6th slice encoded. (lambda 25 scored better
    # on the dev pairs but no longer recovers a 3-voxel shift of a brain crop; see the README.)
    "dinoreg-fast": dict(features="dinov2", arch=None, upsample=2.0, every=6, slice_axis="auto", batch_size=8,
                         pca_components=24, slice_match=True, grid_sp=6, disp_hw=4, ic=True, grid_sp_adam=2,
                         iterations=40, lr=1.0, lambda_weight=5.0, similarity="ssd", final_smoothing=0),
    # 3D DINO ViT (Kats & Heinrich): one 3D forward pass per image, joint PCA, ConvexAdam.
    "dino3d": dict(features="dino3d", weights=None, window=None, overlap=0.25, pca_components=24, grid_sp=6,
                   disp_hw=4, ic=True, grid_sp_adam=2, iterations=40, lr=1.0, lambda_weight=5.0,
                   similarity="ssd", final_smoothing=0),
    # MIND-SSC + DINOv2 ensemble: DINOv2's slice-match start and a small (0.05) DINOv2 block
    # beside MIND's channels, then the MIND preset's optimiser (see the README's study table).
    "dinoreg-ensemble": dict(features="mind+dinov2", ensemble="concat", ensemble_weights=[1.0, 0.05],
                             mind_radius=1, mind_dilation=2, mind_downsample=1, mind_pool=2, arch=None, upsample=2.0,
                             every=6, slice_axis="auto", batch_size=8, pca_components=24, slice_match=True,
                             grid_sp=6, disp_hw=4, ic=True, grid_sp_adam=2, iterations=50, lr=1.0,
                             lambda_weight=1.25, similarity="ssd", final_smoothing=0),
    # B-spline FFD (Koegl, Reithmeir et al.): (1-alpha) NCC + alpha feature distance + diffusion.
    # alpha 0 is NCC alone; set features (litemedsam, dinov2, sam, medsam) and alpha > 0 to use
    # encoder features of the *warped* moving image in the loss. grid_spacing in mm.
    "ffd": dict(method="ffd", features=None, alpha=0.0, feature_distance="cos", image_distance="ncc",
                grid_spacing=8.0, reg_weight=0.1, iterations=100, lr=0.1, levels=(2, 1), slice_axis="auto",
                slice_stride=1, feature_upsample=1.0, balance=True),
}


def preset(name: str) -> dict[str, Any]:
    """A copy of the named preset; :class:`DinoregError` listing the choices for an unknown name."""
    if name not in PRESETS:
        raise DinoregError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name])
