"""DINO-Reg acceptance study on the dev data (issue 3), MIND side by side.

Cases:
  brain        fixed learn2reg subject_1, moving voxelmorph test_scan; Dice over the 30 labels.
  brain-shift  the same with the moving content shifted 30 voxels (30 mm) along the last array
               axis (the default axial axis for these identity-affine images), zero-filled;
               labels shifted alike. Compare Dice with the unshifted case.
  brats-*      BraTS-Reg case 002, fixed = baseline (00_0000), moving = follow-up (01_0262):
               t1ce->t1ce, t2->t1ce (cross-sequence), flair->t1 (cross-sequence); TRE of the
               6 landmarks (LPS mm CSV, converted through the image geometry).

Usage: python benchmarks/dinoreg_study.py --shared ../shared --out outputs/dinoreg_study \
           [--cases brain brats-t1ce ...] [--methods mind dinoreg-fast ...]
Appends one JSON line per run to OUT/results.jsonl and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

METHODS = {
    "mind": dict(preset_name="mind"),
    "dinoreg-fast": dict(preset_name="dinoreg-fast"),
    "dinoreg": dict(preset_name="dinoreg"),
    "dinoreg-ensemble": dict(preset_name="dinoreg-ensemble"),
    "mind+dinov2 (average)": dict(preset_name="dinoreg-ensemble", ensemble="average"),
    "dino3d": dict(preset_name="mind", features="dino3d", lambda_weight=5.0, iterations=40),
}
BRATS = "data/bratsreg_002_dirac/BraTSReg_002_{tp}_{seq}.nii.gz"
BRATS_LMS = "data/bratsreg_002_dirac/BraTSReg_002_{tp}_landmarks.csv"
BRATS_PAIRS = {"brats-t1ce": ("t1ce", "t1ce"), "brats-t2-t1ce": ("t1ce", "t2"), "brats-flair-t1": ("t1", "flair")}


def shifted_brain(shared: Path, out: Path, shift: int = 30) -> tuple[Path, Path]:
    """Write the moving brain and its labels with content shifted ``shift`` voxels along axis 2."""
    import nibabel as nib

    paths = []
    for name in ("vol", "seg"):
        img = nib.load(str(shared / f"data/voxelmorph_brain_t1/test_scan_{name}.nii.gz"))
        data = np.asanyarray(img.dataobj)
        moved = np.zeros_like(data)
        moved[..., shift:] = data[..., :-shift]
        path = out / f"test_scan_{name}_shift{shift}.nii.gz"
        nib.save(nib.Nifti1Image(moved, img.affine), str(path))
        paths.append(path)
    return paths[0], paths[1]


def case_inputs(case: str, shared: Path, out: Path) -> dict:
    if case in ("brain", "brain-shift"):
        labels = [int(x) for x in np.load(shared / "data/voxelmorph_brain_t1/labels.npz")["labels"]]
        fixed = shared / "data/learn2reg_tutorial2019_brain_t1/subject_1_vol.nii.gz"
        fseg = shared / "data/learn2reg_tutorial2019_brain_t1/subject_1_seg.nii.gz"
        if case == "brain":
            moving = shared / "data/voxelmorph_brain_t1/test_scan_vol.nii.gz"
            mseg = shared / "data/voxelmorph_brain_t1/test_scan_seg.nii.gz"
        else:
            moving, mseg = shifted_brain(shared, out)
        return dict(fixed=fixed, moving=moving, fixed_labels=fseg, moving_labels=mseg, eval_labels=labels)
    fix_seq, mov_seq = BRATS_PAIRS[case]
    return dict(fixed=shared / BRATS.format(tp="00_0000", seq=fix_seq),
                moving=shared / BRATS.format(tp="01_0262", seq=mov_seq),
                fixed_landmarks=shared / BRATS_LMS.format(tp="00_0000"),
                moving_landmarks=shared / BRATS_LMS.format(tp="01_0262"), landmarks_space="lps")


def run(case: str, method: str, shared: Path, out: Path) -> dict:
    import dinoreg

    inputs = case_inputs(case, shared, out)
    fixed, moving = inputs.pop("fixed"), inputs.pop("moving")
    start = time.perf_counter()
    result = dinoreg.register(fixed, moving, progress=False, device="cpu", **inputs, **METHODS[method])
    seconds = time.perf_counter() - start
    m = result.metrics or {}
    return dict(case=case, method=method, seconds=round(seconds, 1),
                encode_s=round(result.timings.get("encode", 0.0), 1), dice=m.get("dice_mean"),
                hd95_vox=m.get("hd95_vox_mean"), tre_mm=m.get("tre_mm_mean"), sdlogj=m.get("sdlogj"),
                folding=m.get("folding_fraction"))


def run_grid(cases: list[str], methods: list[str], run_one: Callable[[str, str], dict], results: Path) -> list[dict]:
    """``run_one(case, method)`` for every case and method, each row appended to ``results``
    (JSON lines) and printed as it comes, so a partial study is never lost."""
    rows = []
    for case in cases:
        for method in methods:
            row = run_one(case, method)
            rows.append(row)
            with open(results, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | method | Dice | HD95 (vox) | TRE (mm) | SDlogJ | folding | s |", "|---|---|---|---|---|---|---|---|"]
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['case']} | {r['method']} | {f(r['dice'], '.4f')} | {f(r['hd95_vox'], '.2f')} | "
                     f"{f(r['tre_mm'], '.2f')} | {f(r['sdlogj'], '.3f')} | {f(r['folding'], '.5f')} | {r['seconds']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--out", type=Path, default=Path("outputs/dinoreg_study"))
    parser.add_argument("--cases", nargs="*", default=["brain", "brain-shift", *BRATS_PAIRS])
    parser.add_argument("--methods", nargs="*", default=["mind", "dinoreg-fast", "dinoreg-ensemble"])
    parser.add_argument("--cache-dir", type=Path, help="feature cache: encode each volume once across runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DINOREG_WEIGHTS_DIR", str(args.shared.resolve() / "weights"))  # real weights
    os.environ.setdefault("DINOREG_OFFLINE", "1")
    if args.cache_dir is not None:
        from dinoreg.cache import activate

        activate(args.cache_dir, 8 * 2**30)
    rows = run_grid(args.cases, args.methods, lambda case, method: run(case, method, args.shared.resolve(), args.out),
                    args.out / "results.jsonl")
    print(table(rows))


if __name__ == "__main__":
    main()
