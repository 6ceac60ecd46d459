"""Command-line interface: ``dinoreg register | warp | evaluate | ...``.

Every user-facing problem ends as one line on stderr (``dinoreg: error: <file>: <problem>``)
and exit status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from dinoreg.errors import DinoregError

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Handler, str]] = {}


def command(name: str, help_text: str) -> Callable[[Callable[[argparse.ArgumentParser], None]], Any]:
    """Register a sub-command: the decorated function adds its arguments; ``handler`` runs it."""

    def wrap(add_args: Callable[[argparse.ArgumentParser], None]) -> Any:
        def bind(handler: Handler) -> Handler:
            _COMMANDS[name] = (add_args, handler, help_text)
            return handler

        add_args.handler = bind  # type: ignore[attr-defined]
        return add_args

    return wrap


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_intensity(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fixed-modality", choices=["auto", "ct", "mr", "none"], help="default auto")
    p.add_argument("--moving-modality", choices=["auto", "ct", "mr", "none"], help="default auto")
    p.add_argument("--ct-window", nargs=2, type=float, metavar=("LEVEL", "WIDTH"),
                   help="CT window in HU (default 50 400, abdomen; lung: -600 1500)")
    p.add_argument("--mr-percentile", type=float, help="MR upper clip percentile (default 99.5; DINO-Reg: 97)")


def _add_eval_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fixed-labels", help="fixed label map (for Dice/HD95)")
    p.add_argument("--moving-labels", help="moving label map (warped with nearest neighbour)")
    p.add_argument("--fixed-landmarks", help="fixed landmarks CSV (for TRE)")
    p.add_argument("--moving-landmarks", help="moving landmarks CSV (for TRE)")
    p.add_argument("--landmarks-space", default="voxel", choices=["voxel", "ras", "lps"],
                   help="landmark coordinates: voxel indices (Learn2Reg) or world mm in RAS or LPS")
    p.add_argument("--labels", help="labels to score: comma list or a .npz/.txt file (default: all shared)")


def parse_label_list(value: str | None) -> list[int] | None:
    """``"2,3,4"`` or a file (``.npz``/``.npy`` with one array, or text with one label per
    line/comma); anything else, or no label at all, raises :class:`DinoregError` naming ``--labels``."""
    if value is None:
        return None
    path = Path(value)
    try:
        labels = _label_file(path) if path.is_file() else [int(x) for x in value.split(",") if x.strip()]
    except (ValueError, TypeError, OSError, UnicodeDecodeError) as exc:
        what = f"{path}: cannot read integer labels ({type(exc).__name__})" if path.is_file() else repr(value)
        raise DinoregError(f"expects a comma list of integers or a file of them, got {what}", "--labels") from exc
    if not labels:
        raise DinoregError(f"lists no label, got {value!r}", "--labels")
    return labels


def _label_file(path: Path) -> list[int]:
    """Integer labels from ``.npz``/``.npy`` (one array) or a text file; non-integers raise ValueError."""
    import numpy as np

    if path.suffix in (".npz", ".npy"):
        data = np.load(path, allow_pickle=False)
        array = np.asarray(data[list(data.keys())[0]] if isinstance(data, np.lib.npyio.NpzFile) else data)
        if array.dtype.kind not in "biuf":
            raise ValueError(f"dtype {array.dtype}")
        values = [float(x) for x in array.ravel()]
    else:
        values = [float(x) for x in path.read_text(encoding="utf-8").replace(",", " ").split()]
    if not all(np.isfinite(v) and v == int(v) for v in values):
        raise ValueError("not integers")
    return [int(v) for v in values]


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["iterations=10", "similarity=lcc"]`` -> ``{"iterations": 10, "similarity": "lcc"}``
    (values read as JSON when they parse, else kept as strings)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DinoregError(f"--set expects KEY=VALUE, got {item!r}", "--set")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def add_set_option(p: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable): any setting of the registration (``dinoreg presets --keys``)."""
    p.add_argument("--set", action="append", metavar="KEY=VALUE", dest="overrides",
                   help="set any registration setting, e.g. --set iterations=20 (repeatable; "
                        "'dinoreg presets --keys' lists them)")


