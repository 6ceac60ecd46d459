"""Abdomen MR -> CT inter-patient pair (TotalSegmentator examples), built the Learn2Reg way.

Fixed: CT ``example_ct_sm`` (+ ``example_seg``); moving: MR ``example_mr_sm`` (+ ``example_seg_mr``).
Each image and label map is resampled (image trilinear, labels nearest neighbour) onto a 2 mm RAS
grid of 128 x 112 x 48 voxels centred on the world centre of **its own** field of view, and both
are saved with the CT's grid affine, so they overlap as if centred (Learn2Reg AbdomenMRCT style).
Labels 1-7 (spleen, kidney R, kidney L, gallbladder, liver, stomach, pancreas) carry the same
values in both maps; everything else is set to 0.

Usage: python benchmarks/abdomen_pair.py OUTDIR [--world]
(writes ct.nii.gz, ct_seg.nii.gz, mr.nii.gz, mr_seg.nii.gz; ``--world``: the MR keeps its own world
coordinates, see :func:`build_abdomen_pair`)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SHAPE = (128, 112, 48)
SPACING = 2.0
LABELS = [1, 2, 3, 4, 5, 6, 7]
SRC = "data/totalsegmentator_examples"


def centred_grid(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """RAS affine of a SPACING-mm grid of SHAPE whose centre is the world centre of ``affine``/``shape``."""
    centre = affine[:3, :3] @ ((np.asarray(shape[:3]) - 1) / 2.0) + affine[:3, 3]
    out = np.diag([SPACING, SPACING, SPACING, 1.0])
    out[:3, 3] = centre - SPACING * (np.asarray(SHAPE) - 1) / 2.0
    return out


def resample(data: np.ndarray, affine: np.ndarray, grid: np.ndarray, order: int, cval: float) -> np.ndarray:
    from scipy.ndimage import map_coordinates

    idx = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1).reshape(-1, 3)
    world = idx @ grid[:3, :3].T + grid[:3, 3]
    vox = (world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    out = map_coordinates(data.astype(np.float32), vox.T, order=order, mode="constant", cval=cval)
    return out.reshape(SHAPE)


def build_abdomen_pair(shared: Path, out: Path, keep_world: bool = False) -> dict[str, Path]:
    """Write the four files to ``out``; returns their paths (keys fixed, fixed_labels, moving, moving_labels).

    ``keep_world``: save the MR (and its labels) with its own grid's affine, in its own world
    coordinates, instead of the CT's: the same voxels as the centred pair, but the two scans do
    not overlap physically (the pair ``--init`` has to align)."""
    import nibabel as nib

    out.mkdir(parents=True, exist_ok=True)
    src = Path(shared) / SRC
    ct_img = nib.as_closest_canonical(nib.load(str(src / "example_ct_sm.nii.gz")))
    ct_grid = centred_grid(ct_img.affine, ct_img.shape)
    paths = {}
    for key, image, seg, cval in (("fixed", "example_ct_sm.nii.gz", "example_seg.nii.gz", -1024.0),
                                  ("moving", "example_mr_sm.nii.gz", "example_seg_mr.nii.gz", 0.0)):
        img = nib.load(str(src / image))
        lab = nib.load(str(src / seg))
        grid = centred_grid(img.affine, img.shape)
        vol = resample(np.asanyarray(img.dataobj), img.affine, grid, 1, cval)
        labels = resample(np.asanyarray(lab.dataobj), lab.affine, grid, 0, 0.0).round().astype(np.int16)
        labels[~np.isin(labels, LABELS)] = 0
        name = "ct" if key == "fixed" else "mr"
        paths[key] = out / f"{name}.nii.gz"
        paths[key + "_labels"] = out / f"{name}_seg.nii.gz"
        affine = grid if keep_world else ct_grid
        nib.save(nib.Nifti1Image(vol.astype(np.float32), affine), str(paths[key]))
        nib.save(nib.Nifti1Image(labels, affine), str(paths[key + "_labels"]))
    return paths


if __name__ == "__main__":
    shared = Path(__file__).resolve().parents[2] / "shared"
    args = [a for a in sys.argv[1:] if a != "--world"]
    print(build_abdomen_pair(shared, Path(args[0] if args else "/tmp/abdomen_pair"), keep_world="--world" in sys.argv))
