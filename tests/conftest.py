"""Shared fixtures: real volumes from ../shared/data (never copied into the repository)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
WEIGHTS = SHARED / "weights"
BRAIN_FIXED = DATA / "learn2reg_tutorial2019_brain_t1" / "subject_1_vol.nii.gz"
BRAIN_FIXED_SEG = DATA / "learn2reg_tutorial2019_brain_t1" / "subject_1_seg.nii.gz"
BRAIN_MOVING = DATA / "voxelmorph_brain_t1" / "test_scan_vol.nii.gz"
BRAIN_MOVING_SEG = DATA / "voxelmorph_brain_t1" / "test_scan_seg.nii.gz"
BRAIN_LABELS = DATA / "voxelmorph_brain_t1" / "labels.npz"

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not available")
needs_weights = pytest.mark.skipif(not WEIGHTS.is_dir(), reason="../shared/weights is not available")

# Tests use the real weights in ../shared/weights and never download.
os.environ.setdefault("DINOREG_WEIGHTS_DIR", str(WEIGHTS))
os.environ.setdefault("DINOREG_OFFLINE", "1")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def brain_volume() -> np.ndarray:
    """The voxelmorph T1 brain, (160, 192, 224) float32 in [0, 1]."""
    if not BRAIN_MOVING.exists():
        pytest.skip("../shared/data is not available")
    from dinoreg.io.images import load_image

    return load_image(BRAIN_MOVING).array


@pytest.fixture(scope="session")
def brain_crop(brain_volume: np.ndarray) -> np.ndarray:
    """A 96x96x96 crop through the centre of the brain (real anatomy, fast to register)."""
    return np.ascontiguousarray(brain_volume[32:128, 48:144, 64:160])


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write a test volume with nibabel (identity affine unless given)."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return path


def load_script(relative: str) -> ModuleType:
    """A script of the repository (``benchmarks/known_warp.py``, ``scripts/make_dev_dataset.py``)
    imported from its path and registered under its stem (its dataclasses need the module)."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module