@command("register", "register MOVING onto FIXED; writes disp_*.nii.gz, the warped image, metrics.json")
def _register_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("fixed")
    p.add_argument("moving")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--preset", help="named registration (default mind; 'dinoreg presets' lists them)")
    p.add_argument("--method", help="convexadam (feature volumes) or ffd (B-spline, encoder in the loss); "
                                    "--method ffd selects the ffd preset unless --preset is given")
    p.add_argument("--features", help="encoder name or ensemble a+b (mind, dinov2, dino3d, mind+dinov2; "
                                      "for ffd: litemedsam, dinov2, sam, medsam)")
    p.add_argument("--alpha", type=float, help="ffd: weight of the feature distance in [0, 1] (0 = NCC alone)")
    p.add_argument("--feature-distance", help="ffd: feature distance (cos or l1)")
    p.add_argument("--grid-spacing", type=float, help="ffd: control-point spacing, mm")
    p.add_argument("--levels", type=int, nargs="+", help="ffd: pyramid factors, coarse to fine (e.g. 2 1)")
    p.add_argument("--slice-stride", type=int, help="ffd in 3D: encode every k-th slice per iteration")
    p.add_argument("--feature-upsample", type=float, help="ffd: slice upsampling before the encoder")
    p.add_argument("--weights", help="encoder weights file")
    p.add_argument("--fixed-mask")
    p.add_argument("--moving-mask")
    p.add_argument("--mask-threshold", type=float, help="foreground threshold on [0, 1] intensities (default 0.05)")
    p.add_argument("--similarity", help="Adam-stage similarity (ssd or lcc)")
    p.add_argument("--lambda", dest="lambda_weight", type=float, help="diffusion regulariser weight")
    p.add_argument("--iterations", type=int, help="Adam iterations")
    p.add_argument("--grid-sp", type=int, help="convex cell size, voxels")
    p.add_argument("--disp-hw", type=int, help="convex search half width, cells")
    p.add_argument("--grid-sp-adam", type=int, help="Adam cell size, voxels")
    p.add_argument("--no-ic", action="store_true", help="skip inverse consistency in the convex stage")
    p.add_argument("--seed", type=int, help="seed (default 0): same seed and device, same field")
    p.add_argument("--init", choices=["none", "centre", "moments", "affine"],
                   help="initial alignment before the deformable stages (default none): image centres, centres of "
                        "mass, or a 12-dof affine on MIND-SSC from the centres of mass")
    p.add_argument("--name", help="file name of the field (default: Learn2Reg naming)")
    p.add_argument("--qc", action="store_true", help="also write a quality-control PNG (qc_*.png)")
    add_set_option(p)
    _add_eval_inputs(p)
    _add_intensity(p)
    _add_common(p)


