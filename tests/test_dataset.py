"""``dinoreg dataset`` on a Learn2Reg-layout set built from ../shared (shrunk 3x for speed):
outputs, tables, resume after SIGKILL, and the same fields from every executor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import SHARED, load_script, needs_data
from dinoreg.cli import main
from dinoreg.dataset import RECORDS, RunConfig, read_run_log, run_dataset

REPO = Path(__file__).resolve().parents[1]
FAST = ["--set", "iterations=5", "--device", "cpu", "--threads", "1", "--quiet"]
pytestmark = needs_data


@pytest.fixture(scope="module")
def dev_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All five DevReg pairs (2 brain pairs with labels, 3 BraTS-Reg pairs with keypoints), 1/3 size."""
    return load_script("scripts/make_dev_dataset.py").build(tmp_path_factory.mktemp("devreg"), SHARED, shrink=3)


@pytest.fixture(scope="module")
def brain_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return load_script("scripts/make_dev_dataset.py").build(tmp_path_factory.mktemp("devbrain"), SHARED, shrink=3, groups=("brain",))


def test_dev_dataset_layout_and_keypoints(dev_dataset: Path) -> None:
    meta = json.loads(dev_dataset.read_text())
    assert len(meta["registration_val"]) == 5
    root = dev_dataset.parent
    assert (root / "imagesTr" / "DevReg_0001_0000.nii.gz").is_file()
    assert (root / "labelsTr" / "DevReg_0002_0000.nii.gz").is_file()
    # BraTS-Reg landmarks: the initial distances in mm (SOURCE.md) survive the LPS -> voxel conversion
    base = np.loadtxt(root / "keypointsTr" / "DevReg_0005_0000.csv", delimiter=",")
    follow = np.loadtxt(root / "keypointsTr" / "DevReg_0005_0001.csv", delimiter=",")
    spacing = nib.load(str(root / "imagesTr" / "DevReg_0005_0000.nii.gz")).header.get_zooms()[:3]
    dist = np.linalg.norm((base - follow) * np.asarray(spacing), axis=1)
    np.testing.assert_allclose(dist, [3.0, 1.0, 1.41, 1.41, 4.12, 3.0], atol=0.01)


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "dinoreg", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_dataset_killed_and_resumed(dev_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["dataset", str(dev_dataset), "--split", "val", "-o", str(out), *FAST]
    first = _cli(args)
    deadline = time.time() + 300

    def finished() -> set[str]:
        # a pair is finished when its record exists (the run log's "done" line follows the record,
        # so a kill can fall between the two); ".name.json.XXXX.json" are records being written
        return {p.stem for p in (out / RECORDS).glob("*.json") if not p.name.startswith(".")}

    while not finished():  # the first pair's done marker, not a temporary record being written
        assert first.poll() is None, first.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = finished()
    assert 1 <= len(done_before) < 5

    second = _cli(args)
    stdout, stderr = second.communicate(timeout=600)
    assert second.returncode == 0, stderr
    assert "pairs: 5 of 5 finished" in stdout

    events = read_run_log(out)
    done = Counter(e["pair"] for e in events if e["event"] == "done")
    starts = Counter(e["pair"] for e in events if e["event"] == "start")
    records = {p.stem for p in (out / RECORDS).glob("*.json") if not p.name.startswith(".")}
    assert len(records) == 5 and set(done.values()) == {1}  # every pair scored, none twice
    assert set(done) | done_before == records  # (a pair killed after its record may lack its log line)
    assert sum(n == 2 for n in starts.values()) <= 1 and max(starts.values()) <= 2  # only the one in flight redone
    assert not any(starts[p] > 1 for p in done_before)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_done"] == 5 and summary["missing"] == []
    agg = summary["aggregate"]
    assert agg["dice_mean"]["n"] == 2 and agg["tre_mm_mean"]["n"] == 3 and agg["sdlogj"]["n"] == 5
    assert set(agg["dice_mean"]) == {"mean", "std", "30", "n"}
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 6 and rows[0].startswith("pair,fixed,moving,disp,seconds,dice_mean")
    assert (out / "summary.csv").read_text().startswith("metric,mean,std,30,n\ndice_mean,")
    names = sorted(p.name for p in out.glob("disp_*.nii.gz"))
    assert names == ["disp_0001_0000_0002_0000.nii.gz", "disp_0003_0000_0004_0000.nii.gz",
                     "disp_0005_0000_0005_0003.nii.gz", "disp_0005_0002_0005_0004.nii.gz", "disp_0005_0005.nii.gz"]
    field = nib.load(str(out / "disp_0005_0005.nii.gz"))
    fixed = nib.load(str(dev_dataset.parent / "imagesTr" / "DevReg_0005_0000.nii.gz"))
    assert field.shape == fixed.shape + (3,) and field.get_data_dtype() == np.float32
    np.testing.assert_allclose(field.affine, fixed.affine)
    assert len(list((out / "qc").glob("*.png"))) == 5
    assert not [p for p in out.rglob(".*") if p.name != ".dinoreg-dataset.lock"]  # no temporaries left

    third = _cli(args)  # everything finished: nothing is redone
    _, stderr = third.communicate(timeout=300)
    assert third.returncode == 0, stderr
    assert len(read_run_log(out)) == len(events)


def test_masks_restrict_sdlogj(brain_dataset: Path, tmp_path: Path) -> None:
    """With masksTr present the Jacobian statistics are masked (Learn2Reg's masked SDlogJ)."""
    root = brain_dataset.parent
    (root / "masksTr").mkdir()
    for img in (root / "imagesTr").glob("*.nii.gz"):
        vol = nib.load(str(img))
        nib.save(nib.Nifti1Image((np.asarray(vol.dataobj) > 0.05).astype(np.uint8), vol.affine),
                 str(root / "masksTr" / img.name))
    config = RunConfig(outdir=str(tmp_path / "out"), overrides={"iterations": 3}, device="cpu", qc=False)
    summary = run_dataset(brain_dataset, "val", config, threads=1, progress=False)
    assert summary["n_done"] == 2 and not summary["failed"]
    assert all(p["metrics"]["jacobian_masked"] for p in summary["pairs"])
    assert all(0 <= p["metrics"]["dice_mean"] <= 1 for p in summary["pairs"])


def _fields(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(out.glob("disp_*.nii.gz"))}


def test_executors_give_the_same_fields(brain_dataset: Path, tmp_path: Path) -> None:
    """In-process, two spawned processes and Ray tasks: the same fields and metrics."""
    results = {}
    runs = [("inline", "local", 1), ("processes", "local", 2)]
    try:
        import ray  # noqa: F401
        runs.append(("ray", "ray", 1))
    except ImportError:
        pass
    for name, executor, workers in runs:
        config = RunConfig(outdir=str(tmp_path / name), overrides={"iterations": 3}, device="cpu", qc=False)
        summary = run_dataset(brain_dataset, "val", config, workers=workers, executor=executor, threads=1,
                              progress=False)
        assert summary["n_done"] == 2 and not summary["failed"], summary["failed"]
        results[name] = (_fields(tmp_path / name), summary["aggregate"]["dice_mean"]["mean"])
    ref_fields, ref_dice = results["inline"]
    for name, (fields, dice) in results.items():
        assert fields.keys() == ref_fields.keys()
        for key in fields:
            np.testing.assert_allclose(fields[key], ref_fields[key], atol=1e-4, err_msg=f"{name}: {key}")
        assert dice == pytest.approx(ref_dice, abs=1e-6)
    if "ray" not in results:
        pytest.skip("ray is not installed: only the local executors were compared")


def test_dataset_cli_errors(brain_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "o")
    assert main(["dataset", str(brain_dataset), "-o", out, "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["dataset", str(brain_dataset), "-o", out, "--set", "iterations"]) == 2
    assert "--set expects KEY=VALUE" in capsys.readouterr().err
    assert main(["dataset", str(tmp_path / "missing.json"), "-o", out]) == 2
    assert "dataset.json not found" in capsys.readouterr().err


def test_failed_pair_does_not_stop_the_others(brain_dataset: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "ds"
    bad.mkdir()
    meta = json.loads(brain_dataset.read_text())
    root = brain_dataset.parent
    (bad / "imagesTr").mkdir()
    for name in ("DevReg_0003_0000.nii.gz", "DevReg_0004_0000.nii.gz"):
        (bad / "imagesTr" / name).symlink_to(root / "imagesTr" / name)
    const = nib.load(str(root / "imagesTr" / "DevReg_0001_0000.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones(const.shape, np.float32), const.affine), str(bad / "imagesTr" / "DevReg_0001_0000.nii.gz"))
    (bad / "imagesTr" / "DevReg_0002_0000.nii.gz").symlink_to(root / "imagesTr" / "DevReg_0002_0000.nii.gz")
    (bad / "dataset.json").write_text(json.dumps({**meta, "labels": {}}))
    code = main(["dataset", str(bad), "-o", str(tmp_path / "o"), *FAST, "--no-qc"])
    err = capsys.readouterr().err
    assert code == 2 and "1 pair(s) failed" in err and "0001_0000_0002_0000" in err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["n_done"] == 1 and summary["missing"] == ["0001_0000_0002_0000"]
