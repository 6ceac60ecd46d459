"""The Python API: :func:`register`, :func:`warp`, :func:`evaluate`.

``register(fixed, moving)`` returns a :class:`Result` whose ``disp`` is the Learn2Reg field:
``(I, J, K, 3)`` float32 in voxels of the fixed grid, components ``(i, j, k)``, pull-back
(``warped(p) = moving(p + disp(p))``). When the moving image lies on another grid it is first
resampled onto the fixed grid through the two affines; ``disp`` indexes that resampled volume and
:func:`warp` repeats the same resampling, so warping the original moving image reproduces
``Result.warped``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dinoreg import metrics as l2r_metrics
from dinoreg.errors import DinoregError
from dinoreg.features.registry import EncodeRequest, PairFeatures, get_encoder
from dinoreg.io.images import Image, as_image, load_image, save_image, to_fixed_grid
from dinoreg.io.landmarks import load_landmarks, world_to_voxel, voxel_to_world
from dinoreg.io.learn2reg import disp_name
from dinoreg.optim.convex import ConvexConfig
from dinoreg.optim.convex_adam import ConvexAdamConfig, convex_adam
from dinoreg.optim.instance import InstanceConfig
from dinoreg.preprocess import (Intensity, check_labels, check_mask, check_not_constant, normalise,
                                threshold_mask)
from dinoreg.presets import preset
from dinoreg.progress import Progress
from dinoreg.spatial.grid import field_from_numpy, field_to_numpy
from dinoreg.spatial.grid import warp as warp_tensor

ImageLike = Any  # path, Image, numpy array, nibabel or SimpleITK image


@dataclass
class Result:
    """The outcome of one registration.

    Attributes:
        disp: ``(I, J, K, 3)`` float32 field, voxels of the fixed grid, pull-back.
        fixed: the fixed image (its affine is written with every output).
        warped: the moving image warped onto the fixed grid, ``(I, J, K)`` float32.
        warped_labels: moving labels warped by nearest neighbour, when given.
        metrics: Learn2Reg metrics when labels and/or landmarks were given.
        timings: seconds per stage.
        settings: the resolved settings used.
    """

    disp: np.ndarray
    fixed: Image
    warped: np.ndarray
    warped_labels: np.ndarray | None = None
    metrics: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    moving_path: str | None = None
    moving: np.ndarray | None = None  # the moving image on the fixed grid, before registration

    def save(self, outdir: str | os.PathLike, name: str | None = None, qc: bool = False) -> dict[str, Path]:
        """Write the field, the warped image (and labels), ``metrics.json`` and, with ``qc``, the
        quality-control picture ``qc_*.png`` (three mid-planes: images, checkerboard, grid,
        Jacobian determinant with folds marked) into ``outdir``.

        Everything is written into a temporary folder inside ``outdir`` first and moved into
        place only when every file is complete. Returns the written paths by kind.
        """
        out = _prepare_outdir(outdir)
        field_name = name or disp_name(self.fixed.path or "fixed.nii.gz", self.moving_path or "moving.nii.gz")
        stem = field_name[len("disp_"):] if field_name.startswith("disp_") else field_name
        files: dict[str, tuple[str, Any]] = {
            "disp": (field_name, self.disp.astype(np.float32)),
            "warped": ("warped_" + stem, self.warped.astype(np.float32)),
        }
        if self.warped_labels is not None:
            files["warped_labels"] = ("warped_labels_" + stem, self.warped_labels.astype(np.int16))
        written: dict[str, Path] = {}
        tmpdir = Path(tempfile.mkdtemp(prefix=".dinoreg-", dir=out))
        try:
            for kind, (fname, array) in files.items():
                save_image(array, self.fixed.affine, tmpdir / fname)
            if self.metrics is not None:
                (tmpdir / "metrics.json").write_text(json.dumps(l2r_metrics.to_jsonable(self.metrics), indent=2))
                files["metrics"] = ("metrics.json", None)
            if qc and self.moving is not None:
                from dinoreg.report import qc_figure

                qc_name = "qc_" + stem.replace(".nii.gz", "") + ".png"
                qc_figure(self.fixed.array, self.moving, self.warped, self.disp, tmpdir / qc_name, title=stem,
                          spacing=tuple(float(v) for v in self.fixed.spacing), affine=self.fixed.affine)
                files["qc"] = (qc_name, None)
            for kind, (fname, _) in files.items():
                os.replace(tmpdir / fname, out / fname)
                written[kind] = out / fname
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return written


def _prepare_outdir(outdir: str | os.PathLike) -> Path:
    out = Path(outdir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DinoregError(f"cannot create output directory ({exc.strerror})", out) from exc
    if not os.access(out, os.W_OK):
        raise DinoregError("output directory is not writable", out)
    return out


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
    return torch.device(device)


def _optimiser_config(s: dict[str, Any]) -> ConvexAdamConfig:
    return ConvexAdamConfig(
        convex=ConvexConfig(grid_sp=int(s["grid_sp"]), disp_hw=int(s["disp_hw"]),
                            inverse_consistent=bool(s["ic"])),
        instance=InstanceConfig(grid_sp=int(s["grid_sp_adam"]), iterations=int(s["iterations"]),
                                lr=float(s["lr"]), lambda_weight=float(s["lambda_weight"]),
                                similarity=str(s["similarity"]), param_factor=int(s.get("param_factor", 1))),
        final_smoothing=int(s.get("final_smoothing", 0)),
    )


def _load_mask(mask: ImageLike | None, normalised: np.ndarray, reference: Image, threshold: float,
               name: str) -> np.ndarray:
    if mask is None:
        return check_mask(threshold_mask(normalised, threshold), f"{name} (intensity threshold {threshold})")
    m = as_image(mask, name)
    if not m.same_grid(reference):
        if m.shape != reference.shape:
            raise DinoregError(f"mask grid {m.shape} does not match its image grid {reference.shape}", m.name)
    return check_mask(m.array, m.name)


def _encode_parts(fixed: np.ndarray, moving: np.ndarray, fmask: np.ndarray, mmask: np.ndarray,
                  affine: np.ndarray, settings: dict[str, Any], device: torch.device,
                  progress: Progress) -> list[PairFeatures]:
    """One :class:`PairFeatures` per encoder named in ``settings["features"]`` (``a+b``)."""
    parts = []
    for name in str(settings["features"]).split("+"):
        request = EncodeRequest(fixed, moving, fmask, mmask, affine, device, progress, settings)
        parts.append(get_encoder(name)(request))
    return parts


def _ensemble_weights(settings: dict[str, Any], n: int) -> list[float]:
    weights = settings.get("ensemble_weights") or [1.0] * n
    if len(weights) != n:
        raise DinoregError(f"ensemble_weights needs {n} values for features {settings['features']!r}")
    return [float(w) for w in weights]


def _encode(fixed: np.ndarray, moving: np.ndarray, fmask: np.ndarray, mmask: np.ndarray, affine: np.ndarray,
            settings: dict[str, Any], device: torch.device, progress: Progress) -> PairFeatures:
    parts = _encode_parts(fixed, moving, fmask, mmask, affine, settings, device, progress)
    if len(parts) == 1:
        return parts[0]
    return combine_features(parts, _ensemble_weights(settings, len(parts)))


def combine_features(parts: Sequence[PairFeatures], weights: Sequence[float]) -> PairFeatures:
    """Ensemble by concatenating channels. The first encoder's block keeps its own scale (the
    one its presets are tuned for); every other block is scaled so its mean squared norm per
    voxel (over both images) is ``weight_i / weight_0`` times the first block's. Blocks are
    brought to the finest grid among them. The first initial field found is kept."""
    shape = max((tuple(p.fixed.shape[2:]) for p in parts), key=lambda s: int(np.prod(s)))
    fixed, moving, reference = [], [], None
    for part, weight in zip(parts, weights):
        f, m = part.fixed, part.moving
        if tuple(f.shape[2:]) != shape:
            f = torch.nn.functional.interpolate(f, size=shape, mode="trilinear", align_corners=False)
            m = torch.nn.functional.interpolate(m, size=shape, mode="trilinear", align_corners=False)
        power = 0.5 * (f.pow(2).sum(1).mean() + m.pow(2).sum(1).mean())
        if reference is None:
            reference = power / weight
            scale = torch.ones(())
        else:
            scale = torch.sqrt(weight * reference / power.clamp_min(1e-12))
        fixed.append(f * scale)
        moving.append(m * scale)
    init = next((p.init for p in parts if p.init is not None), None)
    return PairFeatures(torch.cat(fixed, 1), torch.cat(moving, 1), init)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def _moving_landmarks_on_fixed_grid(path: ImageLike, moving: Image, fixed: Image, space: str) -> np.ndarray:
    points = load_landmarks(path, moving, space=space)
    if moving.same_grid(fixed):
        return points
    return world_to_voxel(voxel_to_world(points, moving.affine), fixed.affine)


def _register_convex_adam(fix_norm: np.ndarray, mov_norm: np.ndarray, fmask: np.ndarray, mmask: np.ndarray,
                          fix_img: Image, settings: dict[str, Any], dev: torch.device, reporter: Progress,
                          timings: dict[str, float]) -> torch.Tensor:
    """Encode the pair, then ConvexAdam on the feature volumes; returns ``(1, 3, I, J, K)``.

    An ensemble (``features="a+b"``) either concatenates the encoders' channels into one
    optimisation (``ensemble="concat"``, default) or registers with each and averages the
    fields with ``ensemble_weights`` (``ensemble="average"``).
    """
    t1 = time.perf_counter()
    parts = _encode_parts(fix_norm, mov_norm, fmask, mmask, fix_img.affine, settings, dev, reporter)
    timings["encode"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    cfg = _optimiser_config(settings)
    weights = _ensemble_weights(settings, len(parts))
    if len(parts) > 1 and settings.get("ensemble", "concat") == "average":
        fields = [_optimise(part, fix_img.shape, cfg, reporter) for part in parts]
        disp_t = sum(w * f for w, f in zip(weights, fields)) / sum(weights)
    else:
        feats = parts[0] if len(parts) == 1 else combine_features(parts, weights)
        disp_t = _optimise(feats, fix_img.shape, cfg, reporter)
    timings["optimise"] = time.perf_counter() - t2
    return disp_t


def _optimise(feats: PairFeatures, shape: tuple[int, int, int], cfg: ConvexAdamConfig,
              reporter: Progress) -> torch.Tensor:
    with reporter.stage("optimise", total=1 + cfg.instance.iterations) as step:
        return convex_adam(feats.fixed.float(), feats.moving.float(), shape, cfg, init=feats.init,
                           progress=lambda stage, i, total: step(1) if i > 0 else None)


def _register_ffd(fix_norm: np.ndarray, mov_norm: np.ndarray, fmask: np.ndarray | None, fix_img: Image,
                  settings: dict[str, Any], dev: torch.device, reporter: Progress,
                  timings: dict[str, float]) -> torch.Tensor:
    """B-spline FFD with an optional 2D encoder in the loss; returns ``(1, 3, I, J, K)``.

    A single-slice image (``K == 1``) is registered in 2D and its field gets a zero third
    component, so one convention holds for 2D and 3D. ``fmask`` (a user-given fixed mask)
    restricts both distances; without one the whole image counts, as in the paper.
    """
    from dinoreg.features.dinov2_pair import slice_axis
    from dinoreg.features.encoders2d import load_encoder2d
    from dinoreg.optim.ffd import FFDRegistration
    from dinoreg.spatial.bspline import spacing_from_mm

    t1 = time.perf_counter()
    is_2d = fix_img.shape[2] == 1
    alpha = float(settings.get("alpha", 0.0))
    encoder = None
    if settings.get("features") not in (None, "none") and alpha > 0:
        encoder = load_encoder2d(str(settings["features"]), settings.get("weights"), dev)
    timings["encode"] = time.perf_counter() - t1
    voxel_mm = tuple(float(v) for v in fix_img.spacing[: 2 if is_2d else 3])
    ffd = FFDRegistration(
        encoder, alpha=alpha, feature_distance=str(settings.get("feature_distance", "cos")),
        image_distance=str(settings.get("image_distance", "ncc")),
        grid_spacing=spacing_from_mm(float(settings.get("grid_spacing", 8.0)), voxel_mm),
        reg_weight=float(settings.get("reg_weight", 0.1)), iterations=settings.get("iterations", 100),
        lr=float(settings.get("lr", 0.1)), levels=tuple(settings.get("levels", (1,))),
        slice_axis=-1 if is_2d else slice_axis(settings.get("slice_axis", "auto"), fix_img.affine),
        slice_stride=int(settings.get("slice_stride", 1)),
        feature_upsample=float(settings.get("feature_upsample", 1.0)), balance=bool(settings.get("balance", True)),
        progress=reporter.enabled)
    t2 = time.perf_counter()
    fixed_t = torch.from_numpy(fix_norm).to(dev)[None, None]
    moving_t = torch.from_numpy(mov_norm).to(dev)[None, None]
    mask_t = None if fmask is None else torch.from_numpy(fmask.astype(np.float32)).to(dev)[None, None]
    if is_2d:
        fixed_t, moving_t = fixed_t[..., 0], moving_t[..., 0]
        mask_t = None if mask_t is None else mask_t[..., 0]
    disp = ffd.register(fixed_t, moving_t, mask=mask_t)
    if is_2d:
        disp = torch.cat([disp, torch.zeros_like(disp[:, :1])], 1)[..., None]
    timings["optimise"] = time.perf_counter() - t2
    return disp.detach().float()


def register(fixed: ImageLike, moving: ImageLike, *, preset_name: str = "mind",
             fixed_mask: ImageLike | None = None, moving_mask: ImageLike | None = None,
             fixed_labels: ImageLike | None = None, moving_labels: ImageLike | None = None,
             fixed_landmarks: str | os.PathLike | None = None, moving_landmarks: str | os.PathLike | None = None,
             landmarks_space: str = "voxel", eval_labels: Sequence[int] | None = None,
             fixed_intensity: Intensity | None = None, moving_intensity: Intensity | None = None,
             mask_threshold: float = 0.05, device: str | torch.device = "auto", seed: int = 0,
             progress: bool = True, **overrides: Any) -> Result:
    """Register ``moving`` onto ``fixed``.

    Args:
        fixed, moving: paths (NIfTI, MHA, NRRD, DICOM folder, npy/npz), :class:`Image`, numpy
            arrays (identity affine), nibabel or SimpleITK images.
        preset_name: settings bundle (``mind``, ``convexadam``, ``dinoreg``, ...); ``overrides``
            replace any of its keys (``features="mind+dinov2"``, ``iterations=100``, ...).
        fixed_mask, moving_mask: foreground masks; default: normalised intensity > ``mask_threshold``.
        fixed_labels, moving_labels: label maps; moving labels are warped, and with both, Dice and
            HD95 are computed (over ``eval_labels`` when given).
        fixed_landmarks, moving_landmarks: CSV files; TRE is computed with both.
        landmarks_space: ``voxel`` (i, j, k rows), ``ras`` or ``lps`` (world mm).
        fixed_intensity, moving_intensity: how each image is scaled to [0, 1].
        device: ``auto``, ``cpu`` or ``cuda``.
        seed: seeds torch and numpy (same seed and device give the same field).
        progress: show progress bars on stderr.

    Returns:
        a :class:`Result`.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    settings = preset(preset_name)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    dev = resolve_device(device)
    _seed(seed)
    reporter = Progress(progress)

    fix_img = as_image(fixed, "fixed")
    mov_orig = as_image(moving, "moving")
    check_not_constant(mov_orig.array, mov_orig.name)
    mov_img = to_fixed_grid(mov_orig, fix_img, order=1)
    fix_norm = normalise(fix_img.array, fixed_intensity, fix_img.name)
    mov_norm = normalise(mov_img.array, moving_intensity, mov_orig.name)
    fmask = _load_mask(fixed_mask, fix_norm, fix_img, mask_threshold, fix_img.name)
    mmask_img = None if moving_mask is None else to_fixed_grid(as_image(moving_mask, "moving mask"), fix_img, order=0)
    mmask = _load_mask(mmask_img, mov_norm, fix_img, mask_threshold, mov_orig.name)
    timings["load"] = time.perf_counter() - t0

    if settings.get("method", "convexadam") == "ffd":
        disp_t = _register_ffd(fix_norm, mov_norm, fmask if fixed_mask is not None else None, fix_img, settings,
                               dev, reporter, timings)
    else:
        disp_t = _register_convex_adam(fix_norm, mov_norm, fmask, mmask, fix_img, settings, dev, reporter, timings)

    disp = field_to_numpy(disp_t)
    mov_t = torch.from_numpy(np.ascontiguousarray(mov_img.array, dtype=np.float32)).to(dev)[None, None]
    warped = warp_tensor(mov_t, disp_t.to(dev), padding_mode="zeros")[0, 0].cpu().numpy()

    result = Result(disp=disp, fixed=fix_img, warped=warped, timings=timings, settings=settings,
                    moving_path=mov_orig.path, moving=mov_img.array)
    _attach_labels_and_metrics(result, mov_orig, fixed_labels, moving_labels, fixed_landmarks, moving_landmarks,
                               landmarks_space, eval_labels, fmask if fixed_mask is not None else None)
    timings["total"] = time.perf_counter() - t0
    return result


