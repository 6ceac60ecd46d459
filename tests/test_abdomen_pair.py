"""The Learn2Reg-style abdominal MR -> CT pair of the features study (benchmarks/abdomen_pair.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from conftest import SHARED, needs_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from abdomen_pair import LABELS, SHAPE, build_abdomen_pair  # noqa: E402

pytestmark = needs_data


def test_pair_is_centred_on_a_2mm_grid_with_the_seven_organs(tmp_path):
    paths = build_abdomen_pair(SHARED, tmp_path)
    images = {k: nib.load(str(v)) for k, v in paths.items()}
    for img in images.values():
        assert img.shape == SHAPE
        np.testing.assert_allclose(img.affine, images["fixed"].affine)
        np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), 2.0)
    for key in ("fixed_labels", "moving_labels"):
        values = set(np.unique(np.asarray(images[key].dataobj)).tolist())
        assert values <= {0, *LABELS} and len(values & set(LABELS)) >= 5
    ct = np.asarray(images["fixed"].dataobj)
    assert ct.min() < -500  # Hounsfield units kept (windowed by the registration)
    liver_ct = np.asarray(images["fixed_labels"].dataobj) == 5
    liver_mr = np.asarray(images["moving_labels"].dataobj) == 5
    dice = 2 * (liver_ct & liver_mr).sum() / (liver_ct.sum() + liver_mr.sum())
    assert 0.2 < dice < 0.9  # overlapping, not aligned: something for registration to do
