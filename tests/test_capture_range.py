"""Capture range of feature distances (Kögl et al., Fig. 3) on a real brain slice."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from conftest import BRAIN_MOVING, needs_data, needs_weights
from dinoreg.capture_range import (basin, compute_curves, rigid_transform, rotations_deg,
                                   translations_mm)
from dinoreg.cli import main


def test_transform_sets_follow_the_paper():
    rot = rotations_deg()
    assert len(rot) == 33 and rot[0] == pytest.approx(-90) and rot[16] == 0
    assert np.diff(rot) == pytest.approx(np.full(32, 180 / 32))
    tra = translations_mm()
    assert len(tra) == 97 and tra[-1] == pytest.approx(57.6) and tra[48] == 0


def test_rigid_transform_directions():
    img = torch.zeros(1, 1, 21, 31)
    img[0, 0, 10, 15] = 1.0
    assert torch.equal(rigid_transform(img, 0.0, (0.0, 0.0)), img)
    moved = rigid_transform(img, 0.0, (3.0, 0.0))  # content moves +3 along axis 0
    assert moved[0, 0, 13, 15] == pytest.approx(1.0)
    img[0, 0, 10, 15] = 0.0
    img[0, 0, 10, 20] = 1.0  # 5 px along axis 1 from the centre; a 90 deg turn keeps the radius
    rotated = rigid_transform(img, 90.0)
    peak = divmod(int(rotated.argmax()), 31)
    assert abs(peak[0] - 10) == 5 and peak[1] == 15


def test_basin_measures_the_monotone_valley():
    params = np.array([-3.0, -2, -1, 0, 1, 2, 3])
    assert basin([2, 1, 3, 0, 1, 2, 1.5], params) == (1.0, 2.0)


@pytest.fixture(scope="module")
def brain_slice() -> np.ndarray:
    if not BRAIN_MOVING.exists():
        pytest.skip("../shared/data is not available")
    from dinoreg.io.images import load_image
    from dinoreg.preprocess import normalise

    vol = load_image(BRAIN_MOVING).array
    return normalise(np.ascontiguousarray(vol[:, :, vol.shape[2] // 2]))


@needs_data
@needs_weights
def test_dinov2_curves_have_their_minimum_at_zero(brain_slice):
    from dinoreg.features.registry import load_encoder2d

    enc = load_encoder2d("dinov2")
    angles = [-11.25, -5.625, 0.0, 5.625, 11.25]
    shifts = [-6.0, -2.4, 0.0, 2.4, 6.0]
    curves = compute_curves(enc, brain_slice, (1.0, 1.0), angles_deg=angles, shifts_mm=shifts, label="dinov2")
    assert [c.kind for c in curves] == ["rotation", "translation"]
    for c in curves:
        assert c.encoder == "dinov2"
        for dist in ("l1", "cos"):
            v = c.values[dist]
            assert c.minimum_at_zero(dist), (c.kind, dist, v)
            assert v[2] == pytest.approx(0.0, abs=1e-6)  # identical images, identical features
            assert (v[[0, 1, 3, 4]] > 1e-5).all()


@needs_data
@needs_weights
def test_cli_writes_png_and_csv(tmp_path, capsys):
    out = tmp_path / "cr.png"
    rc = main(["capture-range", str(BRAIN_MOVING), "--encoder", "dinov2", "-o", str(out), "--quiet",
               "--max-rotation", "11.25", "--max-translation", "2.4"])
    assert rc == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    # 5 angles + 5 shifts, two distances each
    assert len(rows) == 20 and {r["distance"] for r in rows} == {"l1", "cos"}
    zero = [r for r in rows if float(r["value"]) == 0.0]
    assert all(float(r["raw"]) == pytest.approx(0.0, abs=1e-6) for r in zero)
    assert "minimum at 0: yes" in capsys.readouterr().out


def test_cli_rejects_unknown_encoder(tmp_path, capsys):
    rc = main(["capture-range", "nothing.nii.gz", "--encoder", "bogus", "-o", str(tmp_path / "x.png")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bogus" in err[0]
