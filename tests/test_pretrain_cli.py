"""``dinoreg pretrain`` on real volumes: runs, resumes, and its weights register."""

from __future__ import annotations

import json

import numpy as np

from conftest import DATA, needs_data, write_nifti
from dinoreg.cli import main

pytestmark = needs_data
TINY = ["--embed-dim", "32", "--depth", "1", "--heads", "2", "--checkpoint-every", "2", "--quiet"]


def test_pretrain_resumes_and_weights_register(tmp_path, brain_volume):
    data = tmp_path / "data"
    data.mkdir()
    for name, sl in (("a", np.s_[::3, ::3, ::3]), ("b", np.s_[1::3, 1::3, 1::3])):
        write_nifti(data / f"{name}.nii.gz", np.ascontiguousarray(brain_volume[sl]))
    out = tmp_path / "run"
    assert main(["pretrain", str(data), "-o", str(out), "--steps", "2", *TINY]) == 0
    assert main(["pretrain", str(data), "-o", str(out), "--steps", "4", *TINY]) == 0  # resumes at step 2
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and len(steps) == 4  # each step logged once
    weights = out / "dino3d.safetensors"
    crop = np.ascontiguousarray(brain_volume[40:104, 56:120, 72:136])
    assert main(["register", str(write_nifti(tmp_path / "f.nii.gz", crop)),
                 str(write_nifti(tmp_path / "m.nii.gz", np.roll(crop, 2, 0))), "-o", str(tmp_path / "reg"),
                 "--features", "dino3d", "--weights", str(weights), "--iterations", "3", "--quiet"]) == 0
    assert any(p.name.startswith("disp_") for p in (tmp_path / "reg").iterdir())


def test_pretrain_synth_labels_resume_and_mismatch(tmp_path, brain_volume):
    data = tmp_path / "data"
    data.mkdir()
    vol = np.ascontiguousarray(brain_volume[40:88, 56:104, 72:120])
    write_nifti(data / "a.nii.gz", vol)
    labels = write_nifti(tmp_path / "labels_seg.nii.gz", (vol > np.percentile(vol, 60)).astype(np.float32) * 3)
    out = tmp_path / "run"
    args = ["pretrain", str(data), "-o", str(out), "--synth-labels", str(labels), "--global-size", "16",
            "--same-contrast", "0.5", "--snapshots", *TINY]
    assert main([*args, "--steps", "2"]) == 0
    assert main([*args, "--steps", "3"]) == 0  # resumes at step 2
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all("dense" in r and "cls_entropy" in r for r in rows)
    assert (out / "snapshots" / "dino3d_step000002.safetensors").is_file()
    no_labels = [a for a in args if a not in ("--synth-labels", str(labels))]
    assert main([*no_labels, "--steps", "4"]) == 2  # other data than the checkpoint: a one-line error
