"""The Python API: :func:`register`, :func:`warp`, :func:`evaluate`, :func:`encode`.

``register(fixed, moving)`` returns a :class:`Result` whose ``disp`` is the Learn2Reg field:
``(I, J, K, 3)`` float32 in voxels of the fixed grid, components ``(i, j, k)``, pull-back
(``warped(p) = moving(p + disp(p))``). When the moving image lies on another grid it is first
resampled onto the fixed grid through the two affines; ``disp`` indexes that resampled volume and
:func:`warp` repeats the same resampling, so warping the original moving image reproduces
``Result.warped``.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dinoreg import jit
from dinoreg import metrics as l2r_metrics
from dinoreg.errors import DinoregError
from dinoreg.io.fields import as_field, field_grid
from dinoreg.io.images import Image, as_image, has_geometry, load_image, on_image_grid
from dinoreg.io.landmarks import load_landmarks, voxel_to_world, world_to_voxel
from dinoreg.pair import RegistrationPair
from dinoreg.pipeline import ImageLike, prepare, resolve_device, run
from dinoreg.pipeline import encode as encode_pair
from dinoreg.preprocess import check_labels, check_mask, normalise, threshold_mask
from dinoreg.presets import resolve
from dinoreg.progress import Progress
from dinoreg.registration_spec import RegistrationSpec
from dinoreg.result import Result
from dinoreg.spatial.affine import feature_affine
from dinoreg.spatial.grid import field_from_numpy, field_to_numpy
from dinoreg.spatial.grid import warp as warp_tensor
from dinoreg.spatial.world import compose_world_affine, warp_original

__all__ = ["Result", "register", "warp", "evaluate", "encode", "resolve_spec"]


def resolve_spec(preset_name: str = "mind", spec: RegistrationSpec | None = None,
                 **overrides: Any) -> RegistrationSpec:
    """The registration spec: ``spec`` (or the named preset's) with flat ``overrides`` applied;
    ``None`` values mean "not given". Unknown keys and values out of range raise
    :class:`DinoregError` naming the key."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if spec is None:
        return resolve(preset_name, given)
    return spec.with_flat(given) if given else spec


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def register(fixed: ImageLike, moving: ImageLike, *, preset_name: str = "mind", spec: RegistrationSpec | None = None,
             fixed_mask: ImageLike | None = None, moving_mask: ImageLike | None = None,
             fixed_labels: ImageLike | None = None, moving_labels: ImageLike | None = None,
             fixed_landmarks: str | os.PathLike | None = None, moving_landmarks: str | os.PathLike | None = None,
             landmarks_space: str = "voxel", eval_labels: Sequence[int] | None = None,
             device: str | torch.device = "auto", progress: bool = True, defer_metrics: bool = False,
             **overrides: Any) -> Result:
    """Register ``moving`` onto ``fixed``.

    Args:
        fixed, moving: paths (NIfTI, MHA, NRRD, DICOM folder, npy/npz), :class:`Image`, numpy
            arrays (identity affine), nibabel or SimpleITK images.
        preset_name: named registration (``mind``, ``convexadam``, ``dinoreg``, ...; ``dinoreg
            presets`` lists them), or ``spec``: a :class:`RegistrationSpec` itself.
        overrides: flat settings replacing the spec's (``features="mind+dinov2"``,
            ``iterations=100``, ``seed=1``, ``mask_threshold=0.1``, ``fixed_modality="ct"``, ...);
            an unknown key or a value out of range raises :class:`DinoregError` before any work.
        fixed_mask, moving_mask: foreground masks; default: normalised intensity > ``mask_threshold``.
        fixed_labels, moving_labels: label maps; moving labels are warped, and with both, Dice and
            HD95 are computed (over ``eval_labels`` when given); fixed labels alone are an error. Label
            maps on another grid than their image are mapped (nearest) through their own affines.
        fixed_landmarks, moving_landmarks: CSV files for TRE (both or neither).
        landmarks_space: ``voxel`` (i, j, k rows), ``ras`` or ``lps`` (world mm).
        device: ``auto``, ``cpu`` or ``cuda``.
        progress: show progress bars on stderr.
        defer_metrics: leave the metrics to :meth:`Result.evaluate` (which :meth:`Result.save`
            calls while it writes the volumes, on another thread) instead of computing them here.

    Returns:
        a :class:`Result` (``settings`` holds the resolved spec).
    """
    t0 = time.perf_counter()
    resolved = resolve_spec(preset_name, spec, **overrides)
    dev = resolve_device(device)
    if dev.type == "cpu":
        jit.preload()  # numba's set-up overlaps reading and normalising the images
    require_both(fixed_landmarks, moving_landmarks, "landmarks")
    if fixed_labels is not None:  # moving labels alone are fine: they are warped, not scored
        require_both(fixed_labels, moving_labels, "labels")
    _seed(resolved.seed)
    reporter = Progress(progress)
    prepared = prepare(fixed, moving, resolved, dev, fixed_mask, moving_mask, progress=reporter)
    scoring = _load_scoring_inputs(prepared.fixed, prepared.moving_original, fixed_labels, moving_labels,
                                   fixed_landmarks, moving_landmarks, landmarks_space)  # bad input: before any work
    timings = {"load": time.perf_counter() - t0 - prepared.init_seconds}
    if prepared.world is not None:
        timings["init"] = prepared.init_seconds
    disp_t, run_timings = run(resolved, prepared.pair, reporter)
    timings.update(run_timings)
    disp = field_to_numpy(disp_t)
    mov_orig = prepared.moving_original
    if prepared.world is None and mov_orig.same_grid(prepared.fixed):
        mov_t = torch.from_numpy(np.ascontiguousarray(prepared.moving.array, dtype=np.float32)).to(dev)[None, None]
        warped = warp_tensor(mov_t, disp_t.to(dev), padding_mode="zeros")[0, 0].cpu().numpy()
    else:
        # the composite field (initial alignment included) and one interpolation of the original image
        if prepared.world is not None:
            disp = compose_world_affine(disp, prepared.fixed.affine, prepared.world)
        warped = warp_original(mov_orig.array, mov_orig.affine, disp, prepared.fixed.affine, order=1)
    settings = {"preset": preset_name if spec is None else None, **resolved.to_dict()}
    result = Result(disp=disp, fixed=prepared.fixed, warped=warped, timings=timings, settings=settings,
                    moving_path=prepared.moving_original.path, moving=prepared.moving.array)
    _attach_labels(result, prepared.moving_original, scoring)
    timings["total"] = time.perf_counter() - t0
    result.pending_metrics = _metrics_of(result, scoring, eval_labels, prepared.pair.user_fixed_mask)
    if not defer_metrics:
        result.evaluate()
    return result


def require_both(fixed: Any, moving: Any, what: str) -> None:
    """Inputs that only make sense together (``what``: ``labels`` or ``landmarks``): one without
    the other raises :class:`DinoregError` naming both options."""
    if (fixed is None) != (moving is None):
        have, missing = ("fixed", "moving") if moving is None else ("moving", "fixed")
        raise DinoregError(f"needs --{missing}-{what} too (the metrics compare the two)", f"--{have}-{what}")


def _label_image(obj: ImageLike, name: str) -> Image:
    img = load_image(obj, dtype=None) if isinstance(obj, (str, os.PathLike)) else as_image(obj, name)
    return img.with_array(check_labels(img.array, img.name))


def _labels_on(obj: ImageLike, image: Image, name: str) -> Image:
    """A label map on ``image``'s grid: resampled (nearest) from its own affine when it has one
    and lies on another grid, else it must have the image's shape."""
    return on_image_grid(_label_image(obj, name), image, has_geometry(obj), name)


def _moving_landmarks_on_fixed_grid(path: ImageLike, moving: Image, fixed: Image, space: str) -> np.ndarray:
    points = load_landmarks(path, moving, space=space)
    if moving.same_grid(fixed):
        return points
    return world_to_voxel(voxel_to_world(points, moving.affine), fixed.affine)


def _load_scoring_inputs(fix_img: Image, mov_orig: Image, fixed_labels: ImageLike | None,
                         moving_labels: ImageLike | None, fixed_landmarks: Any, moving_landmarks: Any,
                         space: str) -> tuple[np.ndarray | None, ...]:
    """``(fixed labels on the fixed grid, moving labels on the moving image's own grid, fixed
    landmarks, moving landmarks in fixed voxels)`` (``None`` where not given), read and checked
    before registering."""
    mseg = None if moving_labels is None else _labels_on(moving_labels, mov_orig, "moving labels").array
    fseg = None if fixed_labels is None else _labels_on(fixed_labels, fix_img, "fixed labels").array
    flms = mlms = None
    if fixed_landmarks is not None and moving_landmarks is not None:
        flms = load_landmarks(fixed_landmarks, fix_img, space=space)
        mlms = _moving_landmarks_on_fixed_grid(moving_landmarks, mov_orig, fix_img, space)
        if len(flms) != len(mlms):
            raise DinoregError(f"has {len(mlms)} landmarks but the fixed file has {len(flms)}", moving_landmarks)
    return fseg, mseg, flms, mlms


def _attach_labels(result: Result, mov_orig: Image, scoring: tuple[np.ndarray | None, ...]) -> None:
    """Warp the moving labels (when given) once: the saved warped labels are the ones scored."""
    mseg = scoring[1]
    if mseg is None:
        return
    if mov_orig.same_grid(result.fixed):
        result.warped_labels = l2r_metrics.warp_segmentation(mseg, result.disp)
    else:  # one nearest-neighbour lookup from the labels' own grid through world space
        result.warped_labels = warp_original(mseg, mov_orig.affine, result.disp, result.fixed.affine, order=0)


def _metrics_of(result: Result, scoring: tuple[np.ndarray | None, ...], eval_labels: Sequence[int] | None,
                fixed_mask: np.ndarray | None) -> Callable[[], dict[str, Any]] | None:
    """The computation of ``result``'s Learn2Reg metrics, or ``None`` without labels or landmarks."""
    fseg, mseg, flms, mlms = scoring
    if not ((fseg is not None and mseg is not None) or flms is not None):
        return None
    return functools.partial(
        l2r_metrics.evaluate_pair, result.disp, fixed_seg=fseg if mseg is not None else None,
        moving_seg=mseg if fseg is not None else None, labels=None if eval_labels is None else list(eval_labels),
        fixed_lms=flms, moving_lms=mlms, spacing=tuple(float(s) for s in result.fixed.spacing),
        fixed_mask=fixed_mask, warped_seg=result.warped_labels)


def warp(image: ImageLike, disp: Any, fixed: ImageLike | None = None, labels: bool = False) -> Image:
    """Warp ``image`` with a field onto the fixed grid.

    Args:
        image: the moving image (or label map with ``labels=True``), on its own grid.
        disp: a field path, an :class:`Image` holding ``(I, J, K, 3)``, or the array itself.
            Its affine (from a file) defines the fixed grid unless ``fixed`` is given.
        fixed: the fixed image (for its grid), when the field carries no affine.
        labels: nearest-neighbour interpolation for label maps (Learn2Reg's ``order=0``).

    Returns:
        the warped :class:`Image` on the fixed grid.
    """
    field_img = as_field(disp)
    grid_affine = field_grid(field_img, None if fixed is None else as_image(fixed, "fixed")).affine
    shape = tuple(field_img.array.shape[:3])
    target = Image(np.zeros(shape, np.float32), grid_affine)
    src = _label_image(image, "moving labels") if labels else as_image(image, "moving")
    if not src.same_grid(target):  # fixed voxel -> moving world -> moving voxel: one interpolation
        out = warp_original(src.array, src.affine, field_img.array, grid_affine, order=0 if labels else 1)
        return Image(out, grid_affine, None)
    if labels:
        return Image(l2r_metrics.warp_segmentation(src.array, field_img.array), grid_affine, None)
    mov_t = torch.from_numpy(np.ascontiguousarray(src.array, dtype=np.float32))[None, None]
    out = warp_tensor(mov_t, field_from_numpy(field_img.array), padding_mode="zeros")[0, 0].numpy()
    return Image(out, grid_affine, None)


def evaluate(disp: Any, fixed_labels: ImageLike | None = None, moving_labels: ImageLike | None = None, *,
             fixed_landmarks: Any = None, moving_landmarks: Any = None, fixed: ImageLike | None = None,
             moving: ImageLike | None = None, landmarks_space: str = "voxel",
             eval_labels: Sequence[int] | None = None, fixed_mask: ImageLike | None = None) -> dict[str, Any]:
    """Learn2Reg metrics of a field on a labelled and/or landmarked pair (see ``dinoreg.metrics``)."""
    require_both(fixed_labels, moving_labels, "labels")
    require_both(fixed_landmarks, moving_landmarks, "landmarks")
    field_img = as_field(disp)
    grid = field_grid(field_img, None if fixed is None else as_image(fixed, "fixed"))
    # label maps on other grids than the field's (e.g. 1 mm labels, a 2 mm field) are mapped onto
    # it through their own affines, nearest neighbour; without overlap: one error
    fseg = _labels_on(fixed_labels, grid, "fixed labels").array if fixed_labels is not None else None
    mseg = warped_seg = None
    if moving_labels is not None:
        mref = as_image(moving, "moving") if moving is not None else grid
        mlab = _labels_on(moving_labels, mref, "moving labels")
        mseg = mlab.array
        if not mlab.same_grid(grid):  # one nearest-neighbour lookup through world space
            warped_seg = warp_original(mlab.array, mlab.affine, field_img.array, grid.affine, order=0)
    for seg, name in ((fseg, "fixed labels"), (mseg if warped_seg is None else None, "moving labels")):
        if seg is not None and seg.shape != grid.shape:
            raise DinoregError(f"label grid {seg.shape} does not match the field grid {grid.shape}", name)
    flms = mlms = None
    if fixed_landmarks is not None and moving_landmarks is not None:
        flms = load_landmarks(fixed_landmarks, grid, space=landmarks_space)
        mref = as_image(moving, "moving") if moving is not None else grid
        mlms = _moving_landmarks_on_fixed_grid(moving_landmarks, mref, grid, landmarks_space)
    mask = None
    if fixed_mask is not None:
        mask = check_mask(on_image_grid(as_image(fixed_mask, "fixed mask"), grid, has_geometry(fixed_mask),
                                        "fixed mask").array, "fixed mask")
    return l2r_metrics.evaluate_pair(field_img.array, fixed_seg=fseg, moving_seg=mseg,
                                     labels=None if eval_labels is None else list(eval_labels),
                                     fixed_lms=flms, moving_lms=mlms,
                                     spacing=tuple(float(s) for s in grid.spacing), fixed_mask=mask,
                                     warped_seg=warped_seg)


def encode(image: ImageLike, *, features: str = "dinov2", preset_name: str = "dinoreg-fast",
           components: int = 24, modality: str = "auto", device: str | torch.device = "auto",
           progress: bool = True, **overrides: Any) -> tuple[np.ndarray, np.ndarray]:
    """Feature volume of one image, PCA-reduced on its foreground (``overrides``: flat settings
    such as ``weights=...``, ``mask_threshold=...``).

    Returns:
        ``(C, I', J', K')`` float32 features and the ``(4, 4)`` affine of the feature grid
        (cell-centred over the image, see :func:`dinoreg.spatial.affine.feature_affine`).
    """
    spec = resolve_spec(preset_name, None, features=features, **overrides)
    if not 1 <= int(components) <= 4096:
        raise DinoregError(f"--components must be between 1 and 4096, got {components}")
    if any("pca_components" in e.keys() for e in spec.encoders):
        spec = spec.with_flat({"pca_components": components})
    encoders = tuple(e.replace(slice_match=False) if "slice_match" in e.keys() else e for e in spec.encoders)
    spec = RegistrationSpec(spec.method, encoders, spec.ensemble,
                            spec.preprocess.replace(fixed_modality=modality, moving_modality=modality), spec.run)
    img = as_image(image, "image")
    norm = normalise(img.array, spec.preprocess.intensity("fixed"), img.name)
    threshold = spec.preprocess.mask_threshold
    mask = check_mask(threshold_mask(norm, threshold), f"{img.name} (intensity threshold {threshold})")
    pair = RegistrationPair(norm, norm, mask, mask, None, img.affine, tuple(float(s) for s in img.spacing),
                            resolve_device(device))  # type: ignore[arg-type]
    parts = encode_pair(spec, pair, Progress(progress))
    array = parts[0].fixed[0].detach().cpu().float().numpy()
    return array[:components], feature_affine(img.affine, img.shape, array.shape[1:])
