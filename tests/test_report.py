"""QC figure and HTML report: files, content, and the page opened in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED, load_script, needs_data
from dinoreg.cli import main
from dinoreg.dataset import RunConfig, run_dataset

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_qc_figure_marks_folds(brain_crop: np.ndarray, tmp_path: Path) -> None:
    from PIL import Image as PILImage

    from dinoreg.qc import full_size_jacobian, qc_figure

    fixed = brain_crop[::2, ::2, ::2]
    disp = np.zeros(fixed.shape + (3,), np.float32)
    disp[20:28, 20:28, 20:28, 0] = np.linspace(4, -4, 8)[:, None, None]  # compresses past zero: a fold
    assert (full_size_jacobian(disp) <= 0).any() and full_size_jacobian(disp).shape == fixed.shape
    path = qc_figure(fixed, np.roll(fixed, 2, 0), fixed, disp, tmp_path / "qc" / "pair.png", title="pair",
                     spacing=(1.0, 1.0, 2.0), affine=np.eye(4))
    with PILImage.open(path) as img:
        assert img.format == "PNG" and img.width > 1000 and img.height > 500
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-pair run without QC figures (the report draws them from the files)."""
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared/data is not available")
    script = load_script("scripts/make_dev_dataset.py")
    dataset = script.build(tmp_path_factory.mktemp("ds"), SHARED, shrink=3, groups=("brain",))
    out = tmp_path_factory.mktemp("run")
    config = RunConfig(outdir=str(out), overrides={"iterations": 3}, device="cpu", qc=False)
    run_dataset(dataset, "val", config, threads=1, progress=False)
    return out


@needs_data
def test_report_command_rebuilds_page(run_folder: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(run_folder)]) == 0
    assert "report:" in capsys.readouterr().out
    page = (run_folder / "report.html").read_text()
    for stem in ("0001_0000_0002_0000", "0003_0000_0004_0000"):
        assert (run_folder / "qc" / f"{stem}.png").is_file()
        assert f'id="pair-{stem}"' in page
        assert json.loads((run_folder / "pairs" / f"{stem}.json").read_text())["qc"] == f"qc/{stem}.png"
    assert page.count("data:image/png;base64,") == 2 and "dice_mean" in page and "DevReg" in page
    assert main(["report", str(run_folder), "--link"]) == 0
    assert 'src="qc/0001_0000_0002_0000.png"' in (run_folder / "report.html").read_text()
    assert main(["report", str(run_folder.parent)]) == 2
    assert "not a 'dinoreg dataset' output folder" in capsys.readouterr().err


def _chromium(args: list[str], tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{name}"
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                           *args], capture_output=True, text=True, timeout=120)


@needs_data
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
@pytest.mark.parametrize("embed", [True, False], ids=["embedded", "linked"])
def test_report_in_headless_chromium(run_folder: Path, tmp_path: Path, embed: bool) -> None:
    from dinoreg.report import build_report

    page = build_report(run_folder, embed=embed)
    url = page.resolve().as_uri()
    dom = _chromium(["--dump-dom", url], tmp_path, "dom").stdout
    status = re.search(r'id="img-status"[^>]*data-loaded="(\d+)"[^>]*data-total="(\d+)"', dom)
    assert status, dom[-2000:]
    assert status.groups() == ("2", "2")  # every picture decoded (naturalWidth > 0)
    for stem in ("0001_0000_0002_0000", "0003_0000_0004_0000"):
        assert f'id="pair-{stem}"' in dom
    assert "<table>" in dom and "dice_mean" in dom
    broken = run_folder / "broken.html"  # the check is not vacuous: a missing picture is counted
    broken.write_text(page.read_text().replace("</section>", '<img src="missing.png"></section>', 1))
    dom = _chromium(["--dump-dom", broken.as_uri()], tmp_path, "broken").stdout
    broken.unlink()
    assert re.search(r'data-loaded="2" data-total="3"', dom)
    shot = tmp_path / "report.png"
    _chromium([f"--screenshot={shot}", "--window-size=1300,1800", url], tmp_path, "shot")
    assert shot.is_file() and shot.stat().st_size > 10_000
