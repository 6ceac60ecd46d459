#!/usr/bin/env python
"""Build a small Learn2Reg-layout dataset ("DevReg") from ../shared/data, for development and tests.

    python scripts/make_dev_dataset.py OUT_DIR [--shared ../shared] [--shrink 2] [--pairs brain,brats]

Writes ``OUT_DIR/dataset.json`` and ``imagesTr/``, ``labelsTr/``, ``keypointsTr/`` with
Learn2Reg names (``DevReg_<case>_<mod>.nii.gz``). Data are copied *out of* the shared folder
into OUT_DIR (a temporary folder); never point OUT_DIR into the repository.

Cases and pairs (``registration_val``; the same list is ``registration_test``):

* 0001 = learn2reg tutorial subject_1 (fixed), 0002 = voxelmorph test_scan (moving): T1 brains,
  FreeSurfer labels; ``labels`` in dataset.json = the 30 VoxelMorph evaluation labels and 1.
* 0003 = LapIRN image A (fixed), 0004 = image B (moving): T1 brains, labels 1 (GM), 2 (WM)
  (label 1 is absent from aseg, 2 is also aseg's left cerebral white matter: one label list fits both).
  (Each label map is written with its image's affine: A's label header is off, see SOURCE.md.)
* 0005 = BraTS-Reg 002, modalities: 0000 baseline t1ce, 0001 follow-up t1ce, 0002 baseline t1,
  0003 follow-up t2, 0004 follow-up flair; pairs (fixed <- moving) t1ce <- t1ce, t1ce <- t2,
  t1 <- flair; keypoints = the 6 landmarks, LPS mm converted to voxel indices of each image.

``--shrink N`` block-averages images by N (labels: the voxel nearest each block centre),
adjusting affines and keypoints, for fast tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

TASK = "DevReg"
REPO = Path(__file__).resolve().parents[1]


def shrink_image(array: np.ndarray, affine: np.ndarray, n: int, labels: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Downsample by an integer factor: block mean (images) or the block-centre voxel (labels).

    The new voxel ``q`` covers old voxels ``n*q .. n*q + n-1``; its centre is old index
    ``n*q + (n-1)/2``, which sets the new affine. Labels take old voxel ``n*q + n//2``.
    """
    if n == 1:
        return array, affine
    shape = [s // n for s in array.shape[:3]]
    cropped = array[: shape[0] * n, : shape[1] * n, : shape[2] * n]
    if labels:
        out = cropped[n // 2::n, n // 2::n, n // 2::n]
    else:
        out = cropped.reshape(shape[0], n, shape[1], n, shape[2], n).mean(axis=(1, 3, 5)).astype(np.float32)
    scale = np.diag([n, n, n, 1.0])
    scale[:3, 3] = (n - 1) / 2.0
    return np.ascontiguousarray(out), affine @ scale


def voxel_keypoints(csv_path: Path, affine: np.ndarray, n: int) -> np.ndarray:
    """BraTS-Reg landmarks (``Landmark,X,Y,Z`` in LPS mm) as voxel indices of the (shrunk) image."""
    rows = np.loadtxt(csv_path, delimiter=",", skiprows=1)
    lps = rows[:, 1:4]
    ras = lps * np.array([-1.0, -1.0, 1.0])
    vox = ras @ np.linalg.inv(affine)[:3, :3].T + np.linalg.inv(affine)[:3, 3]
    return (vox - (n - 1) / 2.0) / n


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return "./" + path.relative_to(path.parents[1]).as_posix()


def _add_image(out: Path, case: str, mod: str, image: Path, n: int, label: Path | None = None,
               landmarks: Path | None = None) -> str:
    img = nib.load(str(image))
    data = np.asarray(img.dataobj, dtype=np.float32)
    arr, aff = shrink_image(data, img.affine, n)
    name = f"{TASK}_{case}_{mod}.nii.gz"
    rel = _save(arr, aff, out / "imagesTr" / name)
    if label is not None:
        lab = np.asarray(nib.load(str(label)).dataobj).astype(np.int16)
        lab_arr, _ = shrink_image(lab, img.affine, n, labels=True)
        _save(lab_arr, aff, out / "labelsTr" / name)
    if landmarks is not None:
        kp = voxel_keypoints(landmarks, img.affine, n)
        (out / "keypointsTr").mkdir(parents=True, exist_ok=True)
        np.savetxt(out / "keypointsTr" / f"{TASK}_{case}_{mod}.csv", kp, delimiter=",", fmt="%.4f")
    return rel


def build(out: Path, shared: Path, shrink: int = 1, groups: tuple[str, ...] = ("brain", "brats")) -> Path:
    """Write the dataset into ``out``; returns the path of ``dataset.json``."""
    data = shared / "data"
    if out.resolve().is_relative_to(REPO):
        raise SystemExit(f"refusing to write data inside the repository: {out}")
    out.mkdir(parents=True, exist_ok=True)
    pairs: list[dict[str, str]] = []
    labels: dict[str, str] = {}
    if "brain" in groups:
        l2r, vxm, lap = data / "learn2reg_tutorial2019_brain_t1", data / "voxelmorph_brain_t1", data / "lapirn_brain_t1_pair"
        f = _add_image(out, "0001", "0000", l2r / "subject_1_vol.nii.gz", shrink, l2r / "subject_1_seg.nii.gz")
        m = _add_image(out, "0002", "0000", vxm / "test_scan_vol.nii.gz", shrink, vxm / "test_scan_seg.nii.gz")
        pairs.append({"fixed": f, "moving": m})
        f = _add_image(out, "0003", "0000", lap / "image_A_160x192x144.nii.gz", shrink,
                       lap / "image_A_160x192x144_seg.nii.gz")
        m = _add_image(out, "0004", "0000", lap / "image_B_160x192x144.nii.gz", shrink,
                       lap / "image_B_160x192x144_seg.nii.gz")
        pairs.append({"fixed": f, "moving": m})
        vxm_labels = np.load(vxm / "labels.npz")
        labels = {"0": "background", "1": "LapIRN grey matter (absent from aseg)",
                  **{str(int(v)): f"aseg {int(v)}" for v in vxm_labels[vxm_labels.files[0]]}}
    if "brats" in groups:
        b = data / "bratsreg_002_dirac"
        base, follow = "BraTSReg_002_00_0000", "BraTSReg_002_01_0262"
        images = {"0000": (base, "t1ce"), "0001": (follow, "t1ce"), "0002": (base, "t1"),
                  "0003": (follow, "t2"), "0004": (follow, "flair")}
        rel = {mod: _add_image(out, "0005", mod, b / f"{tp}_{seq}.nii.gz", shrink,
                               landmarks=b / f"{tp}_landmarks.csv") for mod, (tp, seq) in images.items()}
        pairs += [{"fixed": rel["0000"], "moving": rel["0001"]}, {"fixed": rel["0000"], "moving": rel["0003"]},
                  {"fixed": rel["0002"], "moving": rel["0004"]}]
    meta = {"name": TASK, "description": "dinoreg development set built from ../shared/data (not for release)",
            "tensorImageShape": {"0": []}, "modality": {"0": "MR"}, "labels": labels,
            "registration_val": pairs, "registration_test": pairs,
            "training_paired_images": pairs, "numRegistration_val": len(pairs)}
    path = out / "dataset.json"
    path.write_text(json.dumps(meta, indent=2))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("out", type=Path, help="output folder (outside the repository)")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="the shared folder")
    parser.add_argument("--shrink", type=int, default=1, help="integer downsampling factor (tests: 2 or 3)")
    parser.add_argument("--pairs", default="brain,brats", help="groups to include: brain, brats")
    args = parser.parse_args(argv)
    if not (args.shared / "data").is_dir():
        print(f"make_dev_dataset: {args.shared / 'data'}: not found", file=sys.stderr)
        return 2
    path = build(args.out, args.shared, args.shrink, tuple(g for g in args.pairs.split(",") if g))
    print(f"dataset: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
