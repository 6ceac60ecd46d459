"""2D slice pairs for the default method (README, *2D images*): Dice over the 30 VoxelMorph labels
on brain slices, mean end-point error of a shifted BraTS-Reg cross-contrast slice; optionally ANTs.

    python benchmarks/slices2d.py [--shared ../shared] [--set key=value ...] [--ants] [--cases mid,b25]

Brain cases: slice ``mid + offset`` along an axis of subject_1 (fixed) <- test_scan (moving),
labels from their aseg maps; ``b*`` cases: BraTS-Reg 002 baseline T1 (fixed) <- T2 or FLAIR of the
same time point (co-registered) shifted by a known in-plane translation (true pull-back ``u`` =
the shift, voxels of 1 mm), error over the brain (T1 > 5 % of its maximum). One line per case:
Dice or EPE, folded fraction, CPU seconds of the registration call.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.ndimage import shift as nd_shift

import dinoreg
from dinoreg.io.images import load_image
from dinoreg.metrics import evaluate_pair

BRAIN = {"mid": (0, 2), "k-24": (-24, 2), "k+24": (24, 2), "cor": (0, 1)}  # offset, axis
BRATS = {"b0": ((0.0, 0.0), 0, "t2"), "b15": ((15.0, -15.0), 0, "t2"), "b25": ((25.0, -20.0), 0, "t2"),
         "b25k20": ((25.0, -20.0), 20, "t2"), "b25fl": ((-22.0, 18.0), 0, "flair")}  # shift mm, offset, moving


def _slice(path: Path, offset: int, axis: int, labels: bool = False) -> np.ndarray:
    """Slice ``shape[axis] // 2 + offset`` of a volume as a contiguous 2D array."""
    array = load_image(path, dtype=None if labels else np.float32).array
    array = np.take(array, array.shape[axis] // 2 + offset, axis=axis)
    return np.ascontiguousarray(array.astype(np.int32) if labels else array.astype(np.float32))


def ants_field(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """ANTs SyN (Mattes MI for the affine and SyN stages) as a pull-back field ``(I, J, 1, 3)``, voxels."""
    import ants

    f, m = ants.from_numpy(fixed), ants.from_numpy(moving)
    reg = ants.registration(f, m, type_of_transform="SyN", syn_metric="mattes", aff_metric="mattes", random_seed=1)
    grid = np.mgrid[:fixed.shape[0], :fixed.shape[1]].astype(np.float32)
    mapped = [ants.apply_transforms(f, ants.from_numpy(g), reg["fwdtransforms"], interpolator="linear").numpy()
              for g in grid]  # the moving coordinate each fixed pixel maps to (linear: exact)
    u = np.stack(mapped, -1) - np.moveaxis(grid, 0, -1)
    return np.concatenate([u, np.zeros_like(u[..., :1])], -1)[:, :, None, :]


def run_case(name: str, data: Path, register: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> str:
    """One case: ``register(fixed, moving) -> (I, J, 1, 3)`` field; returns the report line."""
    t0 = time.process_time()
    if name in BRAIN:
        offset, axis = BRAIN[name]
        fixed_dir, moving_dir = data / "learn2reg_tutorial2019_brain_t1", data / "voxelmorph_brain_t1"
        fixed = _slice(fixed_dir / "subject_1_vol.nii.gz", offset, axis)
        disp = register(fixed, _slice(moving_dir / "test_scan_vol.nii.gz", offset, axis))
        seconds = time.process_time() - t0
        labels = [int(x) for x in np.load(moving_dir / "labels.npz")["labels"]]
        scores = evaluate_pair(disp, _slice(fixed_dir / "subject_1_seg.nii.gz", offset, axis, True)[..., None],
                               _slice(moving_dir / "test_scan_seg.nii.gz", offset, axis, True)[..., None],
                               labels=labels)
        return f"{name} dice {scores['dice_mean']:.4f} folding {scores['folding_fraction']:.4f} cpu {seconds:.1f}s"
    shift, offset, modality = BRATS[name]
    case = data / "bratsreg_002_dirac" / "BraTSReg_002_00_0000_"
    fixed = _slice(Path(f"{case}t1.nii.gz"), offset, 2)
    moving = nd_shift(_slice(Path(f"{case}{modality}.nii.gz"), offset, 2), shift, order=1)
    disp = register(fixed, moving)
    seconds = time.process_time() - t0
    error = np.linalg.norm(disp[:, :, 0, :2] - np.array(shift), axis=-1)[fixed > 0.05 * fixed.max()]
    return f"{name} epe {error.mean():.4f} mm cpu {seconds:.1f}s"


def _number(text: str) -> int | float | str:
    """``text`` as an int, else a float, else itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared")
    parser.add_argument("--set", action="append", default=[], help="override key=value (int, float or string)")
    parser.add_argument("--ants", action="store_true", help="ANTs SyN instead of dinoreg")
    parser.add_argument("--cases", default=",".join([*BRAIN, *BRATS]))
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = _number(value)
    if args.ants:
        register = ants_field
    else:
        def register(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
            return dinoreg.register(fixed, moving, progress=False, **overrides).disp
    for name in args.cases.split(","):
        print(run_case(name, args.shared / "data", register), flush=True)


if __name__ == "__main__":
    main()
