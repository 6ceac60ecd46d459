"""B-spline FFD registration with an encoder in the loss loop (Kögl, Reithmeir et al., 2024).

Objective, minimised with Adam over the control-point displacements ``phi``:

``J(phi) = (1 - alpha) * D_img(F, M o phi) + alpha * D_feat(enc(F), enc(M o phi)) + lambda * R(phi)``

* ``D_img``: global NCC (``ncc``, the paper's choice) or local NCC (``lcc``), as losses in
  ``[-1, 1]`` (lower is better);
* ``D_feat``: ``cos`` (``1 - cosine`` per feature location, averaged) or ``l1`` (mean absolute
  feature difference) between the features of the fixed image and of the **warped moving image
  re-encoded at every iteration**: the encoder is frozen (``eval()``, parameters
  ``requires_grad=False``) but not run under ``no_grad``, so the gradient of ``D_feat`` flows
  back through the network into the warped image, the dense field and the control points;
* ``R``: diffusion regulariser on the dense B-spline displacement (voxel units);
* ``alpha`` in ``[0, 1]``: 0 = NCC alone (no encoder needed), 1 = feature distance alone.

Images are ``(1, 1, I, J)`` (2D) or ``(1, 1, I, J, K)`` (3D), scaled to ``[0, 1]`` (the encoders
expect that range). The result is the dense pull-back displacement ``(1, D, *shape)`` in voxels
of the fixed grid: ``warped(p) = moving(p + u(p))`` (:func:`dinoreg.spatial.grid.warp`).

3D with a 2D encoder: the volume is cut into slices along ``slice_axis`` and each slice is
encoded as a batch item. **Cost per iteration**: ``ceil(n_slices / slice_stride)`` slices x
(one forward + one backward) of the encoder, run in chunks of ``slice_batch`` slices (the
chunk's gradient w.r.t. the warped image is accumulated, so memory is bounded by one chunk).
With ``slice_stride = k`` the iteration ``t`` encodes slices ``t mod k, t mod k + k, ...``,
so every slice is visited once every ``k`` iterations. The fixed image's features are
computed once per slice (no gradient) and cached: ``n_slices x C x h x w`` floats per level.

Multi-resolution (``levels``, e.g. ``(4, 2, 1)``): coarse-to-fine image pyramid (Gaussian
smoothing, corner-aligned resampling). The control lattice is defined once on the full grid
and optimised at every level (its dense field is evaluated on each level's grid), so the
levels share one parameter set and one Adam state.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dinoreg.errors import DinoregError
from dinoreg.features.base import Encoder2D
from dinoreg.losses import cosine_distance, diffusion, l1_distance, lcc, ncc
from dinoreg.spatial.bspline import Spacing, bspline_field, control_shape
from dinoreg.spatial.grid import identity_grid, resize_field, sample, warp

FEATURE_DISTANCES: dict[str, Callable[..., torch.Tensor]] = {
    "cos": cosine_distance, "cosine": cosine_distance, "l1": l1_distance}
IMAGE_DISTANCES: dict[str, Callable[..., torch.Tensor]] = {"ncc": ncc, "lcc": lcc}


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(N, C, *spatial)`` (sigma in voxels, edge replicate)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=img.dtype, device=img.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    ndim = img.ndim - 2
    conv = F.conv3d if ndim == 3 else F.conv2d
    out = img.reshape(-1, 1, *img.shape[2:])
    for axis in range(ndim):
        shape = [1, 1] + [1] * ndim
        shape[2 + axis] = kernel.numel()
        pad = [0, 0] * ndim
        pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out.reshape(img.shape)


def pyramid_level(img: torch.Tensor, shape: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """``img`` resampled (corner-aligned) to ``shape``; intensities are Gaussian-smoothed first
    with ``sigma = factor / 2``. ``mode="nearest"`` (masks) skips the smoothing."""
    shape = tuple(int(s) for s in shape)
    if tuple(img.shape[2:]) == shape:
        return img
    scale = [(o - 1) / max(n - 1, 1) for o, n in zip(shape, img.shape[2:])]
    if mode != "nearest":
        img = _gaussian_blur(img, 0.5 / min(scale))
    grid = identity_grid(shape, img.device, img.dtype) / torch.tensor(
        [max(s, 1e-12) for s in scale], dtype=img.dtype, device=img.device).view(1, -1, *[1] * len(shape))
    return sample(img, grid, mode=mode)


def _takes_layer(encoder: object) -> bool:
    """Whether ``encoder.forward`` accepts ``layer=`` (intermediate-layer tokens)."""
    import inspect

    forward = getattr(encoder, "forward", None)
    try:
        return forward is not None and "layer" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def _level_shape(shape: Sequence[int], factor: int) -> tuple[int, ...]:
    return tuple(max(4, int(round((n - 1) / factor)) + 1) for n in shape)


class FFDRegistration:
    """Cubic B-spline FFD optimised with Adam; optionally an :class:`Encoder2D` in the loss.

    Args:
        encoder: frozen 2D encoder (``dinov2``, ``litemedsam``, ``sam``, ``medsam``); required
            when ``alpha > 0``. It is switched to ``eval()`` with ``requires_grad_(False)``.
        alpha: weight of the feature distance, ``(1 - alpha)`` weighs the image distance.
        feature_distance: ``cos`` (alias ``cosine``) or ``l1``.
        image_distance: ``ncc`` (global, default) or ``lcc`` (local, 5-voxel window).
        grid_spacing: control-point spacing in voxels of the fixed grid (scalar or per axis;
            use :func:`dinoreg.spatial.bspline.spacing_from_mm` for millimetres).
        reg_weight: ``lambda`` of the diffusion regulariser.
        iterations: Adam steps per level (an int, or one per level).
        lr: Adam learning rate, in voxels per step (control points are in voxels).
        levels: pyramid downsampling factors, coarse to fine; ``(1,)`` = single resolution.
        slice_axis: axis of the 3D volume along which the 2D encoder sees slices (0, 1, 2 or -1).
        slice_stride: encode every k-th slice per iteration (rotating offset), see module doc.
        slice_batch: slices per encoder call.
        balance: rescale the feature term once, at the first iteration, so its gradient w.r.t. the
            warped image has the norm of the image distance's; ``alpha`` is then the share of the
            two (see :meth:`_balance`). ``False`` uses the raw feature distance.
        feature_upsample: scale factor applied to each slice before ``encoder.preprocess``
            (the paper upsamples so that the feature map is finer; LiteMedSAM/SAM resize to
            their fixed input size anyway).
        feature_layer: 0 compares the encoder's output tokens; ``k >= 1`` the tokens after block
            ``k`` (DINOv2 only: ``forward(x, layer=k)``, final LayerNorm applied, later blocks not
            run, so it is also cheaper).
        progress: show a tqdm progress bar.

    After :meth:`register`: ``control`` (``(1, D, *ctrl)`` voxels), ``history`` (per-iteration
    dicts with ``level``, ``image``, ``feature``, ``reg``, ``total``).
    """

    def __init__(self, encoder: Encoder2D | None = None, *, alpha: float = 0.0,
                 feature_distance: str = "cos", image_distance: str = "ncc",
                 grid_spacing: Spacing = 8.0, reg_weight: float = 0.1,
                 iterations: int | Sequence[int] = 100, lr: float = 0.1,
                 levels: Sequence[int] = (1,), slice_axis: int = -1, slice_stride: int = 1,
                 slice_batch: int = 8, feature_upsample: float = 1.0, balance: bool = True,
                 feature_layer: int = 0, progress: bool = False) -> None:
        if not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
            raise DinoregError(f"--alpha must be in [0, 1], got {alpha!r}")
        if feature_distance not in FEATURE_DISTANCES:
            raise DinoregError(f"unknown feature distance '{feature_distance}' (choose cos or l1)")
        if image_distance not in IMAGE_DISTANCES:
            raise DinoregError(f"unknown image distance '{image_distance}' (choose ncc or lcc)")
        if alpha > 0 and encoder is None:
            raise DinoregError("alpha > 0 needs an encoder for the feature distance")
        levels = tuple(int(f) for f in levels)
        its = [int(iterations)] * len(levels) if isinstance(iterations, (int, float)) else [int(i) for i in iterations]
        if not levels or any(f < 1 for f in levels) or len(its) != len(levels) or any(i < 0 for i in its):
            raise DinoregError(f"levels must be factors >= 1 with one iteration count each, got {levels}, {iterations}")
        if lr <= 0 or reg_weight < 0 or slice_stride < 1 or slice_batch < 1 or feature_upsample <= 0:
            raise DinoregError("lr, slice_stride, slice_batch and feature_upsample must be positive, reg_weight >= 0")
        if int(feature_layer) < 0:
            raise DinoregError(f"feature_layer must be 0 (last) or a block number >= 1, got {feature_layer}")
        if int(feature_layer) and alpha > 0 and not _takes_layer(encoder):
            raise DinoregError(f"feature_layer {feature_layer} needs an encoder with intermediate-layer tokens "
                               f"(dinov2), got {getattr(encoder, 'name', type(encoder).__name__)}")
        self.encoder = encoder
        if isinstance(encoder, nn.Module):
            encoder.eval().requires_grad_(False)
        self.alpha = float(alpha)
        self.feature_distance = FEATURE_DISTANCES[feature_distance]
        self.image_distance = IMAGE_DISTANCES[image_distance]
        self.grid_spacing, self.reg_weight, self.lr = grid_spacing, float(reg_weight), float(lr)
        self.levels, self.iterations = levels, its
        self.slice_axis, self.slice_stride, self.slice_batch = slice_axis, int(slice_stride), int(slice_batch)
        self.feature_upsample, self.progress = float(feature_upsample), progress
        self.balance = bool(balance)
        self.feature_layer = int(feature_layer)
        self.feature_scale = 1.0
        self.control: torch.Tensor | None = None
        self.history: list[dict[str, float]] = []
        self._fixed_cache: dict[tuple[int, int], torch.Tensor] = {}

    # ----------------------------------------------------------------- slices and features
    def _axis(self, ndim: int) -> int:
        """Spatial axis index of the slicing axis (3D), validated."""
        axis = self.slice_axis % 3 if -3 <= self.slice_axis < 3 else None
        if ndim == 3 and axis is None:
            raise DinoregError(f"slice_axis must be 0, 1, 2 or -1, got {self.slice_axis}")
        return axis or 0

    def _slices(self, vol: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``(1, 1, I, J)`` -> itself; ``(1, 1, I, J, K)`` -> slices ``(len(index), 1, H, W)``."""
        if vol.ndim == 4:
            return vol
        axis = self._axis(3)
        return torch.movedim(vol[0].index_select(1 + axis, index), 1 + axis, 0)

    def _encode(self, slices: torch.Tensor) -> torch.Tensor:
        if self.feature_upsample != 1.0:
            slices = F.interpolate(slices, scale_factor=self.feature_upsample, mode="bilinear",
                                   align_corners=False)
        x = self.encoder.preprocess(slices)
        feats, _ = self.encoder.forward(x, layer=self.feature_layer) if self.feature_layer else self.encoder.forward(x)
        return feats

    def _fixed_features(self, level: int, fixed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        missing = [int(i) for i in index if (level, int(i)) not in self._fixed_cache]
        if missing:
            with torch.no_grad():
                feats = self._encode(self._slices(fixed, torch.tensor(missing, device=fixed.device)))
            self._fixed_cache.update({(level, i): f for i, f in zip(missing, feats)})
        return torch.stack([self._fixed_cache[(level, int(i))] for i in index])

    def _slice_index(self, vol: torch.Tensor, step: int) -> torch.Tensor:
        n = 1 if vol.ndim == 4 else vol.shape[2 + self._axis(3)]
        stride = min(self.slice_stride, n)
        return torch.arange(step % stride, n, stride, device=vol.device)

    def _feature_mask(self, mask: torch.Tensor | None, index: torch.Tensor, size: Sequence[int]):
        if mask is None:
            return None
        m = F.interpolate(self._slices(mask.float(), index), size=tuple(size), mode="area")
        return m > 0.5

    def _balance(self, image: torch.Tensor, warped: torch.Tensor, feature_grad: torch.Tensor) -> None:
        """Fix ``feature_scale`` once so that, at the first iteration, the feature term's gradient
        w.r.t. the warped image has the same norm as the image distance's. Then ``alpha`` is the
        share of the two terms in that gradient, whatever the encoder's feature scale (raw DINOv2
        or LiteMedSAM distances otherwise dominate NCC several times over at alpha 0.3)."""
        if self.alpha >= 1.0:
            self._balanced = True
            return
        image_grad = torch.autograd.grad(image, warped, retain_graph=True)[0]
        num = float(image_grad.norm())
        den = float(feature_grad.norm()) / self.alpha
        if num > 0 and den > 0:
            self.feature_scale = num / den
        self._balanced = True

    def _feature_grad(self, level: int, fixed: torch.Tensor, warped: torch.Tensor,
                      mask: torch.Tensor | None, step: int) -> tuple[float, torch.Tensor]:
        """``alpha * D_feat`` over the selected slices and its gradient w.r.t. ``warped``,
        accumulated chunk by chunk (backward through the frozen encoder)."""
        leaf = warped.detach().requires_grad_(True)
        index = self._slice_index(warped, step)
        total = 0.0
        for chunk in index.split(self.slice_batch):
            feat_f = self._fixed_features(level, fixed, chunk)
            feat_w = self._encode(self._slices(leaf, chunk))
            fmask = self._feature_mask(mask, chunk, feat_w.shape[2:])
            term = self.alpha * self.feature_distance(feat_f, feat_w, mask=fmask) * (len(chunk) / len(index))
            term.backward()
            total += float(term.detach())
        return total, leaf.grad

    # ----------------------------------------------------------------------- optimisation
    def field(self, shape: Sequence[int], out_shape: Sequence[int] | None = None) -> torch.Tensor:
        """Current dense FFD displacement ``(1, D, *out_shape)`` (voxels of ``out_shape``)."""
        if self.control is None:
            raise DinoregError("FFDRegistration.field() called before register()")
        return bspline_field(self.control, shape, self.grid_spacing, out_shape)

    def _check(self, fixed: torch.Tensor, moving: torch.Tensor) -> None:
        if fixed.ndim not in (4, 5) or fixed.shape[:2] != (1, 1) or fixed.shape != moving.shape:
            raise DinoregError(f"ffd expects fixed and moving of one shape (1, 1, I, J[, K]), got "
                               f"{tuple(fixed.shape)} and {tuple(moving.shape)}")
        if min(fixed.shape[2:]) < 4:
            raise DinoregError(f"ffd needs at least 4 voxels per axis, got {tuple(fixed.shape[2:])}")

    def register(self, fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor | None = None,
                 init: torch.Tensor | None = None) -> torch.Tensor:
        """Register ``moving`` onto ``fixed``; returns the displacement ``(1, D, *shape)`` (voxels).

        Args:
            fixed, moving: ``(1, 1, *shape)`` intensities in ``[0, 1]`` on one grid.
            mask: optional fixed-image mask ``(1, 1, *shape)``; restricts both distances.
            init: optional initial displacement ``(1, D, *shape)`` (voxels); the FFD field is
                *added* to it (``u = init + ffd``) and only the FFD part is regularised.
        """
        self._check(fixed, moving)
        shape = tuple(fixed.shape[2:])
        ndim = len(shape)
        if init is not None and tuple(init.shape) != (1, ndim, *shape):
            raise DinoregError(f"initial field must be (1, {ndim}, *{shape}), got {tuple(init.shape)}")
        self.control = torch.zeros(1, ndim, *control_shape(shape, self.grid_spacing),
                                   device=fixed.device, dtype=fixed.dtype, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.control], lr=self.lr)
        self.history, self._fixed_cache = [], {}
        self.feature_scale, self._balanced = 1.0, not self.balance
        for level, (factor, iters) in enumerate(zip(self.levels, self.iterations)):
            self._run_level(level, factor, iters, fixed, moving, mask, init)
        with torch.no_grad():
            disp = self.field(shape)
            return disp if init is None else disp + init

    def _run_level(self, level: int, factor: int, iters: int, fixed: torch.Tensor, moving: torch.Tensor,
                   mask: torch.Tensor | None, init: torch.Tensor | None) -> None:
        shape = tuple(fixed.shape[2:])
        lshape = _level_shape(shape, factor)
        fix_l, mov_l = pyramid_level(fixed, lshape), pyramid_level(moving, lshape)
        mask_l = None if mask is None else pyramid_level(mask.float(), lshape, mode="nearest")
        init_l = None if init is None else resize_field(init, lshape, align_corners=True)
        steps = range(iters)
        if self.progress:
            from tqdm import tqdm
            steps = tqdm(steps, desc=f"ffd level {level + 1}/{len(self.levels)} {lshape}", leave=False)
        for step in steps:
            record = self.step(level, step, shape, fix_l, mov_l, mask_l, init_l)
            if self.progress:
                steps.set_postfix(loss=f"{record['total']:.4f}")

    def step(self, level: int, step: int, shape: Sequence[int], fixed: torch.Tensor, moving: torch.Tensor,
             mask: torch.Tensor | None = None, init: torch.Tensor | None = None) -> dict[str, float]:
        """One Adam step at one pyramid level (images already resampled to that level)."""
        self.optimizer.zero_grad(set_to_none=True)
        ffd = self.field(shape, fixed.shape[2:])
        disp = ffd if init is None else ffd + init
        warped = warp(moving, disp)
        image = self.image_distance(fixed, warped, mask=mask)
        reg = diffusion(ffd)
        rest = (1.0 - self.alpha) * image + self.reg_weight * reg
        feature = 0.0
        if self.alpha > 0:
            feature, grad = self._feature_grad(level, fixed, warped, mask, step)
            if not self._balanced:
                self._balance(image, warped, grad)
            feature, grad = feature * self.feature_scale, grad * self.feature_scale
            torch.autograd.backward([rest, warped], [torch.ones_like(rest), grad])
        else:
            rest.backward()
        self.optimizer.step()
        record = {"level": float(level), "image": float(image.detach()), "feature": feature,
                  "reg": float(reg.detach()), "total": float(rest.detach()) + feature}
        self.history.append(record)
        return record
