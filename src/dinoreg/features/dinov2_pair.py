"""DINO-Reg features for a pair (Song, Xu, Yan, MICCAI 2024).

Both images are encoded slice by slice with a frozen DINOv2 (``features.slicewise``), reduced
jointly to ``pca_components`` channels by a PCA fitted on the foreground tokens of both
(``features.pca``), and scaled so the mean squared feature norm over the foreground is 1 (so the
regulariser weight means the same whatever the encoder). The per-slice cls tokens give the
slice-match translation along the slicing axis (``optim.slice_match``), used as the initial field.

Options (preset keys): ``arch`` (``vits14``...), ``weights``, ``upsample``, ``every``,
``slice_axis`` (``auto`` = axial from the affine), ``batch_size``, ``pca_components``,
``slice_match`` (bool).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from dinoreg.features.dinov2 import DINOv2, load_dinov2
from dinoreg.features.pca import joint_pca
from dinoreg.features.registry import EncodeRequest, PairFeatures, register_encoder
from dinoreg.features.slicewise import SliceFeatures, default_slice_axis, encode_volume
from dinoreg.optim.slice_match import match_slices


@lru_cache(maxsize=2)
def cached_model(arch: str | None, weights: str | None, device: str) -> DINOv2:
    """Load a DINOv2 once per process (weights resolved as ``features.weights`` describes)."""
    return load_dinov2(arch, weights, device=device)


def slice_axis(option: object, affine: np.ndarray) -> int:
    """``auto`` -> the array axis closest to superior-inferior; else the given axis 0-2."""
    if option in (None, "auto"):
        return default_slice_axis(affine)
    return int(option)  # type: ignore[arg-type]


def mask_on_grid(mask: np.ndarray, grid: tuple[int, int, int]) -> torch.Tensor:
    """Fraction of foreground voxels in each feature cell > 0.5 (boolean ``grid``)."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    frac = torch.nn.functional.adaptive_avg_pool3d(t, grid)[0, 0]
    return frac > 0.5 if bool((frac > 0.5).any()) else frac > 0


def unit_scale(fixed: torch.Tensor, moving: torch.Tensor, fmask: torch.Tensor, mmask: torch.Tensor) -> float:
    """Factor making the mean squared feature norm over both foregrounds equal to 1."""
    sq = torch.cat([fixed.pow(2).sum(0)[fmask], moving.pow(2).sum(0)[mmask]])
    return float(1.0 / torch.sqrt(sq.mean().clamp_min(1e-12)))


def encode_cached(array: np.ndarray, encoder: DINOv2, axis: int, opts: dict, device: torch.device,
                  progress: bool) -> SliceFeatures:
    """:func:`encode_volume`, through the active feature cache (``dinoreg.cache``) when there is
    one: the volume and the per-slice (cls, foreground, index) table are stored under keys made
    of the image content, the encoder settings and the weights file."""
    from dinoreg.cache import cached

    settings = dict(arch=encoder.name, axis=axis, upsample=float(opts.get("upsample", 3.0)),
                    every=int(opts.get("every", 3)))
    computed: list[SliceFeatures] = []

    def compute() -> SliceFeatures:
        if not computed:
            computed.append(encode_volume(array, encoder, axis, upsample=settings["upsample"],
                                          every=settings["every"], batch_size=int(opts.get("batch_size", 8)),
                                          device=device, progress=progress))
        return computed[0]

    def table() -> torch.Tensor:
        f = compute()
        cls = f.cls if f.cls is not None else torch.zeros(len(f.slice_indices), 0)
        return torch.cat([cls.float().cpu(), f.foreground.float().cpu()[:, None],
                          f.slice_indices.float().cpu()[:, None]], 1)

    weights = opts.get("weights")
    features = cached(array, "dinov2/features", settings, weights, lambda: compute().features, device)
    rows = cached(array, "dinov2/slices", settings, weights, table)
    return SliceFeatures(features.to(device).float(), rows[:, :-2].to(device) if rows.shape[1] > 2 else None,
                         rows[:, -1].long(), rows[:, -2], axis, tuple(array.shape), settings["every"])


def encode_pair_slices(req: EncodeRequest, encoder: object) -> tuple[SliceFeatures, SliceFeatures]:
    """Slicewise features of both images with the request's options (encoded once when the
    request carries the same array twice, as ``dinoreg encode`` does)."""
    opts = req.options
    axis = slice_axis(opts.get("slice_axis", "auto"), req.affine)
    out = []
    images = (("fixed", req.fixed),) if req.moving is req.fixed else (("fixed", req.fixed), ("moving", req.moving))
    for name, array in images:
        with req.progress.stage(f"DINOv2 {name}"):
            out.append(encode_cached(array, encoder, axis, opts, req.device, req.progress.enabled))  # type: ignore[arg-type]
    return out[0], out[-1]


def translation_field(translation: np.ndarray, shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """A constant ``(1, 3, I, J, K)`` field holding ``translation`` (voxels, i/j/k)."""
    t = torch.as_tensor(np.asarray(translation, dtype=np.float32), device=device)
    return t.view(1, 3, 1, 1, 1).expand(1, 3, *shape).contiguous()


@register_encoder("dinov2")
def dinov2_pair(req: EncodeRequest) -> PairFeatures:
    """DINO-Reg pair features: slicewise DINOv2, joint masked PCA, slice-match start."""
    opts = req.options
    model = cached_model(opts.get("arch"), opts.get("weights"), str(req.device))
    fixed, moving = encode_pair_slices(req, model)
    fmask = mask_on_grid(req.fixed_mask, fixed.grid_shape).to(fixed.features.device)
    mmask = mask_on_grid(req.moving_mask, moving.grid_shape).to(moving.features.device)
    k = int(opts.get("pca_components", 24))
    pf, pm, _ = joint_pca(fixed.features, moving.features, k, fixed_mask=fmask, moving_mask=mmask,
                          seed=int(opts.get("seed", 0)))
    scale = unit_scale(pf, pm, fmask, mmask)
    init = None
    if bool(opts.get("slice_match", True)) and fixed.cls is not None:
        match = match_slices(fixed, moving, n_pairs=int(opts.get("slice_match_pairs", 10)))
        if np.abs(match.translation).max() > 0:
            init = translation_field(match.translation, req.fixed.shape, req.device)
        req.progress.log(f"slice match: translation {np.round(match.translation, 1).tolist()} voxels")
    return PairFeatures((pf * scale)[None], (pm * scale)[None], init)