def _label_image(obj: ImageLike, name: str) -> Image:
    img = load_image(obj, dtype=None) if isinstance(obj, (str, os.PathLike)) else as_image(obj, name)
    return img.with_array(check_labels(img.array, img.name))


def _attach_labels_and_metrics(result: Result, mov_orig: Image, fixed_labels: ImageLike | None,
                               moving_labels: ImageLike | None, fixed_landmarks: Any, moving_landmarks: Any,
                               space: str, eval_labels: Sequence[int] | None, fixed_mask: np.ndarray | None) -> None:
    fix_img = result.fixed
    fseg = mseg = None
    if moving_labels is not None:
        mlab = _label_image(moving_labels, "moving labels")
        if mlab.shape != mov_orig.shape:
            raise DinoregError(f"label map grid {mlab.shape} does not match the moving image {mov_orig.shape}",
                               mlab.name)
        mseg = to_fixed_grid(Image(mlab.array, mov_orig.affine, mlab.path), fix_img, order=0).array
        result.warped_labels = l2r_metrics.warp_segmentation(mseg, result.disp)
    if fixed_labels is not None:
        flab = _label_image(fixed_labels, "fixed labels")
        if flab.shape != fix_img.shape:
            raise DinoregError(f"label map grid {flab.shape} does not match the fixed image {fix_img.shape}",
                               flab.name)
        fseg = flab.array
    flms = mlms = None
    if fixed_landmarks is not None and moving_landmarks is not None:
        flms = load_landmarks(fixed_landmarks, fix_img, space=space)
        mlms = _moving_landmarks_on_fixed_grid(moving_landmarks, mov_orig, fix_img, space)
        if len(flms) != len(mlms):
            raise DinoregError(f"has {len(mlms)} landmarks but the fixed file has {len(flms)}", moving_landmarks)
    if (fseg is not None and mseg is not None) or flms is not None:
        result.metrics = l2r_metrics.evaluate_pair(
            result.disp, fixed_seg=fseg if mseg is not None else None, moving_seg=mseg if fseg is not None else None,
            labels=None if eval_labels is None else list(eval_labels), fixed_lms=flms, moving_lms=mlms,
            spacing=tuple(float(s) for s in fix_img.spacing), fixed_mask=fixed_mask)


