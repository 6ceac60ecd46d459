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

import math
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from dinoreg.features.base import Encoder2D, EncodeRequest, EncoderSpec, PairFeatures, SlicewiseSpec
from dinoreg.features.pca import fit_joint_pca
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
    frac = F.adaptive_avg_pool3d(t, grid)[0, 0]
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


def physical_slicing(spec: SlicewiseSpec, affine: np.ndarray, axis: int, patch_size: int) -> SlicewiseSpec:
    """``spec`` with ``upsample`` / ``every`` set from ``token_mm`` / ``every_mm`` (when given) for
    slices along ``axis`` of a grid with voxel-to-mm ``affine``: the same physical token size and
    slice distance whatever the voxel size (in-plane spacing: the mean of the two in-plane axes)."""
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    changes: dict[str, object] = {}
    if spec.token_mm is not None:
        in_plane = float(np.mean([spacing[a] for a in range(3) if a != axis]))
        changes["upsample"] = min(16.0, patch_size * in_plane / spec.token_mm)
    if spec.every_mm is not None:
        changes["every"] = max(1, int(round(spec.every_mm / float(spacing[axis]))))
    return replace(spec, **changes) if changes else spec


def encode_pair_slices(req: EncodeRequest, encoder: Encoder2D, axis: int | None = None
                       ) -> tuple[SliceFeatures, SliceFeatures]:
    """Slicewise features of both images along ``axis`` (default: the spec's slicing axis), with
    the request's settings (encoded once when the request carries the same array twice, as
    ``dinoreg encode`` does)."""
    spec: SlicewiseSpec = req.spec  # type: ignore[assignment]
    axis = slice_axis(spec.slice_axis, req.affine) if axis is None else axis
    spec = physical_slicing(spec, req.affine, axis, encoder.patch_size)
    out = []
    for name, array in req.images():
        with req.progress.stage(f"{encoder.name} {name} axis {axis}"):
            out.append(encode_cached(array, encoder, axis, spec, req.device, req.progress.enabled))
    return out[0], out[-1]


def translation_field(translation: np.ndarray, shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """A constant ``(1, 3, I, J, K)`` field holding ``translation`` (voxels, i/j/k)."""
    t = torch.as_tensor(np.asarray(translation, dtype=np.float32), device=device)
    return t.view(1, 3, 1, 1, 1).expand(1, 3, *shape).contiguous()


def common_grid(image_shape: tuple[int, int, int], cell_sizes: tuple[int, ...]) -> tuple[int, int, int]:
    """The grid tri-planar features are fused on: cells of the largest size dividing every stage's
    cell size (``ceil(I / p)`` per axis), which the stages pool exactly."""
    pool = math.gcd(*cell_sizes) if cell_sizes else 1
    return tuple(-(-s // pool) for s in image_shape)  # type: ignore[return-value]


def reduce_planes(fixed: list[SliceFeatures], moving: list[SliceFeatures], req: EncodeRequest, k: int
                  ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """One joint foreground PCA over every plane's tokens of both images, each plane projected to
    ``k`` channels; a single plane stays on its own grid, several are resampled (trilinear,
    cell-centred) onto :func:`common_grid` and averaged.

    Returns:
        ``(fixed (k, I', J', K'), moving (k, I'', J'', K''))`` and their boolean foreground masks.
    """
    masks = [[mask_on_grid(image_mask, one.grid_shape).to(one.features.device) for one in planes]
             for planes, image_mask in ((fixed, req.fixed_mask), (moving, req.moving_mask))]
    tokens = [(one.features, mask) for planes, plane_masks in zip((fixed, moving), masks)
              for one, mask in zip(planes, plane_masks)]
    basis = fit_joint_pca(tokens, k, seed=req.seed)
    if len(fixed) == 1:
        return (basis.transform(fixed[0].features), basis.transform(moving[0].features)), (masks[0][0], masks[1][0])
    grid = common_grid(tuple(req.fixed.shape), req.cell_sizes)

    def fuse(planes: list[SliceFeatures]) -> torch.Tensor:
        volumes = [F.interpolate(basis.transform(p.features)[None], size=grid, mode="trilinear",
                                 align_corners=False)[0] for p in planes]
        return torch.stack(volumes).mean(0)

    device = fixed[0].features.device
    return ((fuse(fixed), fuse(moving)),
            (mask_on_grid(req.fixed_mask, grid).to(device), mask_on_grid(req.moving_mask, grid).to(device)))


def slicewise_pair(loader: Callable[[EncoderSpec, str], Encoder2D], req: EncodeRequest) -> PairFeatures:
    """Pair features from a 2D network: slicewise encoding (along the slicing axis, or all three
    for ``planes="tri"``), joint masked PCA, slice-match start."""
    spec: SlicewiseSpec = req.spec  # type: ignore[assignment]
    model = loader(spec, str(req.device))
    axis = slice_axis(spec.slice_axis, req.affine)
    axes = [axis] + [a for a in range(3) if a != axis] if spec.planes == "tri" else [axis]
    encoded = [encode_pair_slices(req, model, a) for a in axes]
    fixed, moving = encoded[0]
    k = min(spec.pca_components, fixed.features.shape[0])
    (pf, pm), (fmask, mmask) = reduce_planes([f for f, _ in encoded], [m for _, m in encoded], req, k)
    scale = unit_scale(pf, pm, fmask, mmask)
    init = None
    if spec.slice_match and fixed.cls is not None:
        match = match_slices(fixed, moving, n_pairs=spec.slice_match_pairs)
        if np.abs(match.translation).max() > 0:
            init = translation_field(match.translation, req.fixed.shape, req.device)
        req.progress.log(f"slice match: translation {np.round(match.translation, 1).tolist()} voxels")
    return PairFeatures((pf * scale)[None], (pm * scale)[None], init)
