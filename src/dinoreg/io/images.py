"""Images with their physical geometry.

A :class:`Image` holds a voxel array indexed ``[i, j, k]`` in the order nibabel returns it
(also the Learn2Reg order) and the 4x4 affine that maps ``(i, j, k, 1)`` to world millimetres
in RAS (nibabel's convention). NIfTI is read with nibabel; MHA/MHD/NRRD files and DICOM series
are read with SimpleITK and converted to the same convention (array transposed from ITK's
``[z, y, x]`` to ``[x, y, z]``, LPS direction flipped to RAS).

A 2D image (shape ``(I, J)``) is returned as a volume of shape ``(I, J, 1)`` so that one
convention serves 2D and 3D.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dinoreg.errors import DinoregError
from dinoreg.io.atomic import atomic_path, check_output_file
from dinoreg.io.compression import gzip_writer

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
NUMPY_SUFFIXES = (".npy", ".npz")
WRITE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")  # single files: the rename is atomic
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Image:
    """A 3D array with its voxel-to-world (RAS mm) affine.

    Attributes:
        array: voxel values, shape ``(I, J, K)``; float32 for intensities, integers for labels.
        affine: ``(4, 4)`` float64 matrix mapping ``(i, j, k, 1)`` to RAS millimetres.
        path: the file it was read from, when it was read from one (used in error messages).
    """

    array: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    path: str | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[:3])  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along ``i, j, k`` (norms of the affine's columns)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def name(self) -> str:
        return self.path or "<array>"

    def with_array(self, array: np.ndarray) -> "Image":
        """The same geometry holding another array (e.g. a warped image or a label map)."""
        return Image(array, self.affine.copy(), self.path)

    def same_grid(self, other: "Image", tol: float = 1e-4) -> bool:
        """True when both images have the same shape and affine (to ``tol`` mm)."""
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=tol)


def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)


def sitk_to_array_affine(img: Any) -> tuple[np.ndarray, np.ndarray]:
    """Convert a SimpleITK image to a ``[i, j, k]`` array and a RAS affine."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(img)  # [z, y, x] (+ components)
    dim = img.GetDimension()
    if img.GetNumberOfComponentsPerPixel() > 1:
        array = np.moveaxis(array, -1, 0)
        array = np.transpose(array, (0,) + tuple(range(array.ndim - 1, 0, -1)))
        array = np.moveaxis(array, 0, -1)
    else:
        array = np.transpose(array, tuple(range(array.ndim - 1, -1, -1)))
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    lps = np.eye(4)
    lps[:dim, :dim] = direction * spacing[None, :]
    lps[:dim, 3] = origin
    return array, LPS_TO_RAS @ lps


def array_affine_to_sitk(array: np.ndarray, affine: np.ndarray) -> Any:
    """Convert an ``[i, j, k]`` array with a RAS affine to a SimpleITK image (LPS)."""
    import SimpleITK as sitk

    lps = LPS_TO_RAS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing[None, :]
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in lps[:3, 3]])
    img.SetDirection([float(d) for d in direction.ravel()])
    return img


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        files = reader.GetGDCMSeriesFileNames(str(path))
        if not files:
            raise DinoregError("directory holds no DICOM series", path)
        reader.SetFileNames(files)
        img = reader.Execute()
    else:
        img = sitk.ReadImage(str(path))
    return sitk_to_array_affine(img)


def _read_numpy(path: Path, key: str | None) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(str(path))
    if isinstance(data, np.lib.npyio.NpzFile):
        keys = list(data.keys())
        chosen = key if key is not None else ("vol" if "vol" in keys else keys[0])
        if chosen not in keys:
            raise DinoregError(f"no array named {chosen!r} (has {', '.join(keys)})", path)
        data = data[chosen]
    return np.asarray(data), np.eye(4)


def check_numeric(array: np.ndarray, name: str) -> None:
    """Reject arrays that are not real numbers (strings, objects, complex values)."""
    if np.iscomplexobj(array):
        raise DinoregError("holds complex values (refused: the imaginary part would be dropped)", name)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise DinoregError(f"holds non-numeric values (dtype {array.dtype})", name)


def _to_volume(array: np.ndarray, path: str) -> np.ndarray:
    """Squeeze trailing singleton axes, promote 2D to ``(I, J, 1)``, reject anything else."""
    check_numeric(array, path)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise DinoregError(f"expected a 3D volume (or a 2D image), got an array of shape {array.shape}", path)
    if min(array.shape) < 1:
        raise DinoregError(f"empty image of shape {array.shape}", path)
    return array


