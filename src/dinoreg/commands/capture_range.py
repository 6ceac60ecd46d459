"""``dinoreg capture-range IMAGE --encoder dinov2 [--encoder litemedsam] -o curves.png``.

Feature-distance curves (L1 and cosine) of one slice against its rotated (-90..90 deg in pi/32
steps) and translated (-57.6..57.6 mm in 1.2 mm steps) copies, per encoder, as in Kögl,
Reithmeir et al., Fig. 3; see :mod:`dinoreg.capture_range` for exactly what is compared.
Writes the PNG and a CSV with every number beside it (same stem, ``.csv``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dinoreg.cli import command
from dinoreg.errors import DinoregError


@command("capture-range", "plot L1/cosine feature-distance curves of a slice under rotation and translation")
def _capture_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="a 2D image or a volume (one slice is taken)")
    p.add_argument("--encoder", action="append", required=True,
                   help="2D encoder (dinov2, litemedsam, sam, medsam); repeat for several")
    p.add_argument("-o", "--output", required=True, help="output PNG (the CSV is written beside it)")
    p.add_argument("--slice-axis", type=int, default=-1, help="axis of a volume to slice (default: last)")
    p.add_argument("--slice", type=int, help="slice index (default: the middle slice)")
    p.add_argument("--translation-axis", type=int, default=0, choices=[0, 1],
                   help="in-plane axis (of the 2D slice) of the translation")
    p.add_argument("--max-rotation", type=float, default=90.0,
                   help="largest rotation, degrees (steps of pi/32; default 90)")
    p.add_argument("--max-translation", type=float, default=57.6,
                   help="largest translation, mm (steps of 1.2 mm; default 57.6)")
    p.add_argument("--upsample", type=float, default=1.0,
                   help="scale factor before encoding (finer feature maps; LiteMedSAM/SAM resize anyway)")
    p.add_argument("--raw", action="store_true", help="plot raw distances instead of curves rescaled to [0, 1]")
    p.add_argument("--weights", help="encoder weights file (only with one --encoder)")
    p.add_argument("--modality", default="auto", choices=["auto", "ct", "mr", "none"])
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def take_slice(array: np.ndarray, spacing: np.ndarray, axis: int, index: int | None) -> tuple[np.ndarray, tuple]:
    """The 2D slice and its in-plane spacing; a ``(I, J, 1)`` image is its own slice."""
    if array.ndim == 3 and array.shape[2] == 1 and axis in (-1, 2):
        return array[:, :, 0], (float(spacing[0]), float(spacing[1]))
    if not -3 <= axis < 3:
        raise DinoregError(f"--slice-axis must be 0, 1, 2 or -1, got {axis}")
    axis %= 3
    n = array.shape[axis]
    index = n // 2 if index is None else index
    if not 0 <= index < n:
        raise DinoregError(f"--slice {index} is outside 0..{n - 1} along axis {axis}")
    sl = np.take(array, index, axis=axis)
    if min(sl.shape) < 8:
        raise DinoregError(f"slice {sl.shape} is too small to encode")
    return sl, tuple(float(s) for i, s in enumerate(spacing) if i != axis)


@_capture_args.handler
def _capture(args: argparse.Namespace) -> int:
    from dinoreg.capture_range import basin, compute_curves, half_width, plot, rotations_deg, translations_mm, write_csv
    from dinoreg.features.registry import encoder_entry, encoder_names, load_encoder2d
    from dinoreg.io.atomic import atomic_path, publish
    from dinoreg.io.images import as_image
    from dinoreg.pipeline import resolve_device
    from dinoreg.preprocess import Intensity, normalise
    from dinoreg.result import prepare_outdir

    for name in args.encoder:
        if name not in encoder_names("slice"):
            raise DinoregError(f"unknown 2D encoder {name!r}; choose from {', '.join(encoder_names('slice'))}")
    if args.weights and len(args.encoder) > 1:
        raise DinoregError("--weights applies to one --encoder only")
    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise DinoregError("output must be a .png file", out)
    prepare_outdir(out.parent if str(out.parent) else ".")
    img = as_image(args.image, "image")
    sl, spacing = take_slice(img.array, img.spacing, args.slice_axis, args.slice)
    grey = normalise(np.ascontiguousarray(sl, dtype=np.float32), Intensity(args.modality), img.name)
    device = resolve_device(args.device)
    if not (0 <= args.max_rotation <= 180 and 0 <= args.max_translation):
        raise DinoregError("--max-rotation must be in [0, 180] degrees and --max-translation >= 0 mm")
    angles, shifts = rotations_deg(args.max_rotation), translations_mm(args.max_translation)

    n_total = len(args.encoder) * (1 + len(angles) + len(shifts))
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=n_total, desc="capture range", unit="slice")
    curves = []
    try:
        for name in args.encoder:
            if bar is not None:
                bar.set_postfix(encoder=name)
            spec = encoder_entry(name).spec(**({"weights": args.weights} if args.weights else {}))
            enc = load_encoder2d(name, spec, device)
            curves += compute_curves(enc, grey, spacing, angles_deg=angles, shifts_mm=shifts,
                                     translation_axis=args.translation_axis,
                                     upsample=args.upsample, label=name,
                                     progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()

    csv_path = out.with_suffix(".csv")
    tmp_png, tmp_csv = atomic_path(out), atomic_path(csv_path)
    title = f"{img.name}: slice {sl.shape}, spacing {spacing[0]:.2f}x{spacing[1]:.2f} mm, translation along axis {args.translation_axis}"
    plot(curves, tmp_png, title=title, normalise=not args.raw)
    write_csv(curves, tmp_csv)
    publish(tmp_png, out)
    publish(tmp_csv, csv_path)
    for c in curves:
        for dist in ("l1", "cos"):
            left, right = basin(c.values[dist], c.params)
            hl, hr = half_width(c.values[dist], c.params)
            at_zero = "yes" if c.minimum_at_zero(dist) else "NO"
            print(f"{c.encoder:>10} {c.kind:<11} {dist:<3} minimum at 0: {at_zero:<3} "
                  f"monotone basin -{left:g}/+{right:g} {c.unit}, half-height width -{hl:g}/+{hr:g} {c.unit}")
    print(f"plot: {out}")
    print(f"csv: {csv_path}")
    return 0
