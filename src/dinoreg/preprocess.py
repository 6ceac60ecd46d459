"""Intensity preprocessing and foreground masks.

Every function takes and returns numpy arrays ``(I, J, K)``; intensities come out as float32
in ``[0, 1]``. CT is windowed (level/width in HU, e.g. 50/400 abdomen, -600/1500 lung); MR is
clipped at a percentile of its non-zero voxels (97 in DINO-Reg) and min-max scaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dinoreg.errors import DinoregError
from dinoreg.spec import Spec, setting

CT_WINDOWS = {"abdomen": (50.0, 400.0), "lung": (-600.0, 1500.0), "brain": (40.0, 80.0), "bone": (400.0, 1800.0)}


def window(array: np.ndarray, level: float, width: float) -> np.ndarray:
    """CT window: map ``[level - width/2, level + width/2]`` HU linearly to ``[0, 1]``, clipped."""
    if width <= 0:
        raise DinoregError(f"CT window width must be positive, got {width}")
    low = level - width / 2.0
    return np.clip((array.astype(np.float32, order="C") - low) / float(width), 0.0, 1.0)


def percentile_scale(array: np.ndarray, upper: float = 99.5, lower: float | None = None) -> np.ndarray:
    """Clip at the ``upper`` percentile of the non-zero voxels (and ``lower``, or the minimum),
    then scale to ``[0, 1]``."""
    values = array[array != 0]
    if values.size == 0:
        values = array.ravel()
    hi = float(np.percentile(values, upper))
    lo = float(np.percentile(values, lower)) if lower is not None else float(min(array.min(), 0.0))
    if hi <= lo:
        hi = float(array.max())
        lo = float(array.min())
    if hi <= lo:
        return np.zeros_like(array, dtype=np.float32)
    return np.clip((array.astype(np.float32, order="C") - lo) / (hi - lo), 0.0, 1.0)


@dataclass
class Intensity:
    """How to bring one image to ``[0, 1]``.

    ``modality``: ``auto`` (CT window when the image looks like HU, else MR clip), ``ct``, ``mr``
    or ``none`` (min-max only). ``ct_window``: (level, width). ``mr_percentile``: upper clip.
    """

    modality: str = "auto"
    ct_window: tuple[float, float] = CT_WINDOWS["abdomen"]
    mr_percentile: float = 99.5


MODALITIES = ("auto", "ct", "mr", "none")


@dataclass(frozen=True)
class PreprocessSpec(Spec):
    """How both images are brought to ``[0, 1]`` and where their foreground is."""

    fixed_modality: str = setting("auto", "fixed image: auto (CT window when it looks like HU, else MR clip), "
                                          "ct, mr or none (min-max)", choices=MODALITIES)
    moving_modality: str = setting("auto", "moving image: as fixed_modality", choices=MODALITIES)
    ct_window: tuple[float, ...] = setting(CT_WINDOWS["abdomen"], "CT window (level, width) in HU", length=2,
                                           low=-5000.0, high=10000.0)
    mr_percentile: float = setting(99.5, "MR upper clip percentile of the non-zero voxels", low=0.0, low_open=True,
                                   high=100.0)
    mask_threshold: float = setting(0.05, "foreground threshold on the [0, 1] intensities (without a mask file)",
                                    low=0.0, high=1.0, high_open=True)
    init: str = setting("none", "initial alignment before the deformable stages: none, centre (fields of view), "
                                "moments (centres of mass), affine (12 dof on MIND-SSC, from the centres of mass)",
                        choices=("none", "centre", "moments", "affine"))
    init_iterations: int = setting(80, "affine initial alignment: Adam iterations per level (2 levels)",
                                   low=1, high=100000)

    def check(self) -> None:
        if self.ct_window[1] <= 0:
            raise DinoregError(f"setting 'ct_window' needs a positive width, got {self.ct_window[1]:g}")

    def intensity(self, which: str) -> Intensity:
        """The :class:`Intensity` of the ``"fixed"`` or ``"moving"`` image."""
        modality = self.fixed_modality if which == "fixed" else self.moving_modality
        return Intensity(modality, (float(self.ct_window[0]), float(self.ct_window[1])), self.mr_percentile)


def looks_like_ct(array: np.ndarray) -> bool:
    """Heuristic: Hounsfield units have a large negative background (air at about -1000): the
    1st percentile is below -500 (never when the minimum is not, which spares MR the sort)."""
    return float(array.min()) < -500.0 and float(np.percentile(array, 1)) < -500.0


def check_not_constant(array: np.ndarray, name: str) -> None:
    """Reject an image whose voxels all hold the same value (nothing to register)."""
    if float(array.max()) == float(array.min()):
        raise DinoregError("image is constant (every voxel has the same value)", name)


def normalise(array: np.ndarray, settings: Intensity | None = None, name: str = "<array>") -> np.ndarray:
    """Scale an image to ``[0, 1]`` float32 as ``settings`` says; reject constant images. The
    result is C-ordered whatever the input's layout (NIfTI arrays load Fortran-ordered): the
    stages' kernels read C order, and each would otherwise copy it."""
    s = settings or Intensity()
    check_not_constant(array, name)
    modality = s.modality.lower()
    if modality == "auto":
        modality = "ct" if looks_like_ct(array) else "mr"
    if modality == "ct":
        return window(array, *s.ct_window)
    if modality == "mr":
        return percentile_scale(array, s.mr_percentile)
    if modality == "none":
        lo, hi = float(array.min()), float(array.max())
        return ((array.astype(np.float32, order="C") - lo) / (hi - lo)).astype(np.float32)
    raise DinoregError(f"unknown modality {s.modality!r}; choose auto, ct, mr or none")


def threshold_mask(normalised: np.ndarray, threshold: float = 0.05) -> np.ndarray:
    """Foreground where the normalised intensity exceeds ``threshold`` (boolean ``(I, J, K)``)."""
    return normalised > threshold


def check_mask(mask: np.ndarray, name: str) -> np.ndarray:
    """Binarise a mask and reject an empty one."""
    binary = np.asarray(mask) > 0
    if not binary.any():
        raise DinoregError("mask is empty (no foreground voxel)", name)
    return binary


def check_labels(labels: np.ndarray, name: str) -> np.ndarray:
    """Integer label map; reject non-integer values."""
    arr = np.asarray(labels)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise DinoregError("label map holds non-integer values", name)
    return arr.astype(np.int32)
