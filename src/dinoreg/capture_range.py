"""Capture range of encoder feature distances (Kögl, Reithmeir et al., Fig. 3).

One 2D slice ``F`` (intensities in ``[0, 1]``) is transformed rigidly, ``F_T = F o T``, by

* a rotation about the slice centre, ``-90 deg .. +90 deg`` in steps of ``pi / 32``, and
* a translation along one in-plane axis, ``-57.6 .. +57.6 mm`` in steps of ``1.2 mm`` (millimetres
  converted to pixels with the slice's spacing along that axis),

resampled bilinearly with zero outside the slice. For each transform both images are encoded
and the distance between the two feature maps is measured **on the same (fixed) grid, without
mapping the transformed features back**: ``d(T) = D(enc(F), enc(F o T))``. This is what the
paper describes ("encode the transformed and original images ... and measure the dissimilarity
between the two feature maps") and it is exactly the registration cost landscape: ``F o T`` is
the warped moving image for a moving image equal to ``F`` and candidate transform ``T``, so a
good measure has its minimum (0) at ``T = identity`` and rises smoothly away from it. Mapping
the features back would instead measure how equivariant the encoder is, which is another
question.

Before the distance, both feature maps are min-max normalised to ``[0, 1]`` **jointly** (one
minimum and one maximum over both maps and all channels; the paper "normalizes the features to
the range [0, 1]"), so L1 values of different encoders are on a comparable scale while a
difference between the two maps is not normalised away. ``l1`` is the mean absolute difference
(over channels, then locations) and ``cos`` is ``1 - cosine`` per location, averaged
(:func:`dinoreg.losses.l1_distance`, :func:`dinoreg.losses.cosine_distance`).

For plotting, each curve may be rescaled to ``[0, 1]`` (its own minimum and maximum); the raw
values are kept in the CSV. :func:`basin` measures the capture range of a curve: how far the
curve rises monotonically on each side of zero before its first local minimum (or the end of
the sampled range).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dinoreg.errors import DinoregError
from dinoreg.features.base import Encoder2D
from dinoreg.losses import cosine_distance, l1_distance

ROTATION_STEP_RAD = math.pi / 32
ROTATION_MAX_DEG = 90.0
TRANSLATION_STEP_MM = 1.2
TRANSLATION_MAX_MM = 57.6
DISTANCES = ("l1", "cos")


def rotations_deg(max_deg: float = ROTATION_MAX_DEG, step_rad: float = ROTATION_STEP_RAD) -> np.ndarray:
    """Rotation angles in degrees, symmetric about 0 (``-90 .. 90`` in ``pi/32`` steps: 33 values)."""
    n = int(math.floor(math.radians(max_deg) / step_rad + 1e-9))
    return np.degrees(np.arange(-n, n + 1) * step_rad)


def translations_mm(max_mm: float = TRANSLATION_MAX_MM, step_mm: float = TRANSLATION_STEP_MM) -> np.ndarray:
    """Translations in mm, symmetric about 0 (``-57.6 .. 57.6`` in 1.2 mm steps: 97 values)."""
    n = int(math.floor(max_mm / step_mm + 1e-9))
    return np.arange(-n, n + 1) * step_mm


def rigid_transform(image: torch.Tensor, angle_deg: float = 0.0, shift_px: Sequence[float] = (0.0, 0.0),
                    spacing: Sequence[float] = (1.0, 1.0)) -> torch.Tensor:
    """``image o T`` for a 2D image ``(N, 1, H, W)``: rotation by ``angle_deg`` about the image
    centre (in physical space, so anisotropic pixels rotate correctly) and a translation of
    ``shift_px`` pixels along ``(axis 0, axis 1)``. Pull-back: output pixel ``p`` takes the value
    at ``R (p - c) + c - shift``, i.e. the content moves by ``+shift`` and rotates by ``+angle``.
    Bilinear, zero outside."""
    if image.ndim != 4:
        raise DinoregError(f"expected a 2D image (N, 1, H, W), got {tuple(image.shape)}")
    h, w = image.shape[2:]
    dev, dt = image.device, image.dtype
    sy, sx = (float(s) for s in spacing)
    ii, jj = torch.meshgrid(torch.arange(h, device=dev, dtype=dt), torch.arange(w, device=dev, dtype=dt),
                            indexing="ij")
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    y, x = (ii - cy) * sy, (jj - cx) * sx  # mm about the centre
    t = math.radians(angle_deg)
    ys = (math.cos(t) * y + math.sin(t) * x) / sy + cy - float(shift_px[0])
    xs = (-math.sin(t) * y + math.cos(t) * x) / sx + cx - float(shift_px[1])
    grid = torch.stack([2 * xs / max(w - 1, 1) - 1, 2 * ys / max(h - 1, 1) - 1], -1)[None]
    return F.grid_sample(image, grid.expand(image.shape[0], -1, -1, -1), mode="bilinear",
                         padding_mode="zeros", align_corners=True)


def joint_minmax(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both feature maps scaled by one affine map so that their joint range is ``[0, 1]``."""
    lo = torch.minimum(a.amin(), b.amin())
    hi = torch.maximum(a.amax(), b.amax())
    scale = (hi - lo).clamp_min(1e-12)
    return (a - lo) / scale, (b - lo) / scale