def register_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flat settings the ``register`` options give (``None``: not given)."""
    overrides = dict(method=args.method, features=args.features, alpha=args.alpha,
                     feature_distance=args.feature_distance, grid_spacing=args.grid_spacing,
                     levels=args.levels, slice_stride=args.slice_stride, feature_upsample=args.feature_upsample,
                     weights=args.weights, similarity=args.similarity, lambda_weight=args.lambda_weight,
                     iterations=args.iterations, grid_sp=args.grid_sp, disp_hw=args.disp_hw,
                     grid_sp_adam=args.grid_sp_adam, ic=False if args.no_ic else None, seed=args.seed,
                     mask_threshold=args.mask_threshold, fixed_modality=args.fixed_modality,
                     moving_modality=args.moving_modality, ct_window=args.ct_window,
                     mr_percentile=args.mr_percentile, init=args.init)
    overrides.update(parse_overrides(args.overrides))
    return overrides


@_register_args.handler
def _register(args: argparse.Namespace) -> int:
    from dinoreg.api import register, resolve_spec
    from dinoreg.pipeline import resolve_device
    from dinoreg.result import check_field_name, check_outdir

    preset_name = args.preset or ("ffd" if args.method == "ffd" else "mind")
    spec = resolve_spec(preset_name, **register_overrides(args))  # bad settings: error before any work
    device = resolve_device(args.device)
    check_outdir(args.output)
    check_field_name(args.name)
    labels = parse_label_list(args.labels)
    result = register(args.fixed, args.moving, spec=spec, fixed_mask=args.fixed_mask,
                      moving_mask=args.moving_mask, fixed_labels=args.fixed_labels,
                      moving_labels=args.moving_labels, fixed_landmarks=args.fixed_landmarks,
                      moving_landmarks=args.moving_landmarks, landmarks_space=args.landmarks_space,
                      eval_labels=labels, device=device, progress=not args.quiet,
                      defer_metrics=True)  # computed by save, while the volumes are written
    result.settings["preset"] = preset_name
    written = result.save(args.output, name=args.name, qc=args.qc)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    t = result.timings
    print(f"time: {t['total']:.1f} s (encode {t.get('encode', 0.0):.1f} s, optimise {t.get('optimise', 0.0):.1f} s)")
    if result.metrics:
        print(summary_line(result.metrics))
    return 0


def summary_line(m: dict[str, Any]) -> str:
    """One line with the headline metrics of an ``evaluate_pair`` dict."""
    parts = []
    for key, label in (("dice_mean", "Dice"), ("hd95_vox_mean", "HD95 (vox)"), ("hd95_mm_mean", "HD95 (mm)"),
                       ("tre_mm_mean", "TRE (mm)"), ("sdlogj", "SDlogJ"), ("folding_fraction", "folding")):
        value = m.get(key)
        if value is not None:
            parts.append(f"{label} {value:.4f}")
    return "metrics: " + ", ".join(parts)


@command("warp", "apply a displacement field to an image or label map")
def _warp_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="moving image or label map (on its own grid)")
    p.add_argument("field", help="disp_*.nii.gz written by dinoreg register")
    p.add_argument("-o", "--output", required=True, help="output file (.nii.gz, .mha, .nrrd)")
    p.add_argument("--labels", action="store_true", help="nearest-neighbour interpolation for label maps")
    p.add_argument("--fixed", help="fixed image, when the field file carries no affine")


@_warp_args.handler
def _warp(args: argparse.Namespace) -> int:
    from dinoreg.api import warp
    from dinoreg.io.atomic import check_output_file
    from dinoreg.io.images import WRITE_SUFFIXES, save_image

    check_output_file(args.output, WRITE_SUFFIXES)
    out = warp(args.image, args.field, fixed=args.fixed, labels=args.labels)
    array = out.array.astype("int16") if args.labels else out.array
    print(f"warped: {save_image(array, out.affine, args.output)}")
    return 0


@command("evaluate", "score a displacement field on a labelled / landmarked pair (Learn2Reg metrics)")
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("field", help="disp_*.nii.gz")
    p.add_argument("--fixed", help="fixed image (its grid), default: the field's affine")
    p.add_argument("--moving", help="moving image (its grid, for moving labels/landmarks on another grid)")
    p.add_argument("--fixed-mask", help="mask for SDlogJ/folding")
    p.add_argument("-o", "--output", help="write metrics JSON here")
    _add_eval_inputs(p)


@_evaluate_args.handler
def _evaluate(args: argparse.Namespace) -> int:
    from dinoreg.api import evaluate
    from dinoreg.io.atomic import check_output_file, write_text_atomic
    from dinoreg.metrics import to_jsonable

    if args.output is not None:
        check_output_file(args.output)
    m = evaluate(args.field, args.fixed_labels, args.moving_labels, fixed_landmarks=args.fixed_landmarks,
                 moving_landmarks=args.moving_landmarks, fixed=args.fixed, moving=args.moving,
                 landmarks_space=args.landmarks_space, eval_labels=parse_label_list(args.labels),
                 fixed_mask=args.fixed_mask)
    text = json.dumps(to_jsonable(m), indent=2)
    if args.output is not None:
        write_text_atomic(args.output, text)
        print(f"metrics: {args.output}")
    else:
        print(text)
    print(summary_line(m))
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one ``dinoreg: error:`` line and exit status 2, like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"dinoreg: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The full ``dinoreg`` argument parser."""
    _load_extra_commands()
    parser = _Parser(prog="dinoreg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (add_args, _, help_text) in _COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _load_extra_commands() -> None:
    """Import every module of ``dinoreg.commands``; each registers its own sub-commands."""
    from dinoreg.plugins import import_submodules

    import_submodules("dinoreg.commands")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dinoreg`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _, handler, _ = _COMMANDS[args.command]
    try:
        return handler(args)
    except DinoregError as exc:
        print(f"dinoreg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dinoreg: interrupted", file=sys.stderr)
        return 130


def run() -> NoReturn:
    """The ``dinoreg`` console script: :func:`main`, then exit without the interpreter's teardown.

    Every output is complete and renamed into place when :func:`main` returns, so after
    flushing the standard streams and running the ``atexit`` handlers (logging, Ray) the process
    ends at once: freeing torch's and numba's module state one object at a time took 0.5-0.7 s of
    a 12 s ``make demo``. :func:`main` itself returns normally (tests call it in-process)."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    atexit._run_exitfuncs()
    os._exit(code)


if __name__ == "__main__":  # run through the package module so plugin commands register once
    from dinoreg import cli as _cli

    _cli.run()
