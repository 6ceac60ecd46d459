"""One registration from a spec: prepare the pair, encode it, run the method's stages.

``prepare`` loads and checks both images (and masks), brings the moving image onto the fixed
grid and normalises both as the spec's preprocessing says; ``encode`` runs every encoder of the
spec; ``run`` chains the method's stages (``dinoreg.pair.run_stages``), once on the concatenated
features or, for ``ensemble="average"``, once per encoder with the fields averaged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch

from dinoreg.errors import DinoregError
from dinoreg.features.base import EncodeRequest, EncoderSpec, PairFeatures
from dinoreg.features.ensemble import combine_features
from dinoreg.features.registry import encoder_entry
from dinoreg.io.images import Image, as_image, has_geometry, on_image_grid, to_fixed_grid
from dinoreg.methods.registry import method_entry
from dinoreg.optim.initial import InitialStage, resample_through, share_inside
from dinoreg.pair import RegistrationPair, run_stages
from dinoreg.preprocess import check_mask, check_not_constant, normalise, threshold_mask
from dinoreg.progress import Progress
from dinoreg.registration_spec import RegistrationSpec

ImageLike = Any  # path, Image, numpy array, nibabel or SimpleITK image


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DinoregError("--device cuda was asked for but no CUDA GPU is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise DinoregError(f"unknown device {device!r}; choose auto, cpu or cuda")
    try:
        return torch.device(device)
    except RuntimeError as exc:  # e.g. "cuda:x"
        raise DinoregError(f"unknown device {device!r}; choose auto, cpu, cuda or cuda:N", "--device") from exc


@dataclass
class PreparedPair:
    """The pair for the stages and the images it came from."""

    pair: RegistrationPair
    fixed: Image
    moving_original: Image
    moving: Image  # on the fixed grid (through ``world`` when given)
    world: np.ndarray | None = None  # the initial alignment, fixed world -> moving world (4, 4); None: none
    init_seconds: float = 0.0


def check_size(img: Image) -> None:
    """Refuse an image that is not 2D or 3D: at least two axes need two voxels or more (the
    smallest supported images are 2 x 2 in 2D and 2 x 2 x 2 in 3D)."""
    if sum(n > 1 for n in img.shape) < 2:
        raise DinoregError(f"image of shape {img.shape} is too small: registration needs at least 2 voxels along "
                           "two axes (smallest supported: 2 x 2 in 2D, 2 x 2 x 2 in 3D)", img.name)


def _mask(mask: Image | None, normalised: np.ndarray, reference: Image, threshold: float, name: str) -> np.ndarray:
    if mask is None:
        return check_mask(threshold_mask(normalised, threshold), f"{name} (intensity threshold {threshold})")
    return check_mask(mask.array, mask.name)


def mask_on(obj: ImageLike, image: Image, name: str) -> Image:
    """A user mask on its image's grid (nearest neighbour from its own affine, see
    :func:`dinoreg.io.images.on_image_grid`)."""
    return on_image_grid(as_image(obj, name), image, has_geometry(obj), name)


def _check_overlap(fix_img: Image, mov_orig: Image, to_moving: np.ndarray, init: str) -> None:
    if share_inside(mov_orig.shape, to_moving, fix_img.shape) == 0.0:
        hint = "; try --init centre, moments or affine" if init == "none" else ""
        raise DinoregError(f"the fixed and moving images do not overlap in world space (after the initial alignment "
                           f"init={init}): no fixed voxel falls inside the moving field of view{hint}", mov_orig.name)


def prepare(fixed: ImageLike, moving: ImageLike, spec: RegistrationSpec, device: torch.device,
            fixed_mask: ImageLike | None = None, moving_mask: ImageLike | None = None,
            progress: Progress | None = None) -> PreparedPair:
    """Load, check, align (``init``), resample and normalise a pair as ``spec.preprocess`` says."""
    pre = spec.preprocess
    fix_img = as_image(fixed, "fixed")
    spec.method.check_shape(fix_img.shape, fix_img.name)
    mov_orig = as_image(moving, "moving")
    for img in (fix_img, mov_orig):
        check_size(img)
    check_not_constant(mov_orig.array, mov_orig.name)
    fix_norm = normalise(fix_img.array, pre.intensity("fixed"), fix_img.name)
    world, init_seconds = None, 0.0
    if pre.init == "none":
        _check_overlap(fix_img, mov_orig, np.linalg.inv(mov_orig.affine) @ fix_img.affine, pre.init)
        mov_img = to_fixed_grid(mov_orig, fix_img, order=1)
        mov_norm = normalise(mov_img.array, pre.intensity("moving"), mov_orig.name)
    else:
        start = time.perf_counter()
        own = normalise(mov_orig.array, pre.intensity("moving"), mov_orig.name)
        world = InitialStage(pre.init, pre.init_iterations).align(
            fix_img, fix_norm, mov_orig, own, pre.mask_threshold, device, progress or Progress(False))
        to_moving = np.linalg.inv(mov_orig.affine) @ world @ fix_img.affine
        _check_overlap(fix_img, mov_orig, to_moving, pre.init)
        mov_img = Image(resample_through(mov_orig.array, to_moving, fix_img.shape), fix_img.affine.copy(),
                        mov_orig.path)
        mov_norm = resample_through(own, to_moving, fix_img.shape)
        init_seconds = time.perf_counter() - start
    user_fmask = None if fixed_mask is None else mask_on(fixed_mask, fix_img, "fixed mask")
    fmask = _mask(user_fmask, fix_norm, fix_img, pre.mask_threshold, fix_img.name)
    mmask_img = None
    if moving_mask is not None:
        own_mask = mask_on(moving_mask, mov_orig, "moving mask")
        mmask_img = to_fixed_grid(own_mask, fix_img, order=0) if world is None else Image(
            resample_through(own_mask.array, np.linalg.inv(mov_orig.affine) @ world @ fix_img.affine, fix_img.shape,
                             order=0), fix_img.affine.copy(), own_mask.path)
    mmask = _mask(mmask_img, mov_norm, fix_img, pre.mask_threshold, mov_orig.name)
    pair = RegistrationPair(fix_norm, mov_norm, fmask, mmask, fmask if user_fmask is not None else None,
                            fix_img.affine, tuple(float(s) for s in fix_img.spacing), device)  # type: ignore[arg-type]
    return PreparedPair(pair, fix_img, mov_orig, mov_img, world, init_seconds)


def encode(spec: RegistrationSpec, pair: RegistrationPair, progress: Progress,
           encoders: Sequence[EncoderSpec] | None = None) -> list[PairFeatures]:
    """One :class:`PairFeatures` per encoder of the spec (or of ``encoders``, a subset of them)."""
    cells = spec.method.cell_sizes()
    parts = []
    for encoder in spec.encoders if encoders is None else encoders:
        request = EncodeRequest(pair.fixed, pair.moving, pair.fixed_mask, pair.moving_mask, pair.affine, pair.device,
                                progress, encoder, spec.seed, cells)
        parts.append(encoder_entry(encoder.name).encode_pair(request))
    return parts


@dataclass(frozen=True)
class EnsemblePlan:
    """Which encoders a registration encodes and how their blocks weigh.

    ``used``: indices into ``spec.encoders``; ``weights``: each used block's weight (the average
    ensemble's field weights, the concatenation's block powers); ``refine``: each used block's
    power in the refinement stages, or None when they use ``weights``."""

    used: list[int]
    weights: list[float]
    refine: list[float] | None


def ensemble_plan(spec: RegistrationSpec) -> EnsemblePlan:
    """The :class:`EnsemblePlan` of ``spec``: every encoder but, for a concatenated ensemble, the
    blocks with no power in any stage and no initial field (see :func:`contributing`)."""
    n, features = len(spec.encoders), spec.features or ""
    weights = spec.ensemble.weights(n, features)
    refine = spec.ensemble.refinement_weights(n, features)
    used = list(range(n))
    if n >= 2 and spec.ensemble.ensemble == "concat":
        stage_refine = refine or weights
        used = [i for i, encoder in enumerate(spec.encoders)
                if i == 0 or weights[i] > 0 or stage_refine[i] > 0 or bool(getattr(encoder, "slice_match", False))]
    return EnsemblePlan(used, [weights[i] for i in used], None if refine is None else [refine[i] for i in used])


def contributing(spec: RegistrationSpec) -> list[int]:
    """Indices of the encoders a concatenated ensemble uses: the first, every block with a power
    above 0 in some stage, and any block giving the initial field (a slice-match start). The
    others would be encoded for nothing (e.g. ``dinoreg-fast`` without its slice match)."""
    return ensemble_plan(spec).used


def run(spec: RegistrationSpec, pair: RegistrationPair, progress: Progress) -> tuple[torch.Tensor, dict[str, float]]:
    """The registration field ``(1, 3, I, J, K)`` (voxels, pull-back) and seconds per step."""
    stages = method_entry(spec.method.name).build(spec.method, spec.encoders)
    timings: dict[str, float] = {}
    runs, weights = [pair], [1.0]
    if spec.method.uses_features:
        plan = ensemble_plan(spec)
        start = time.perf_counter()
        parts = encode(spec, pair, progress, [spec.encoders[i] for i in plan.used])
        timings["encode"] = time.perf_counter() - start
        weights = plan.weights
        if len(parts) > 1 and spec.ensemble.ensemble == "average":
            runs = [replace(pair, features=part, init=part.init) for part in parts]
        else:
            features = parts[0] if len(parts) == 1 else combine_features(parts, weights, plan.refine)
            runs = [replace(pair, features=features, init=features.init)]
    fields, stage_totals = [], {}
    for one in runs:
        field, stage_times = run_stages(stages, one, progress)
        fields.append(field)
        for key, seconds in stage_times.items():
            stage_totals[key] = stage_totals.get(key, 0.0) + seconds
    timings.update(stage_totals)
    # a stage's extra entries (mi_prepare, reencode, load_encoder) are parts of its own time
    timings["optimise"] = sum(stage_totals.get(stage.name, 0.0) for stage in stages)
    if len(fields) == 1:
        return fields[0], timings
    return sum(w * f for w, f in zip(weights, fields)) / sum(weights), timings