def feature_distances(feat_fixed: torch.Tensor, feat_moved: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per batch item: ``l1`` and ``cos`` distance of jointly min-max normalised features."""
    out: dict[str, list[float]] = {"l1": [], "cos": []}
    for b in range(feat_moved.shape[0]):
        f, m = joint_minmax(feat_fixed[0:1], feat_moved[b:b + 1])
        out["l1"].append(float(l1_distance(f, m)))
        out["cos"].append(float(cosine_distance(f, m)))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def basin(values: Sequence[float], params: Sequence[float]) -> tuple[float, float]:
    """Capture range of a curve sampled at ``params`` (containing 0): on each side, the distance
    from 0 to the first sample after which the curve stops rising (first local minimum going
    outward, or the end of the range). Returns ``(left, right)`` as positive numbers."""
    v, p = np.asarray(values, float), np.asarray(params, float)
    zero = int(np.argmin(np.abs(p)))
    right = zero
    while right + 1 < len(v) and v[right + 1] >= v[right]:
        right += 1
    left = zero
    while left - 1 >= 0 and v[left - 1] >= v[left]:
        left -= 1
    return float(abs(p[zero] - p[left])), float(abs(p[right] - p[zero]))


def half_width(values: Sequence[float], params: Sequence[float]) -> tuple[float, float]:
    """Width of the valley: on each side of 0, the distance at which the curve (rescaled to
    ``[0, 1]``) first reaches 0.5 (the end of the range if it never does)."""
    v, p = normalise_curve(values), np.asarray(params, float)
    zero = int(np.argmin(np.abs(p)))
    right = next((i for i in range(zero, len(v)) if v[i] >= 0.5), len(v) - 1)
    left = next((i for i in range(zero, -1, -1) if v[i] >= 0.5), 0)
    return float(abs(p[zero] - p[left])), float(abs(p[right] - p[zero]))


@dataclass
class Curves:
    """Distances of one encoder for one kind of transform (``rotation`` or ``translation``)."""

    encoder: str
    kind: str
    unit: str
    params: np.ndarray
    values: dict[str, np.ndarray] = field(default_factory=dict)

    def minimum_at_zero(self, distance: str) -> bool:
        v = self.values[distance]
        return bool(np.isclose(self.params[int(np.argmin(v))], 0.0))


def compute_curves(encoder: Encoder2D, image: torch.Tensor, spacing: Sequence[float] = (1.0, 1.0), *,
                   angles_deg: Sequence[float] | None = None, shifts_mm: Sequence[float] | None = None,
                   translation_axis: int = 0, upsample: float = 1.0, batch: int = 4,
                   label: str | None = None, progress: Callable[[int], None] | None = None) -> list[Curves]:
    """Rotation and translation curves of one encoder on one slice.

    Args:
        encoder: a frozen :class:`Encoder2D`.
        image: ``(H, W)`` or ``(1, 1, H, W)`` intensities in ``[0, 1]``.
        spacing: pixel size in mm along ``(axis 0, axis 1)``.
        angles_deg, shifts_mm: the transforms (default: the paper's sets, see module doc).
        translation_axis: in-plane axis (0 or 1) of the translation.
        upsample: scale factor applied to every slice before ``encoder.preprocess`` (as
            ``FFDRegistration.feature_upsample``).
        batch: transformed slices per encoder call.
        label: the encoder's name in the results (default: ``encoder.name``).
        progress: called with the number of slices just encoded.
    """
    img = torch.as_tensor(image, dtype=torch.float32)
    img = img[None, None] if img.ndim == 2 else img
    if img.ndim != 4 or img.shape[:2] != (1, 1):
        raise DinoregError(f"capture range needs one 2D slice, got shape {tuple(img.shape)}")
    if translation_axis not in (0, 1):
        raise DinoregError(f"translation axis must be 0 or 1, got {translation_axis}")
    angles = np.asarray(rotations_deg() if angles_deg is None else angles_deg, float)
    shifts = np.asarray(translations_mm() if shifts_mm is None else shifts_mm, float)
    dev = next((p.device for p in getattr(encoder, "parameters", lambda: iter(()))()), torch.device("cpu"))
    img = img.to(dev)

    def encode(x: torch.Tensor) -> torch.Tensor:
        if upsample != 1.0:
            x = F.interpolate(x, scale_factor=upsample, mode="bilinear", align_corners=False)
        feats, _ = encoder.forward(encoder.preprocess(x))
        return feats.float()

    name = label or str(getattr(encoder, "name", type(encoder).__name__))
    results = []
    with torch.no_grad():
        ref = encode(img)
        if progress:
            progress(1)
        for kind, unit, params in (("rotation", "deg", angles), ("translation", "mm", shifts)):
            dists: dict[str, list[torch.Tensor]] = {d: [] for d in DISTANCES}
            for start in range(0, len(params), batch):
                chunk = params[start:start + batch]
                moved = []
                for value in chunk:
                    if kind == "rotation":
                        moved.append(rigid_transform(img, float(value), spacing=spacing))
                    else:
                        shift = [0.0, 0.0]
                        shift[translation_axis] = float(value) / float(spacing[translation_axis])
                        moved.append(rigid_transform(img, 0.0, shift, spacing=spacing))
                d = feature_distances(ref, encode(torch.cat(moved)))
                for key in DISTANCES:
                    dists[key].append(d[key])
                if progress:
                    progress(len(chunk))
            results.append(Curves(name, kind, unit, params,
                                  {k: torch.cat(v).numpy() for k, v in dists.items()}))
    return results


def normalise_curve(values: np.ndarray) -> np.ndarray:
    """A curve rescaled to ``[0, 1]`` by its own minimum and maximum."""
    v = np.asarray(values, float)
    span = v.max() - v.min()
    return (v - v.min()) / span if span > 0 else np.zeros_like(v)


def write_csv(curves: Sequence[Curves], path) -> None:
    """Long-format CSV: ``encoder,transform,unit,value,distance,raw,normalised``."""
    lines = ["encoder,transform,unit,value,distance,raw,normalised"]
    for c in curves:
        for dist, vals in c.values.items():
            norm = normalise_curve(vals)
            for p, v, n in zip(c.params, vals, norm):
                lines.append(f"{c.encoder},{c.kind},{c.unit},{p:.6g},{dist},{v:.8g},{n:.6g}")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def plot(curves: Sequence[Curves], path, title: str = "", normalise: bool = True) -> None:
    """2x2 panels (rows: L1, cos; columns: rotation, translation), one line per encoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), squeeze=False)
    for row, dist in enumerate(DISTANCES):
        for col, kind in enumerate(("rotation", "translation")):
            ax = axes[row][col]
            for c in (c for c in curves if c.kind == kind):
                vals = normalise_curve(c.values[dist]) if normalise else c.values[dist]
                ax.plot(c.params, vals, marker=".", ms=3, lw=1.2, label=c.encoder)
            ax.axvline(0.0, color="grey", lw=0.6, ls=":")
            unit = "deg" if kind == "rotation" else "mm"
            ax.set_xlabel(f"{kind} ({unit})")
            ax.set_ylabel(f"{'L1' if dist == 'l1' else 'cosine'} dissimilarity" + (" (normalised)" if normalise else ""))
            ax.set_title(f"{'L1' if dist == 'l1' else 'cosine'} - {kind}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