def check_finite(array: np.ndarray, name: str) -> None:
    """Raise a :class:`DinoregError` naming ``name`` when ``array`` holds NaN or Inf."""
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise DinoregError(f"holds {bad} NaN/Inf voxels", name)


def check_geometry(affine: np.ndarray, name: str) -> np.ndarray:
    """The ``(4, 4)`` voxel-to-world affine as float64; a non-finite or degenerate one (a zero voxel
    size, axes that are not independent) raises a :class:`DinoregError` naming ``name``."""
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.isfinite(aff).all():
        raise DinoregError("image geometry (affine) holds NaN/Inf values or is not 4x4", name)
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    if (spacing <= 1e-6).any():
        axis = int(np.argmin(spacing))
        raise DinoregError(f"degenerate image geometry: voxel size along axis {axis} is {spacing[axis]:g} mm "
                           "(zero column in the affine)", name)
    if abs(np.linalg.det(aff[:3, :3] / spacing[None, :])) < 1e-6:
        raise DinoregError("degenerate image geometry: the affine's axes are not independent (singular)", name)
    return aff


def _image(array: np.ndarray, affine: np.ndarray, path: str | None, name: str, dtype: Any) -> Image:
    """An :class:`Image` after every check: numeric 2D/3D values, finite voxels, sound geometry."""
    array = _to_volume(np.asanyarray(array), name)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    check_finite(array, name)
    return Image(array, check_geometry(affine, name), path)


def load_image(path: str | os.PathLike, *, key: str | None = None, dtype: Any = np.float32) -> Image:
    """Read a NIfTI, MHA/MHD/NRRD file, DICOM series folder or ``.npy``/``.npz`` array.

    Args:
        path: the file (or DICOM folder).
        key: array name inside an ``.npz`` (default ``vol``, else the first).
        dtype: the array's dtype after reading; ``None`` keeps the stored type.

    Returns:
        an :class:`Image` of shape ``(I, J, K)`` with its RAS affine (identity for numpy files).

    Raises:
        DinoregError: missing or unreadable file, not 2D/3D, non-numeric or complex values, NaN or
            Inf voxels, a degenerate affine (zero voxel size, singular, NaN).
    """
    p = Path(path)
    if not p.exists():
        raise DinoregError("file not found", p)
    try:
        if _has_suffix(p, NIFTI_SUFFIXES):
            array, affine = _read_nifti(p)
        elif _has_suffix(p, NUMPY_SUFFIXES):
            array, affine = _read_numpy(p, key)
        else:
            array, affine = _read_itk(p)
    except DinoregError:
        raise
    except Exception as exc:  # nibabel / SimpleITK raise many types for a bad file
        raise DinoregError(f"cannot read image ({type(exc).__name__}: {exc})", p) from exc
    return _image(array, affine, str(p), str(p), dtype)


def as_image(obj: Any, name: str = "<array>") -> Image:
    """Accept a path, an :class:`Image`, a numpy array, a nibabel or a SimpleITK image."""
    if isinstance(obj, Image):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return load_image(obj)
    if isinstance(obj, np.ndarray):
        return _image(obj, np.eye(4), None, name, np.float32)
    module = type(obj).__module__
    if module.startswith("nibabel"):
        return _image(np.asanyarray(obj.dataobj), obj.affine, None, name, np.float32)
    if module.startswith("SimpleITK"):
        return _image(*sitk_to_array_affine(obj), None, name, np.float32)
    if hasattr(obj, "detach"):  # a torch tensor
        return as_image(obj.detach().cpu().numpy(), name)
    raise DinoregError(f"cannot use an object of type {type(obj).__name__} as an image", name)