def load_field(path: str | os.PathLike) -> Image:
    """Read a displacement field ``(I, J, K, 3)`` (voxels of the fixed grid)."""
    p = Path(path)
    if not p.exists():
        raise DinoregError("file not found", p)
    import nibabel as nib

    try:
        img = nib.load(str(p))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise DinoregError(f"cannot read displacement field ({exc})", p) from exc
    while data.ndim > 4 and data.shape[3] == 1:
        data = data[:, :, :, 0]
    if data.ndim != 4 or data.shape[-1] != 3:
        raise DinoregError(f"expected a displacement field of shape (I, J, K, 3), got {data.shape}", p)
    if not np.isfinite(data).all():
        raise DinoregError("displacement field holds NaN/Inf values", p)
    return Image(data, np.asarray(img.affine, dtype=np.float64), str(p))


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
    field_img = load_field(disp) if isinstance(disp, (str, os.PathLike)) else (
        disp if isinstance(disp, Image) else Image(np.asarray(disp, dtype=np.float32), np.eye(4)))
    grid_affine = as_image(fixed, "fixed").affine if fixed is not None else field_img.affine
    shape = tuple(field_img.array.shape[:3])
    if labels:
        src = _label_image(image, "moving labels")
        src = src if src.same_grid(Image(np.zeros(shape), grid_affine)) else Image(
            _resample_labels(src, shape, grid_affine), grid_affine, src.path)
        out = l2r_metrics.warp_segmentation(src.array, field_img.array)
        return Image(out, grid_affine, None)
    src = as_image(image, "moving")
    target = Image(np.zeros(shape, np.float32), grid_affine)
    src = to_fixed_grid(src, target, order=1)
    mov_t = torch.from_numpy(np.ascontiguousarray(src.array, dtype=np.float32))[None, None]
    out = warp_tensor(mov_t, field_from_numpy(field_img.array), padding_mode="zeros")[0, 0].numpy()
    return Image(out, grid_affine, None)


