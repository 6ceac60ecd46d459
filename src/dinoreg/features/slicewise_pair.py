"""Any 2D encoder as a pair encoder: DINO-Reg's slicewise features (Song, Xu, Yan, MICCAI 2024).

Both images are encoded slice by slice with a frozen 2D network (``features.slicewise``),
reduced jointly to ``pca_components`` channels by a PCA fitted on the foreground tokens of both
(``features.pca``), and scaled so the mean squared feature norm over the foreground is 1 (so the
regulariser weight means the same whatever the encoder). When the network has a global token,
the per-slice tokens give the slice-match translation along the slicing axis
(``features.slice_match``), used as the initial field. Settings: :class:`SlicewiseSpec`.

Every slice encoder registered with ``@slice_encoder`` (``features.registry``) reaches the
feature-volume methods through :func:`slicewise_pair`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from dinoreg.features.base import Encoder2D, EncodeRequest, EncoderSpec, PairFeatures, SlicewiseSpec
from dinoreg.features.pca import joint_pca
from dinoreg.features.slice_match import match_slices
from dinoreg.features.slicewise import SliceFeatures, default_slice_axis, encode_volume


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


def encode_cached(array: np.ndarray, encoder: Encoder2D, axis: int, spec: SlicewiseSpec, device: torch.device,
                  progress: bool) -> SliceFeatures:
    """:func:`encode_volume`, through the active feature cache (``dinoreg.cache``) when there is
    one: the volume and the per-slice (cls, foreground, index) table are stored under keys made
    of the image content, the encoder settings and the weights file."""
    from dinoreg.cache import cached

    settings = dict(arch=encoder.name, axis=axis, upsample=float(spec.upsample), every=int(spec.every))
    if spec.patch_grid is not None:
        settings["grid"] = list(spec.patch_grid)
    computed: list[SliceFeatures] = []

    def compute() -> SliceFeatures:
        if not computed:
            computed.append(encode_volume(array, encoder, axis, upsample=spec.upsample, every=spec.every,
                                          batch_size=spec.batch_size, device=device, progress=progress,
                                          grid=spec.patch_grid))
        return computed[0]

    def table() -> torch.Tensor:
        f = compute()
        cls = f.cls if f.cls is not None else torch.zeros(len(f.slice_indices), 0)
        return torch.cat([cls.float().cpu(), f.foreground.float().cpu()[:, None],
                          f.slice_indices.float().cpu()[:, None]], 1)

    prefix = "dinov2" if encoder.name.startswith("dinov2") else encoder.name
    features = cached(array, f"{prefix}/features", settings, spec.weights, lambda: compute().features, device)
    rows = cached(array, f"{prefix}/slices", settings, spec.weights, table)
    return SliceFeatures(features.to(device).float(), rows[:, :-2].to(device) if rows.shape[1] > 2 else None,
                         rows[:, -1].long(), rows[:, -2], axis, tuple(array.shape), spec.every)


def encode_pair_slices(req: EncodeRequest, encoder: Encoder2D) -> tuple[SliceFeatures, SliceFeatures]:
    """Slicewise features of both images with the request's settings (encoded once when the
    request carries the same array twice, as ``dinoreg encode`` does)."""
    spec: SlicewiseSpec = req.spec  # type: ignore[assignment]
    axis = slice_axis(spec.slice_axis, req.affine)
    out = []
    for name, array in req.images():
        with req.progress.stage(f"{encoder.name} {name}"):
            out.append(encode_cached(array, encoder, axis, spec, req.device, req.progress.enabled))
    return out[0], out[-1]


def translation_field(translation: np.ndarray, shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """A constant ``(1, 3, I, J, K)`` field holding ``translation`` (voxels, i/j/k)."""
    t = torch.as_tensor(np.asarray(translation, dtype=np.float32), device=device)
    return t.view(1, 3, 1, 1, 1).expand(1, 3, *shape).contiguous()


def slicewise_pair(loader: Callable[[EncoderSpec, str], Encoder2D], req: EncodeRequest) -> PairFeatures:
    """Pair features from a 2D network: slicewise encoding, joint masked PCA, slice-match start."""
    spec: SlicewiseSpec = req.spec  # type: ignore[assignment]
    model = loader(spec, str(req.device))
    fixed, moving = encode_pair_slices(req, model)
    fmask = mask_on_grid(req.fixed_mask, fixed.grid_shape).to(fixed.features.device)
    mmask = mask_on_grid(req.moving_mask, moving.grid_shape).to(moving.features.device)
    k = min(spec.pca_components, fixed.features.shape[0])
    pf, pm, _ = joint_pca(fixed.features, moving.features, k, fixed_mask=fmask, moving_mask=mmask, seed=req.seed)
    scale = unit_scale(pf, pm, fmask, mmask)
    init = None
    if spec.slice_match and fixed.cls is not None:
        match = match_slices(fixed, moving, n_pairs=spec.slice_match_pairs)
        if np.abs(match.translation).max() > 0:
            init = translation_field(match.translation, req.fixed.shape, req.device)
        req.progress.log(f"slice match: translation {np.round(match.translation, 1).tolist()} voxels")
    return PairFeatures((pf * scale)[None], (pm * scale)[None], init)