def save_image(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write ``array`` with ``affine`` to ``path`` atomically (temporary name, then rename).

    NIfTI (``.nii.gz``, ``.nii``) is written with nibabel (``.nii.gz`` compressed by
    :func:`dinoreg.io.compression.gzip_writer`: standard gzip, level 1, streamed); ``.mha``/``.nrrd`` with SimpleITK
    (converted to LPS); other suffixes, a missing or read-only folder raise :class:`DinoregError`.
    A displacement field ``(I, J, K, 3)`` is written as a 4D NIfTI, as Learn2Reg expects.
    """
    p = check_output_file(path, WRITE_SUFFIXES)
    try:
        tmp = atomic_path(p)
    except OSError as exc:
        raise DinoregError(f"cannot write here ({exc.strerror})", p.parent) from exc
    try:
        if _has_suffix(p, ITK_SUFFIXES):
            import SimpleITK as sitk

            sitk.WriteImage(array_affine_to_sitk(array, affine), str(tmp))
        else:
            import nibabel as nib

            img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
            img.header.set_xyzt_units("mm")
            if _has_suffix(p, (".nii.gz",)):
                with gzip_writer(tmp) as stream:  # the bytes nib.save writes, compressed faster, no copy in memory
                    img.to_stream(stream)
            else:
                nib.save(img, str(tmp))
        os.replace(tmp, p)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, DinoregError):
            raise
        raise DinoregError(f"cannot write ({type(exc).__name__}: {exc})", p) from exc
    return p


def has_geometry(obj: Any) -> bool:
    """Whether an image-like input carries its own affine: False for numpy arrays and
    ``.npy``/``.npz`` files (identity affine by default: they take their image's geometry)."""
    if isinstance(obj, np.ndarray) or hasattr(obj, "detach"):
        return False
    if isinstance(obj, (str, os.PathLike)):
        return not _has_suffix(Path(obj), NUMPY_SUFFIXES)
    if isinstance(obj, Image):
        return obj.path is None or not _has_suffix(Path(obj.path), NUMPY_SUFFIXES)
    return True


def world_overlap(image: Image, reference: Image) -> float:
    """Share of ``reference``'s voxel centres (on a coarse lattice of at most 16 per axis) that
    fall inside ``image``'s field of view (within half a voxel of its outer voxel centres)."""
    axes = [np.linspace(0, n - 1, min(n, 16)) for n in reference.shape]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    world = points @ reference.affine[:3, :3].T + reference.affine[:3, 3]
    inside = (world - image.affine[:3, 3]) @ np.linalg.inv(image.affine[:3, :3]).T
    shape = np.asarray(image.shape, dtype=np.float64)
    ok = np.all((inside >= -0.5) & (inside <= shape - 0.5), axis=1)
    return float(ok.mean())


def on_image_grid(labels: Image, image: Image, geometric: bool = True, what: str = "label map") -> Image:
    """A label map or mask on its image's grid, nearest neighbour.

    ``labels`` on the same grid as ``image`` is returned as it is. With its own geometry
    (``geometric``) on another grid it is resampled through the two affines, world space (e.g.
    stored with a flipped axis and the affine adjusted, or on a finer grid); it must overlap the
    image's field of view. Without geometry (numpy input) it must have the image's shape.

    Raises:
        DinoregError: a shape mismatch without geometry, or no overlap in world space.
    """
    if labels.same_grid(image):
        return labels
    if not geometric:
        if labels.shape != image.shape:
            raise DinoregError(f"{what} grid {labels.shape} does not match its image grid {image.shape} "
                               "(and it carries no affine to map it)", labels.name)
        return Image(labels.array, image.affine.copy(), labels.path)
    if world_overlap(labels, image) == 0.0:
        raise DinoregError(f"{what} does not cover its image: their fields of view do not overlap in world "
                           "space (check the affines)", labels.name)
    return Image(resample_to_grid(labels, image.shape, image.affine, order=0), image.affine.copy(), labels.path)


def resample_to_grid(image: Image, shape: tuple[int, int, int], affine: np.ndarray, order: int = 1,
                     cval: float = 0.0) -> np.ndarray:
    """Sample ``image`` on another voxel grid through the two affines (world space).

    Args:
        image: the source image.
        shape, affine: the target grid (``(I, J, K)`` and its voxel-to-RAS affine).
        order: 1 for intensities (trilinear), 0 for labels (nearest neighbour).
        cval: value outside the source field of view.

    Returns:
        the resampled array of shape ``shape`` (float32, or the label dtype for order 0).
    """
    from scipy.ndimage import affine_transform

    target_to_source = np.linalg.inv(image.affine) @ np.asarray(affine, dtype=np.float64)
    out_dtype = image.array.dtype if order == 0 else np.float32
    src = image.array if order == 0 else image.array.astype(np.float32, copy=False)
    out = affine_transform(src, target_to_source[:3, :3], offset=target_to_source[:3, 3],
                           output_shape=tuple(shape), order=order, mode="constant", cval=cval,
                           output=out_dtype)
    return out


def to_fixed_grid(moving: Image, fixed: Image, order: int = 1) -> Image:
    """The moving image on the fixed grid (a copy of ``moving`` when the grids already agree)."""
    if moving.same_grid(fixed):
        return moving
    return Image(resample_to_grid(moving, fixed.shape, fixed.affine, order=order), fixed.affine.copy(),
                 moving.path)
