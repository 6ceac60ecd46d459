"""DINO-Reg through the public entry points: registration on real data and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import WEIGHTS, needs_data, needs_weights, write_nifti
from dinoreg.api import register
from dinoreg.cli import main
from dinoreg.errors import DinoregError

pytestmark = [needs_data, needs_weights]
# DINOv2 features alone (not a preset: measured below identity, see the README's study)
BASE = dict(preset_name="mind", upsample=1.0, every=8, iterations=5, lambda_weight=5.0, progress=False)
TINY = {**BASE, "features": "dinov2"}


def test_dinov2_registration_recovers_a_shift(brain_volume):
    """A 96-voxel cube of real brain and the same region 3 voxels further along i."""
    fixed = np.ascontiguousarray(brain_volume[32:128, 48:144, 64:160])
    moving = np.ascontiguousarray(brain_volume[29:125, 48:144, 64:160])
    # fixed(p) = V(p + 32), moving(p) = V(p + 29): the pull-back field is u = +3 along i
    result = register(fixed, moving, **{**TINY, "upsample": 2.0, "every": 4, "iterations": 40})
    mask = fixed > 0.1
    assert result.disp.shape == (96, 96, 96, 3)
    assert abs(float(result.disp[..., 0][mask].mean()) - 3.0) < 1.0  # patches are 7 voxels wide
    assert float(np.abs(result.disp[..., 1:][mask]).mean()) < 1.0


def test_ensemble_concat_and_average_run(brain_crop):
    moving = np.roll(brain_crop, 2, axis=0)
    for mode in ("concat", "average"):
        r = register(brain_crop, moving, features="mind+dinov2", ensemble=mode, **BASE)
        assert np.isfinite(r.disp).all()


def test_unknown_encoder(brain_crop):
    with pytest.raises(DinoregError, match="unknown encoder 'dinov9'"):
        register(brain_crop, brain_crop, features="dinov9", **BASE)


def test_weights_missing_corrupt_and_wrong_architecture(tmp_path, brain_crop, monkeypatch):
    monkeypatch.setenv("DINOREG_WEIGHTS_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    from dinoreg.features import dinov2

    dinov2.cached_model.cache_clear()
    with pytest.raises(DinoregError, match="dinov2_vits14"):
        register(brain_crop, brain_crop, **TINY)
    corrupt = tmp_path / "dinov2_vits14.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    with pytest.raises(DinoregError, match="dinov2_vits14.safetensors"):
        register(brain_crop, brain_crop, weights=str(corrupt), **TINY)
    wrong = tmp_path / "wrong.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 8)}, wrong)
    with pytest.raises(DinoregError, match="wrong.pth"):
        register(brain_crop, brain_crop, weights=str(wrong), **TINY)
    dinov2.cached_model.cache_clear()


def test_image_too_small_for_one_patch(tmp_path, capsys):
    tiny = np.random.default_rng(0).random((4, 4, 4)).astype(np.float32)
    path = write_nifti(tmp_path / "tiny.nii.gz", tiny)
    code = main(["register", str(path), str(path), "-o", str(tmp_path / "o"), "--preset", "dinoreg-fast",
                 "--grid-sp", "1", "--grid-sp-adam", "1", "--quiet"])  # 1-voxel cells: the encoder refuses
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "patch" in err[0]