def _resample_labels(src: Image, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    from dinoreg.io.images import resample_to_grid

    return resample_to_grid(src, shape, affine, order=0)


def evaluate(disp: Any, fixed_labels: ImageLike | None = None, moving_labels: ImageLike | None = None, *,
             fixed_landmarks: Any = None, moving_landmarks: Any = None, fixed: ImageLike | None = None,
             moving: ImageLike | None = None, landmarks_space: str = "voxel",
             eval_labels: Sequence[int] | None = None, fixed_mask: ImageLike | None = None) -> dict[str, Any]:
    """Learn2Reg metrics of a field on a labelled and/or landmarked pair (see ``dinoreg.metrics``)."""
    field_img = load_field(disp) if isinstance(disp, (str, os.PathLike)) else (
        disp if isinstance(disp, Image) else Image(np.asarray(disp, dtype=np.float32), np.eye(4)))
    grid = Image(np.zeros(field_img.array.shape[:3], np.float32),
                 as_image(fixed, "fixed").affine if fixed is not None else field_img.affine)
    fseg = _label_image(fixed_labels, "fixed labels").array if fixed_labels is not None else None
    mseg = None
    if moving_labels is not None:
        mlab = _label_image(moving_labels, "moving labels")
        mref = as_image(moving, "moving") if moving is not None else None
        geom = Image(mlab.array, mref.affine if mref is not None else mlab.affine, mlab.path)
        mseg = to_fixed_grid(geom, grid, order=0).array
    for seg, name in ((fseg, "fixed labels"), (mseg, "moving labels")):
        if seg is not None and seg.shape != grid.shape:
            raise DinoregError(f"label grid {seg.shape} does not match the field grid {grid.shape}", name)
    flms = mlms = None
    if fixed_landmarks is not None and moving_landmarks is not None:
        flms = load_landmarks(fixed_landmarks, grid, space=landmarks_space)
        mref = as_image(moving, "moving") if moving is not None else grid
        mlms = _moving_landmarks_on_fixed_grid(moving_landmarks, mref, grid, landmarks_space)
    mask = check_mask(as_image(fixed_mask, "fixed mask").array, "fixed mask") if fixed_mask is not None else None
    return l2r_metrics.evaluate_pair(field_img.array, fixed_seg=fseg, moving_seg=mseg,
                                     labels=None if eval_labels is None else list(eval_labels),
                                     fixed_lms=flms, moving_lms=mlms,
                                     spacing=tuple(float(s) for s in grid.spacing), fixed_mask=mask)


def encode(image: ImageLike, *, features: str = "dinov2", preset_name: str = "dinoreg-fast",
           weights: str | None = None, components: int = 24, modality: str = "auto",
           mask_threshold: float = 0.05, device: str | torch.device = "auto", progress: bool = True,
           **overrides: Any) -> tuple[np.ndarray, np.ndarray]:
    """Feature volume of one image, PCA-reduced on its foreground.

    Returns:
        ``(C, I', J', K')`` float32 features and the ``(4, 4)`` affine of the feature grid
        (cell-centred over the image, see ``dinoreg.commands.encode.feature_affine``).
    """
    from dinoreg.commands.encode import feature_affine

    settings = preset(preset_name)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    settings.update(features=features, pca_components=components)
    if weights is not None:
        settings["weights"] = weights
    img = as_image(image, "image")
    norm = normalise(img.array, Intensity(modality), img.name)
    mask = check_mask(threshold_mask(norm, mask_threshold), f"{img.name} (intensity threshold {mask_threshold})")
    feats = _encode(norm, norm, mask, mask, img.affine, {**settings, "slice_match": False}, resolve_device(device),
                    Progress(progress))
    array = feats.fixed[0].detach().cpu().float().numpy()
    if features == "mind":  # MIND is not PCA-reduced by its encoder
        array = array[:components]
    return array, feature_affine(img.affine, img.shape, array.shape[1:])
