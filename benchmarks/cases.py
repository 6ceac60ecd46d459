"""Benchmark cases: each registers (or encodes) in its own process so peak memory is its own.

Run as ``python benchmarks/cases.py CASE --shared ../shared --out DIR``; writes
``DIR/CASE.npy`` (the Learn2Reg field, when the case registers) and ``DIR/CASE.json`` with
``{"seconds": ...}`` measured around the registration call only (imports and file reading of
the harness excluded, the method's own loading included).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

BRAIN_FIXED = "data/learn2reg_tutorial2019_brain_t1/subject_1_vol.nii.gz"
BRAIN_MOVING = "data/voxelmorph_brain_t1/test_scan_vol.nii.gz"

CASES: dict[str, Callable[[Path], np.ndarray | None]] = {}


def case(name: str):
    def wrap(fn):
        CASES[name] = fn
        return fn
    return wrap


@case("convexadam")
def _peer(shared: Path) -> np.ndarray:
    """The convexadam 0.2.0 package, its defaults, float32 on CPU."""
    import nibabel as nib
    from convexAdam.convex_adam_MIND import convex_adam_pt

    fixed = torch.from_numpy(nib.load(str(shared / BRAIN_FIXED)).get_fdata().astype(np.float32))
    moving = torch.from_numpy(nib.load(str(shared / BRAIN_MOVING)).get_fdata().astype(np.float32))
    return convex_adam_pt(fixed, moving, dtype=torch.float32, device=torch.device("cpu")).astype(np.float32)


def _dinoreg(preset: str, **overrides) -> Callable[[Path], np.ndarray]:
    def run(shared: Path) -> np.ndarray:
        import dinoreg

        result = dinoreg.register(shared / BRAIN_FIXED, shared / BRAIN_MOVING, preset_name=preset,
                                  device="cpu", progress=False, **overrides)
        return result.disp
    return run


CASES["dinoreg-mind"] = _dinoreg("mind")
CASES["dinoreg-convexadam-settings"] = _dinoreg("convexadam")
CASES["dinoreg-fast"] = _dinoreg("dinoreg-fast")
CASES["dinoreg-ensemble"] = _dinoreg("dinoreg-ensemble")
CASES["dino3d"] = _dinoreg("mind", features="dino3d", lambda_weight=5.0, iterations=40)


def _encode_dinov2(upsample: float, every: int) -> Callable[[Path], None]:
    """Slicewise ViT-S encoding of the 160x192x224 moving brain (axial = last axis)."""
    def run(shared: Path) -> None:
        from dinoreg.features.dinov2 import load_dinov2
        from dinoreg.features.slicewise import encode_volume
        from dinoreg.io.images import load_image
        from dinoreg.preprocess import normalise

        volume = normalise(load_image(shared / BRAIN_MOVING).array)
        model = load_dinov2(None, None, progress=False)
        feats = encode_volume(volume, model, 2, upsample=upsample, every=every)
        print("dinov2 feature grid", tuple(feats.features.shape))
    return run


def _encode_dino3d(shared: Path) -> None:
    """One sliding-window pass of the shipped 3D ViT over the 160x192x224 brain."""
    from dinoreg.features.vit3d import Dino3DEncoder
    from dinoreg.io.images import load_image
    from dinoreg.preprocess import normalise

    volume = normalise(load_image(shared / BRAIN_MOVING).array)
    feats = Dino3DEncoder.from_file(None).encode(volume)
    print("dino3d feature grid", tuple(feats.shape))


CASES["encode-dinov2-fast"] = _encode_dinov2(2.0, 6)       # dinoreg-fast preset
CASES["encode-dinov2"] = _encode_dinov2(3.0, 3)            # dinoreg preset
CASES["encode-dinov2-4vox"] = _encode_dinov2(3.5, 4)       # 4 voxels per feature, as dino3d's 4^3 patches
CASES["encode-dino3d"] = _encode_dino3d


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("--shared", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import os

    os.environ.setdefault("DINOREG_WEIGHTS_DIR", str(args.shared.resolve() / "weights"))  # real weights, no download
    start = time.perf_counter()
    disp = CASES[args.case](args.shared.resolve())
    seconds = time.perf_counter() - start
    if disp is not None:
        np.save(args.out / f"{args.case}.npy", disp)
    (args.out / f"{args.case}.json").write_text(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
