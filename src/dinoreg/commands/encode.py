"""``dinoreg encode IMAGE -o features.nii.gz``: an encoder's feature volume, for viewing.

The volume is written on the feature grid with an affine that places each feature cell where
it lies in the image (cell-centred: feature voxel ``a`` of ``n`` along an axis of ``I`` voxels
sits at image voxel ``(a + 0.5) * I / n - 0.5``), reduced by PCA to ``--components`` channels
fitted on the image's foreground.
"""

from __future__ import annotations

import argparse

import numpy as np

from dinoreg.cli import command


@command("encode", "write an encoder's PCA-reduced feature volume of IMAGE (for viewing)")
def _encode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image")
    p.add_argument("-o", "--output", required=True, help="output NIfTI (C channels in the 4th axis)")
    p.add_argument("--features", default="dinov2", help="encoder: dinov2, mind, dino3d")
    p.add_argument("--preset", default="dinoreg-fast", help="preset supplying the encoder settings")
    p.add_argument("--weights", help="encoder weights file")
    p.add_argument("--components", type=int, default=24, help="PCA channels (3 gives an RGB-like view)")
    p.add_argument("--modality", default="auto", choices=["auto", "ct", "mr", "none"])
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")


@_encode_args.handler
def _encode(args: argparse.Namespace) -> int:
    from dinoreg.api import encode
    from dinoreg.io.atomic import check_output_file
    from dinoreg.io.images import WRITE_SUFFIXES, save_image
    from dinoreg.pipeline import resolve_device

    check_output_file(args.output, WRITE_SUFFIXES)
    resolve_device(args.device)
    feats, affine = encode(args.image, features=args.features, preset_name=args.preset, weights=args.weights,
                           components=args.components, modality=args.modality, device=args.device,
                           progress=not args.quiet)
    path = save_image(np.moveaxis(feats, 0, -1).astype(np.float32), affine, args.output)
    print(f"features: {path} (grid {feats.shape[1:]}, {feats.shape[0]} channels)")
    return 0
