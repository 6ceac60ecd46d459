"""Hostile inputs: every bad file or option is one ``dinoreg: error:`` line naming it, exit status
2, no traceback, decided before any work, and nothing written (no ``-o`` folder, no file, no
temporary). Small synthetic volumes in ``tmp_path``; the CLI runs in-process, except for the
SIGKILL test, which needs a real process to kill."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import write_nifti
from dinoreg.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST = ["--iterations", "2", "--grid-sp", "4", "--grid-sp-adam", "2", "--disp-hw", "1", "--quiet"]
SHAPE = (16, 16, 16)


def _volume(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = rng.random(SHAPE).astype(np.float32)
    vol[4:12, 4:12, 4:12] += 1.0
    return vol


def _nifti_sform(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """A NIfTI whose sform holds ``affine`` verbatim (nibabel refuses to build one from a singular
    matrix, so the header is written by hand; qform off)."""
    img = nib.Nifti1Image(array, None)
    hdr = img.header
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = affine[0], affine[1], affine[2]
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    nib.save(img, str(path))
    return path


def _mha_with_spacing(path: Path, array: np.ndarray, spacing: str) -> Path:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.transpose(array, (2, 1, 0))), str(path))
    header = path.read_bytes().replace(b"ElementSpacing = 1 1 1", f"ElementSpacing = {spacing}".encode())
    path.write_bytes(header)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Every hostile input, written once for the module (read-only use by the tests)."""
    d = tmp_path_factory.mktemp("hostile")
    vol = _volume()
    seg = (vol > 0.8).astype(np.int16)
    write_nifti(d / "f.nii.gz", vol)
    write_nifti(d / "m.nii.gz", np.roll(vol, 1, axis=0))
    write_nifti(d / "fseg.nii.gz", seg)
    write_nifti(d / "mseg.nii.gz", np.roll(seg, 1, axis=0))
    away = np.eye(4)
    away[:3, 3] = -1000.0  # label maps on another grid are mapped through their affine: this one misses
    write_nifti(d / "mseg_small.nii.gz", seg[:8], away)
    write_nifti(d / "disp.nii.gz", np.zeros(SHAPE + (3,), np.float32))
    huge = np.zeros(SHAPE + (3,), np.float32)
    huge[3, 4, 5, 0] = 1e30
    write_nifti(d / "huge.nii.gz", huge)
    write_nifti(d / "inf.nii.gz", np.where(huge > 0, np.inf, 0).astype(np.float32))
    write_nifti(d / "nanfield.nii.gz", np.where(huge > 0, np.nan, 0).astype(np.float32))
    write_nifti(d / "two_comp.nii.gz", np.zeros(SHAPE + (2,), np.float32))
    write_nifti(d / "small_grid.nii.gz", np.zeros((8, 16, 16, 3), np.float32))
    write_nifti(d / "complex_field.nii.gz", np.zeros(SHAPE + (3,), np.complex64))
    np.save(d / "strings.npy", np.array([["a", "b"], ["c", "d"]]))
    np.save(d / "complex.npy", (vol + 1j * vol).astype(np.complex64))
    write_nifti(d / "four_d.nii.gz", np.stack([vol, vol], axis=-1))
    write_nifti(d / "one_voxel.nii.gz", np.ones((1, 1, 1), np.float32))
    write_nifti(d / "constant.nii.gz", np.ones(SHAPE, np.float32))
    write_nifti(d / "thin.nii.gz", np.ascontiguousarray(vol[:, SHAPE[1] // 2:SHAPE[1] // 2 + 1, SHAPE[2] // 2:SHAPE[2] // 2 + 1]))  # 1D
    nan_vol = vol.copy()
    nan_vol[2, 2, 2] = np.nan
    write_nifti(d / "nan_image.nii.gz", nan_vol)
    (d / "truncated.nii.gz").write_bytes((d / "f.nii.gz").read_bytes()[:200])
    (d / "empty.nii.gz").write_bytes(b"")
    zero_column = np.eye(4)
    zero_column[:3, 0] = 0
    _nifti_sform(d / "singular.nii.gz", vol, zero_column)
    nan_affine = np.eye(4)
    nan_affine[0, 0] = np.nan
    _nifti_sform(d / "nan_affine.nii.gz", vol, nan_affine)
    far = np.eye(4)
    far[:3, 3] = 1000.0  # a mask on another grid is mapped through its affine: this one lies 1 m away
    write_nifti(d / "mask_small.nii.gz", np.ones((8, 8, 8), np.uint8), far)
    (d / "lm.csv").write_text("1,2,3\n4,5,6\n")
    (d / "lm_two_columns.csv").write_text("1,2\n4,5\n")
    (d / "lm_text.csv").write_text("1,2,3\nx,y,z\n")
    (d / "lm_nan.csv").write_text("1,2,nan\n")
    (d / "labels_bad.txt").write_text("1, 2.5\n")
    _mha_with_spacing(d / "positive.mha", vol, "1 1 1")
    _mha_with_spacing(d / "negative.mha", vol, "-1 1 1")
    (d / "a_file").write_text("not a folder\n")
    (d / "folder.nii.gz").mkdir()
    _datasets(d)
    return d


def _datasets(d: Path) -> None:
    pair = [{"fixed": "./f.nii.gz", "moving": "./m.nii.gz"}]
    metas = {
        "ds_labels_string": {"labels": "liver", "registration_val": pair},
        "ds_empty_split": {"labels": {"1": "liver"}, "registration_val": []},
        "ds_missing_image": {"registration_val": [{"fixed": "./f.nii.gz", "moving": "./nope.nii.gz"}]},
        "ds_entry_not_object": {"registration_val": [["./f.nii.gz", "./m.nii.gz"]]},
        "ds_entry_missing_key": {"registration_val": [{"fixed": "./f.nii.gz"}]},
        "ds_no_pairs": {"name": "nothing"},
        "ds_split_not_list": {"registration_val": {"fixed": "./f.nii.gz"}},
    }
    for name, meta in metas.items():
        (d / name).mkdir()
        (d / name / "dataset.json").write_text(json.dumps(meta))
        for image in ("f.nii.gz", "m.nii.gz"):
            (d / name / image).symlink_to(d / image)
    (d / "ds_not_json").mkdir()
    (d / "ds_not_json" / "dataset.json").write_text("{not json")


def _snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own checks exit through the parser
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _expect_refused(capsys, inputs: Path, work: Path, argv: list[str], needles: list[str]) -> str:
    """Run ``argv`` (``{in}``: the inputs folder, ``{out}``: a fresh output path) and check the
    contract; returns the error line."""
    args = [a.format(**{"in": inputs, "out": work / "out"}) for a in argv]
    before_in, before_work = _snapshot(inputs), _snapshot(work)
    code, stdout, err = _run(capsys, args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("dinoreg: error: "), err
    assert "Traceback" not in err and stdout == ""
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (work / "out").exists()  # no -o folder (nor pairs/, qc/, lock inside one)
    assert _snapshot(work) == before_work and _snapshot(inputs) == before_in  # nothing written anywhere
    return lines[0]


REGISTER = ["register", "{in}/f.nii.gz", "{in}/m.nii.gz", "-o", "{out}", *FAST]
CASES = {
    # images: unreadable, wrong type, wrong shape, wrong values, wrong geometry
    "strings_npy": (["register", "{in}/f.nii.gz", "{in}/strings.npy", "-o", "{out}", *FAST],
                    ["strings.npy", "non-numeric"]),
    "complex_npy": (["register", "{in}/complex.npy", "{in}/m.nii.gz", "-o", "{out}", *FAST],
                    ["complex.npy", "complex"]),
    "four_d": (["register", "{in}/f.nii.gz", "{in}/four_d.nii.gz", "-o", "{out}", *FAST], ["four_d.nii.gz", "3D"]),
    "one_voxel": (["register", "{in}/one_voxel.nii.gz", "{in}/m.nii.gz", "-o", "{out}", *FAST],
                  ["one_voxel.nii.gz"]),
    "one_dimensional": (["register", "{in}/thin.nii.gz", "{in}/thin.nii.gz", "-o", "{out}", *FAST],
                        ["thin.nii.gz", "too small", "2 x 2"]),
    "constant": (["register", "{in}/f.nii.gz", "{in}/constant.nii.gz", "-o", "{out}", *FAST],
                 ["constant.nii.gz", "constant"]),
    "nan_image": (["register", "{in}/f.nii.gz", "{in}/nan_image.nii.gz", "-o", "{out}", *FAST],
                  ["nan_image.nii.gz", "NaN"]),
    "truncated": (["register", "{in}/f.nii.gz", "{in}/truncated.nii.gz", "-o", "{out}", *FAST],
                  ["truncated.nii.gz", "cannot read"]),
    "empty_file": (["register", "{in}/empty.nii.gz", "{in}/m.nii.gz", "-o", "{out}", *FAST],
                   ["empty.nii.gz", "cannot read"]),
    "missing_file": (["register", "{in}/f.nii.gz", "{in}/nope.nii.gz", "-o", "{out}", *FAST],
                     ["nope.nii.gz", "not found"]),
    "singular_affine_fixed": (["register", "{in}/singular.nii.gz", "{in}/m.nii.gz", "-o", "{out}", *FAST],
                              ["singular.nii.gz", "degenerate"]),
    "singular_affine_moving": (["register", "{in}/f.nii.gz", "{in}/singular.nii.gz", "-o", "{out}", *FAST],
                               ["singular.nii.gz", "degenerate"]),
    "nan_affine": (["register", "{in}/nan_affine.nii.gz", "{in}/m.nii.gz", "-o", "{out}", *FAST],
                   ["nan_affine.nii.gz", "NaN"]),
    "mask_not_overlapping": (REGISTER + ["--fixed-mask", "{in}/mask_small.nii.gz"], ["mask_small.nii.gz", "overlap"]),
    "labels_not_overlapping": (REGISTER + ["--moving-labels", "{in}/mseg_small.nii.gz"],
                               ["mseg_small.nii.gz", "overlap"]),
    "labels_complex": (REGISTER + ["--fixed-labels", "{in}/fseg.nii.gz", "--moving-labels", "{in}/complex.npy"],
                       ["complex.npy", "complex"]),
    # inputs that only work in pairs
    "fixed_labels_alone": (REGISTER + ["--fixed-labels", "{in}/fseg.nii.gz"], ["--fixed-labels", "--moving-labels"]),
    "fixed_landmarks_alone": (REGISTER + ["--fixed-landmarks", "{in}/lm.csv"], ["--fixed-landmarks"]),
    "moving_landmarks_alone": (REGISTER + ["--moving-landmarks", "{in}/lm.csv"], ["--moving-landmarks"]),
    # landmark files
    "landmarks_two_columns": (REGISTER + ["--fixed-landmarks", "{in}/lm_two_columns.csv",
                                          "--moving-landmarks", "{in}/lm.csv"], ["lm_two_columns.csv", "columns"]),
    "landmarks_text": (REGISTER + ["--fixed-landmarks", "{in}/lm.csv", "--moving-landmarks", "{in}/lm_text.csv"],
                       ["lm_text.csv", "line 2"]),
    "landmarks_nan": (REGISTER + ["--fixed-landmarks", "{in}/lm_nan.csv", "--moving-landmarks", "{in}/lm.csv"],
                      ["lm_nan.csv", "NaN"]),
    # options
    "name_escapes_up": (REGISTER + ["--name", "../../x.nii.gz"], ["--name", "../../x.nii.gz"]),
    "name_absolute": (REGISTER + ["--name", "{in}/x.nii.gz"], ["--name"]),
    "name_no_suffix": (REGISTER + ["--name", "field"], ["--name", ".nii.gz"]),
    "labels_not_integers": (REGISTER + ["--labels", "{in}/labels_bad.txt"], ["--labels", "labels_bad.txt"]),
    "labels_complex_file": (REGISTER + ["--labels", "{in}/complex.npy"], ["--labels", "complex.npy"]),
    "labels_empty_list": (REGISTER + ["--labels", ","], ["--labels"]),
    "output_empty": (["register", "{in}/f.nii.gz", "{in}/m.nii.gz", "-o", "", *FAST], ["-o", "empty"]),
    "output_under_a_file": (["register", "{in}/f.nii.gz", "{in}/m.nii.gz", "-o", "{in}/a_file/sub", *FAST],
                            ["a_file"]),
    "device_malformed": (REGISTER + ["--device", "cuda:x"], ["cuda"]),
    # warp
    "warp_huge_field": (["warp", "{in}/m.nii.gz", "{in}/huge.nii.gz", "-o", "{out}.nii.gz"],
                        ["huge.nii.gz", "1e+30"]),
    "warp_inf_field": (["warp", "{in}/m.nii.gz", "{in}/inf.nii.gz", "-o", "{out}.nii.gz"], ["inf.nii.gz", "NaN/Inf"]),
    "warp_nan_field": (["warp", "{in}/m.nii.gz", "{in}/nanfield.nii.gz", "-o", "{out}.nii.gz"],
                       ["nanfield.nii.gz", "NaN/Inf"]),
    "warp_field_two_components": (["warp", "{in}/m.nii.gz", "{in}/two_comp.nii.gz", "-o", "{out}.nii.gz"],
                                  ["two_comp.nii.gz", "(I, J, K, 3)"]),
    "warp_field_not_fixed_grid": (["warp", "{in}/m.nii.gz", "{in}/small_grid.nii.gz", "--fixed", "{in}/f.nii.gz",
                                   "-o", "{out}.nii.gz"], ["small_grid.nii.gz", "f.nii.gz", "does not match"]),
    "warp_complex_field": (["warp", "{in}/m.nii.gz", "{in}/complex_field.nii.gz", "-o", "{out}.nii.gz"],
                           ["complex_field.nii.gz", "complex"]),
    "warp_strings_image": (["warp", "{in}/strings.npy", "{in}/disp.nii.gz", "-o", "{out}.nii.gz"],
                           ["strings.npy"]),
    "warp_singular_fixed": (["warp", "{in}/fseg.nii.gz", "{in}/disp.nii.gz", "--labels", "--fixed",
                             "{in}/singular.nii.gz", "-o", "{out}.nii.gz"], ["singular.nii.gz", "degenerate"]),
    "warp_missing_folder": (["warp", "{in}/m.nii.gz", "{in}/disp.nii.gz", "-o", "{out}/w.nii.gz"],
                            ["out", "does not exist"]),
    "warp_bad_suffix": (["warp", "{in}/m.nii.gz", "{in}/disp.nii.gz", "-o", "{out}.txt"], ["out.txt", ".nii.gz"]),
    "warp_output_is_folder": (["warp", "{in}/m.nii.gz", "{in}/disp.nii.gz", "-o", "{in}/folder.nii.gz"],
                              ["folder.nii.gz", "directory"]),
    # evaluate
    "evaluate_missing_folder": (["evaluate", "{in}/disp.nii.gz", "--fixed-labels", "{in}/fseg.nii.gz",
                                 "--moving-labels", "{in}/mseg.nii.gz", "-o", "{out}/metrics.json"],
                                ["out", "does not exist"]),
    "evaluate_huge_field": (["evaluate", "{in}/huge.nii.gz"], ["huge.nii.gz"]),
    "evaluate_fixed_labels_alone": (["evaluate", "{in}/disp.nii.gz", "--fixed-labels", "{in}/fseg.nii.gz"],
                                    ["--fixed-labels"]),
    "evaluate_moving_landmarks_alone": (["evaluate", "{in}/disp.nii.gz", "--moving-landmarks", "{in}/lm.csv"],
                                        ["--moving-landmarks"]),
    "evaluate_field_not_fixed_grid": (["evaluate", "{in}/small_grid.nii.gz", "--fixed", "{in}/f.nii.gz"],
                                      ["small_grid.nii.gz"]),
    "evaluate_singular_fixed": (["evaluate", "{in}/disp.nii.gz", "--fixed", "{in}/singular.nii.gz"],
                                ["singular.nii.gz"]),
    "evaluate_mask_not_overlapping": (["evaluate", "{in}/disp.nii.gz", "--fixed-mask", "{in}/mask_small.nii.gz"],
                                  ["mask"]),
    # export
    "export_huge_field": (["export", "{in}/huge.nii.gz", "--fixed", "{in}/f.nii.gz", "--to", "itk",
                           "-o", "{out}.nii.gz"], ["huge.nii.gz"]),
    "export_inverse_no_iterations": (["export", "{in}/disp.nii.gz", "--fixed", "{in}/f.nii.gz", "--to", "itk",
                                      "--inverse", "--iterations", "0", "-o", "{out}.nii.gz"], ["--iterations"]),
    "export_singular_moving": (["export", "{in}/disp.nii.gz", "--fixed", "{in}/f.nii.gz", "--moving",
                                "{in}/singular.nii.gz", "--to", "itk", "-o", "{out}.nii.gz"], ["singular.nii.gz"]),
    "export_missing_folder": (["export", "{in}/disp.nii.gz", "--fixed", "{in}/f.nii.gz", "--to", "mm",
                               "-o", "{out}/x.nii.gz"], ["does not exist"]),
    # encode / pretrain
    "encode_bad_suffix": (["encode", "{in}/f.nii.gz", "--features", "mind", "-o", "{out}.txt"], ["out.txt"]),
    "encode_missing_folder": (["encode", "{in}/f.nii.gz", "--features", "mind", "-o", "{out}/x.nii.gz"],
                              ["does not exist"]),
    "pretrain_device": (["pretrain", "{in}/ds_missing_image", "-o", "{out}", "--steps", "1", "--device", "tpu"],
                        ["tpu"]),
    "pretrain_ibot_inf": (["pretrain", "{in}/ds_missing_image", "-o", "{out}", "--steps", "1",
                           "--ibot-weight", "inf"], ["--ibot-weight"]),
    "pretrain_lr_nan": (["pretrain", "{in}/ds_missing_image", "-o", "{out}", "--lr", "nan"], ["--lr"]),
    "pretrain_output_under_a_file": (["pretrain", "{in}/ds_missing_image", "-o", "{in}/a_file/run"], ["a_file"]),
    # dataset
    "dataset_labels_string": (["dataset", "{in}/ds_labels_string", "-o", "{out}", "--quiet"],
                              ["dataset.json", "'labels'"]),
    "dataset_empty_split": (["dataset", "{in}/ds_empty_split", "-o", "{out}", "--quiet"],
                            ["dataset.json", "'registration_val' is empty"]),
    "dataset_missing_image": (["dataset", "{in}/ds_missing_image", "-o", "{out}", "--quiet"], ["nope.nii.gz"]),
    "dataset_entry_not_object": (["dataset", "{in}/ds_entry_not_object", "-o", "{out}", "--quiet"],
                                 ["registration_val[0]"]),
    "dataset_entry_missing_key": (["dataset", "{in}/ds_entry_missing_key", "-o", "{out}", "--quiet"],
                                  ["registration_val[0]"]),
    "dataset_no_pairs": (["dataset", "{in}/ds_no_pairs", "-o", "{out}", "--quiet"], ["lists no pairs"]),
    "dataset_split_not_list": (["dataset", "{in}/ds_split_not_list", "-o", "{out}", "--quiet"], ["must be a list"]),
    "dataset_not_json": (["dataset", "{in}/ds_not_json", "-o", "{out}", "--quiet"], ["not valid JSON"]),
    "dataset_missing_json": (["dataset", "{in}/nowhere", "-o", "{out}", "--quiet"], ["not found"]),
    "dataset_cache_nan": (["dataset", "{in}/ds_missing_image", "-o", "{out}", "--cache-size-gb", "nan"],
                          ["--cache-size-gb"]),
    "dataset_cache_inf": (["dataset", "{in}/ds_missing_image", "-o", "{out}", "--cache-size-gb", "inf"],
                          ["--cache-size-gb"]),
    "dataset_workers_zero": (["dataset", "{in}/ds_labels_string", "-o", "{out}", "--workers", "0"], ["--workers"]),
    "dataset_bad_setting": (["dataset", "{in}/ds_labels_string", "-o", "{out}", "--set", "iterations=-1"],
                            ["iterations"]),
    "dataset_output_is_file": (["dataset", "{in}/ds_labels_string", "-o", "{in}/a_file"], ["a_file"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_with_one_line_and_nothing_written(case, inputs, tmp_path, capsys):
    argv, needles = CASES[case]
    _expect_refused(capsys, inputs, tmp_path, argv, needles)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
@pytest.mark.parametrize("command", ["register", "warp", "evaluate"])
def test_read_only_output_folder(command, inputs, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    argv = {"register": REGISTER[:3] + ["-o", str(locked / "out"), *FAST],
            "warp": ["warp", "{in}/m.nii.gz", "{in}/disp.nii.gz", "-o", str(locked / "w.nii.gz")],
            "evaluate": ["evaluate", "{in}/disp.nii.gz", "-o", str(locked / "m.json")]}[command]
    try:
        _expect_refused(capsys, inputs, tmp_path, argv, ["locked", "not writable"])
    finally:
        locked.chmod(0o755)


def test_negative_mha_spacing_is_read_as_a_flip(inputs):
    """MetaIO ``ElementSpacing = -1 1 1``: SimpleITK reads spacing 1 and a flipped direction; the
    world position of every voxel is what the header says (origin + spacing * index)."""
    from dinoreg.io.images import load_image

    pos, neg = load_image(inputs / "positive.mha"), load_image(inputs / "negative.mha")
    np.testing.assert_array_equal(pos.array, neg.array)
    np.testing.assert_allclose(neg.affine[:, 0], -pos.affine[:, 0])  # the i axis runs the other way
    np.testing.assert_allclose(neg.affine[:, 1:], pos.affine[:, 1:])
    np.testing.assert_allclose(neg.spacing, [1, 1, 1])


def test_geometry_and_values_are_checked_when_reading_arrays_and_objects(tmp_path):
    """The Python API applies the same checks to arrays, nibabel and SimpleITK objects."""
    import SimpleITK as sitk

    from dinoreg import DinoregError
    from dinoreg.io.fields import as_field
    from dinoreg.io.images import as_image

    vol = _volume()
    singular = np.eye(4)
    singular[:3, 1] = singular[:3, 0]
    with pytest.raises(DinoregError, match="singular"):
        as_image(nib.load(str(_nifti_sform(tmp_path / "s.nii.gz", vol, singular))), "nib")
    with pytest.raises(DinoregError, match="complex"):
        as_image(vol.astype(np.complex64), "arr")
    with pytest.raises(DinoregError, match="non-numeric"):
        as_image(np.array([["a"]]), "arr")
    with pytest.raises(DinoregError, match="NaN"):
        as_image(sitk.GetImageFromArray(np.full((4, 4, 4), np.nan, np.float32)), "sitk")
    with pytest.raises(DinoregError, match="1e\\+30"):
        as_field(np.full(SHAPE + (3,), 1e30, np.float32))
    assert as_field(np.full(SHAPE + (3,), 150.0, np.float32)).array.dtype == np.float32  # large but plausible


def test_name_stays_inside_the_output_folder(inputs, tmp_path, capsys):
    """A plain ``--name`` is accepted (and used); nothing appears outside ``-o``."""
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, [a.format(**{"in": inputs}) for a in REGISTER[:3]]
                             + ["-o", str(out), "--name", "mine.nii.gz", *FAST])
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "mine.nii.gz", "warped_mine.nii.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


_KILLER = """
import os, signal, sys
import dinoreg.result as result
real_save = result.save_image
def save_then_die(*args, **kwargs):  # the first output file is complete: die like kill -9
    real_save(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
result.save_image = save_then_die
from dinoreg.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkilled_register_leaves_temporaries_the_next_run_removes(inputs, tmp_path, capsys):
    """A real SIGKILL while ``register`` writes its outputs leaves a hidden temporary folder in
    ``-o``; the next run into the same folder removes it, and only it (user files, lookalike
    names and a live process's temporaries stay)."""
    out = tmp_path / "out"
    out.mkdir()
    keep = [out / ".dinoreg-notes", out / ".hidden.nii.gz", out / "notes.txt",
            out / f".dinoreg-{os.getpid()}-abcdefgh"]  # the last: a live process's temporary
    keep[0].mkdir()
    keep[3].mkdir()
    for path in keep[1:3]:
        path.write_text("user file\n")
    argv = [a.format(**{"in": inputs}) for a in REGISTER[:3]] + ["-o", str(out), *FAST]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", _KILLER, *argv], env=env, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    stale = [p for p in out.iterdir() if re.fullmatch(r"\.dinoreg-\d+-[a-z0-9_]{8}", p.name) and p not in keep]
    assert len(stale) == 1 and any(stale[0].iterdir())  # the killed run's folder, holding a finished file
    assert not [p for p in out.iterdir() if p.name.startswith("disp_")]  # nothing published

    code, _, err = _run(capsys, argv)
    assert code == 0, err
    assert not stale[0].exists()
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([p.name for p in keep] + ["disp_f_m.nii.gz", "metrics.json", "warped_f_m.nii.gz"])


def test_encode_one_encoder_with_the_default_ensemble_preset(inputs, tmp_path, capsys):
    """``encode --features mind`` with the default preset (an ensemble of two encoders) used to
    fail on the preset's two ensemble weights."""
    out = tmp_path / "mind.nii.gz"
    code, _, err = _run(capsys, ["encode", str(inputs / "f.nii.gz"), "--features", "mind", "--components", "3",
                                 "--quiet", "-o", str(out)])
    assert code == 0, err
    assert nib.load(str(out)).shape[-1] == 3


def test_seed_changes_the_randomized_pca_and_only_it():
    """``--seed`` seeds the randomized low-rank PCA of DINO features (and its token subsample):
    different seeds, different bases; the same seed, the same basis bit for bit."""
    from dinoreg.features.pca import fit_pca

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(2000, 96, generator=gen) @ torch.randn(96, 96, generator=gen) * 0.1
    tokens += torch.randn(2000, 96, generator=gen)  # a flat spectrum: the sketch matters
    a, b, again = fit_pca(tokens, 8, seed=0), fit_pca(tokens, 8, seed=1), fit_pca(tokens, 8, seed=0)
    assert torch.equal(a.components, again.components)
    assert not torch.equal(a.components, b.components)


def test_seed_does_not_change_a_deterministic_method(inputs):
    """MIND + ConvexAdam draws no random number: the seed leaves its field unchanged (as the
    README says)."""
    import dinoreg

    fixed, moving = str(inputs / "f.nii.gz"), str(inputs / "m.nii.gz")
    kwargs = dict(preset_name="mind", iterations=2, grid_sp=4, grid_sp_adam=2, disp_hw=1, progress=False)
    one = dinoreg.register(fixed, moving, seed=0, **kwargs)
    two = dinoreg.register(fixed, moving, seed=7, **kwargs)
    np.testing.assert_array_equal(one.disp, two.disp)
