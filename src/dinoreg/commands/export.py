"""``dinoreg export``: a dinoreg field as an ITK/ANTs/Slicer displacement field or in RAS mm."""

from __future__ import annotations

import argparse
import sys

from dinoreg.cli import command


@command("export", "write a field for ITK/ANTs/3D Slicer (LPS mm) or in RAS mm, optionally inverted")
def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("field", help="disp_*.nii.gz written by dinoreg register (voxels of the fixed grid)")
    p.add_argument("--fixed", required=True, help="fixed image (the field's grid and physical geometry)")
    p.add_argument("--moving", help="moving image (optional: checked, and reports how much maps outside it)")
    p.add_argument("--to", required=True, metavar="{itk,ants,mm}",
                   help="itk or ants (the same file: LPS-mm displacement vector image on the fixed grid, "
                        "for sitk.DisplacementFieldTransform / antsApplyTransforms -t / Slicer), "
                        "or mm (RAS-mm vectors, NIfTI with the fixed affine)")
    p.add_argument("-o", "--output", required=True, help="output file (.nii.gz, .nii, .mha, .nrrd; mm: NIfTI)")
    p.add_argument("--inverse", action="store_true",
                   help="export the inverse mapping (fixed-point iteration on the fixed grid; warps fixed onto moving)")
    p.add_argument("--iterations", type=int, default=100, help="--inverse: maximum fixed-point iterations")
    p.add_argument("--quiet", action="store_true",
                   help="no notes on stderr (the written path and the inverse residual are always printed)")


@_export_args.handler
def _export(args: argparse.Namespace) -> int:
    from dinoreg.io.export import export_field

    result = export_field(args.field, args.fixed, args.output, to=args.to, moving=args.moving,
                          inverse=args.inverse, iterations=args.iterations)
    print(f"{'inverse ' if result.inverse else ''}{result.to}: {result.path}")
    if result.residual is not None:
        print(result.residual.line())
    if not args.quiet:
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
    return 0
