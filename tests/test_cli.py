"""The command line: outputs in the Learn2Reg convention, and one-line errors for bad input."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import needs_data, write_nifti
from dinoreg.cli import main

pytestmark = needs_data
FAST = ["--iterations", "5", "--quiet"]


@pytest.fixture()
def pair(tmp_path, brain_volume):
    fixed = np.ascontiguousarray(brain_volume[40:104, 56:120, 72:136])
    moving = np.ascontiguousarray(brain_volume[42:106, 55:119, 72:136])
    seg_f = (fixed > 0.3).astype(np.int16) + (fixed > 0.45)
    seg_m = (moving > 0.3).astype(np.int16) + (moving > 0.45)
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = [5, -3, 2]
    return dict(
        fixed=write_nifti(tmp_path / "Task_0001_0000.nii.gz", fixed, aff),
        moving=write_nifti(tmp_path / "Task_0002_0001.nii.gz", moving, aff),
        fixed_seg=write_nifti(tmp_path / "fseg.nii.gz", seg_f, aff),
        moving_seg=write_nifti(tmp_path / "mseg.nii.gz", seg_m, aff),
        affine=aff, tmp=tmp_path)


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_register_writes_learn2reg_outputs(capsys, pair):
    out = pair["tmp"] / "out"
    code, stdout, _ = _run(capsys, "register", pair["fixed"], pair["moving"], "-o", out, "--fixed-labels",
                           pair["fixed_seg"], "--moving-labels", pair["moving_seg"], "--qc", *FAST)
    assert code == 0
    assert (out / "qc_0001_0002.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    disp = nib.load(str(out / "disp_0001_0002.nii.gz"))
    assert disp.shape == (64, 64, 64, 3) and disp.get_data_dtype() == np.float32
    np.testing.assert_allclose(disp.affine, pair["affine"])  # the fixed image's affine
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dice_mean"] > 0.5 and "sdlogj" in metrics
    assert (out / "warped_labels_0001_0002.nii.gz").exists() and "Dice" in stdout
    # warp reproduces the registration's warped image from the original moving image
    warped = out / "rewarped.nii.gz"
    assert _run(capsys, "warp", pair["moving"], out / "disp_0001_0002.nii.gz", "-o", warped)[0] == 0
    np.testing.assert_allclose(nib.load(str(warped)).get_fdata(),
                               nib.load(str(out / "warped_0001_0002.nii.gz")).get_fdata(), atol=1e-5)
    # evaluate scores the written field the same way
    code, stdout, _ = _run(capsys, "evaluate", out / "disp_0001_0002.nii.gz", "--fixed-labels", pair["fixed_seg"],
                           "--moving-labels", pair["moving_seg"], "-o", out / "again.json")
    again = json.loads((out / "again.json").read_text())
    assert code == 0 and again["dice_mean"] == pytest.approx(metrics["dice_mean"])


def _expect_error(capsys, out_dir, *args, message: str, name: str | None = None):
    code, _, err = _run(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("dinoreg: error:") and message in lines[0], err
    if name is not None:
        assert name in lines[0]
    if out_dir is not None and out_dir.exists():
        assert [p.name for p in out_dir.iterdir()] == []  # nothing half-written


def test_missing_file(capsys, pair):
    out = pair["tmp"] / "o"
    _expect_error(capsys, out, "register", pair["fixed"], pair["tmp"] / "nope.nii.gz", "-o", out, *FAST,
                  message="file not found", name="nope.nii.gz")


def test_not_3d(capsys, pair):
    bad = write_nifti(pair["tmp"] / "4d.nii.gz", np.ones((8, 8, 8, 2), np.float32))
    out = pair["tmp"] / "o"
    _expect_error(capsys, out, "register", pair["fixed"], bad, "-o", out, *FAST, message="expected a 3D volume",
                  name="4d.nii.gz")


def test_nan_voxels(capsys, pair):
    arr = nib.load(str(pair["moving"])).get_fdata().astype(np.float32)
    arr[3, 3, 3] = np.nan
    bad = write_nifti(pair["tmp"] / "nan.nii.gz", arr)
    out = pair["tmp"] / "o"
    _expect_error(capsys, out, "register", pair["fixed"], bad, "-o", out, *FAST, message="NaN", name="nan.nii.gz")


def test_constant_image(capsys, pair):
    bad = write_nifti(pair["tmp"] / "flat.nii.gz", np.full((64, 64, 64), 7.0, np.float32))
    out = pair["tmp"] / "o"
    _expect_error(capsys, out, "register", pair["fixed"], bad, "-o", out, *FAST, message="constant",
                  name="flat.nii.gz")


def test_empty_mask(capsys, pair):
    mask = write_nifti(pair["tmp"] / "mask.nii.gz", np.zeros((64, 64, 64), np.uint8))
    out = pair["tmp"] / "o"
    _expect_error(capsys, out, "register", pair["fixed"], pair["moving"], "-o", out, "--fixed-mask", mask, *FAST,
                  message="mask is empty", name="mask.nii.gz")


def test_non_integer_labels(capsys, pair):
    seg = write_nifti(pair["tmp"] / "soft.nii.gz", np.full((64, 64, 64), 0.5, np.float32))
    out = pair["tmp"] / "o"
    _expect_error(capsys, out, "register", pair["fixed"], pair["moving"], "-o", out, "--moving-labels", seg,
                  "--fixed-labels", pair["fixed_seg"], *FAST, message="non-integer", name="soft.nii.gz")


def test_landmarks_wrong_columns_and_outside(capsys, pair):
    two = pair["tmp"] / "two.csv"
    two.write_text("1,2\n3,4\n")
    good = pair["tmp"] / "good.csv"
    good.write_text("10,10,10\n20,20,20\n")
    out = pair["tmp"] / "o"
    _expect_error(capsys, out, "register", pair["fixed"], pair["moving"], "-o", out, "--fixed-landmarks", two,
                  "--moving-landmarks", good, *FAST, message="column", name="two.csv")
    far = pair["tmp"] / "far.csv"
    far.write_text("10,10,10\n500,20,20\n")
    _expect_error(capsys, out, "register", pair["fixed"], pair["moving"], "-o", out, "--fixed-landmarks", far,
                  "--moving-landmarks", good, *FAST, message="outside", name="far.csv")


def test_unwritable_output(capsys, pair):
    blocker = pair["tmp"] / "file"
    blocker.write_text("x")
    _expect_error(capsys, None, "register", pair["fixed"], pair["moving"], "-o", blocker / "sub", *FAST,
                  message="cannot create output directory", name="sub")


def test_unknown_preset_and_encoder(capsys, pair):
    out = pair["tmp"] / "o"
    _expect_error(capsys, out, "register", pair["fixed"], pair["moving"], "-o", out, "--preset", "bogus", *FAST,
                  message="unknown preset")
    _expect_error(capsys, out, "register", pair["fixed"], pair["moving"], "-o", out, "--features", "bogus", *FAST,
                  message="unknown encoder")


def test_metrics_computed_while_saving_equal_evaluate(pair):
    # the CLI defers the metrics to save(), which computes them while another thread writes the
    # volumes: the scores must be exactly those of `evaluate` on the written field
    from dinoreg.api import evaluate, register

    result = register(pair["fixed"], pair["moving"], fixed_labels=pair["fixed_seg"], moving_labels=pair["moving_seg"],
                      iterations=5, progress=False, defer_metrics=True)
    assert result.metrics is None and result.pending_metrics is not None
    out = pair["tmp"] / "deferred"
    written = result.save(out)
    saved = json.loads(written["metrics"].read_text())
    again = evaluate(written["disp"], pair["fixed_seg"], pair["moving_seg"])
    for key in ("dice", "dice_mean", "hd95_vox", "hd95_mm_mean", "sdlogj", "folding_fraction", "ndv_percent"):
        assert saved[key] == again[key], key
    assert result.pending_metrics is None and saved["timings"]["metrics"] > 0
    assert saved["timings"]["total"] >= saved["timings"]["metrics"]


def test_console_script_flushes_and_keeps_the_exit_status(tmp_path):
    # `python -m dinoreg` ends with os._exit after flushing: output and status must survive it
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "dinoreg", "presets"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "mind" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "dinoreg", "register", str(tmp_path / "nope.nii.gz"),
                          str(tmp_path / "nope2.nii.gz"), "-o", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("dinoreg: error:"), bad.stderr
