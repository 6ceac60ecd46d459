"""DINO/iBOT pretraining: data listing, augmentation, losses, a short real run, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dinoreg.pretrain.train as train_mod
from dinoreg.errors import DinoregError
from dinoreg.features.vit3d import Dino3DEncoder, ViT3DConfig
from dinoreg.pretrain.augment import AugmentConfig, foreground_points, make_batch
from dinoreg.pretrain.data import list_volumes, load_volumes, preprocess, shrink
from dinoreg.preprocess import Intensity, normalise
from dinoreg.pretrain.dino import block_mask
from dinoreg.pretrain.train import PretrainConfig, pretrain

torch.set_num_threads(1)
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.is_dir(), reason="shared data not available")

TINY = PretrainConfig(
    model=ViT3DConfig(embed_dim=32, depth=2, num_heads=2, window=16),
    augment=AugmentConfig(global_size=16, local_size=8, n_local=2),
    steps=50, batch_size=2, lr=1e-3, warmup_steps=5, teacher_temp=(0.04, 0.04), mask_prob=1.0,
    out_dim=128, patch_out_dim=128, head_hidden=64, head_bottleneck=32, checkpoint_every=100,
    views="multicrop", dense_weight=0.0, koleo_weight=0.0, centering="ema")  # the plain DINO + iBOT recipe


@pytest.fixture(scope="module")
def real_volumes() -> list[torch.Tensor]:
    """A T1 brain and an abdominal CT from the shared data, shrunk to ~70k voxels."""
    if not SHARED.is_dir():
        pytest.skip("shared data not available")
    paths = [SHARED / "lapirn_brain_t1_pair" / "image_A_160x192x144.nii.gz",
             SHARED / "totalsegmentator_examples" / "example_ct_sm.nii.gz"]
    return [shrink(v, 40 * 48 * 36) for v in load_volumes(paths, progress=False)]


@needs_data
def test_list_volumes_skips_labels_and_finds_dicom():
    paths = list_volumes(SHARED)
    names = [str(p.relative_to(SHARED)) for p in paths]
    assert "totalsegmentator_examples/example_ct_dicom" in names
    assert "labelreg_prostate_mr_us_demo/train/us_images/case000000.nii.gz" in names
    assert not any("_seg" in n or "labels/" in n for n in names)
    assert not any(n.endswith(".npz") for n in names)


def test_list_volumes_from_dataset_json(tmp_path):
    import nibabel as nib

    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for name in ["imagesTr/T_0001_0000.nii.gz", "imagesTr/T_0002_0000.nii.gz", "labelsTr/T_0001_0000.nii.gz"]:
        nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.float32), np.eye(4)), str(tmp_path / name))
    spec = {"training": [{"image": "./imagesTr/T_0001_0000.nii.gz", "label": "./labelsTr/T_0001_0000.nii.gz"}],
            "registration_val": [{"fixed": "./imagesTr/T_0001_0000.nii.gz", "moving": "./imagesTr/T_0002_0000.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    paths = list_volumes(tmp_path / "dataset.json")
    assert [p.name for p in paths] == ["T_0001_0000.nii.gz", "T_0002_0000.nii.gz"]
    assert [p.name for p in list_volumes(tmp_path)] == ["T_0001_0000.nii.gz", "T_0002_0000.nii.gz"]
    only_labels = tmp_path / "only_labels_here"
    only_labels.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), str(only_labels / "case_seg.nii.gz"))
    with pytest.raises(DinoregError, match="no NIfTI"):
        list_volumes(only_labels)
    with pytest.raises(DinoregError, match="not found"):
        list_volumes(tmp_path / "nothing")


def test_preprocess_ct_window_and_mr_percentile():
    ct = np.array([-1000.0, -150.0, 50.0, 250.0, 2000.0]).reshape(5, 1, 1)
    assert np.allclose(preprocess(ct, ct_window=(50, 400))[:, 0, 0], [0, 0, 0.5, 1, 1])
    mr = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    out = preprocess(mr, mr_percentile=90.0)
    # registration's rule: the percentile of the non-zero voxels (1..999: 899.2, not 899.1 over all), lower bound 0
    assert out.min() == 0 and out.max() == 1 and np.isclose(out.reshape(-1)[450], 450 / 899.2, atol=1e-5)
    assert np.array_equal(out, normalise(mr, Intensity("auto", (50.0, 400.0), 90.0)))


def test_preprocess_names_a_constant_volume():
    with pytest.raises(DinoregError, match="constant") as err:
        preprocess(np.full((8, 8, 8), 3.0), name="flat.nii.gz")
    assert "flat.nii.gz" in str(err.value)


def test_augmentation_is_seeded_and_shaped():
    vol = torch.rand(30, 40, 20)
    cfg = AugmentConfig(global_size=16, local_size=8, n_local=3)
    fgs, w = [foreground_points(vol)], torch.ones(1)
    a = make_batch([vol], fgs, w, 2, torch.Generator().manual_seed(3), cfg)
    b = make_batch([vol], fgs, w, 2, torch.Generator().manual_seed(3), cfg)
    assert a[0].shape == (4, 1, 16, 16, 16) and a[1].shape == (6, 1, 8, 8, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0][0], a[0][2])


def test_block_mask_reaches_ratio():
    m = block_mask((8, 8, 8), 0.3, torch.Generator().manual_seed(0))
    assert m.shape == (512,) and 0.3 <= m.float().mean() <= 0.6


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@needs_data
def test_short_real_run_loss_finite_and_decreasing(real_volumes, tmp_path):
    weights = pretrain(real_volumes, TINY, tmp_path, resume=False, progress=False)
    loss = np.array([r["loss"] for r in _log(tmp_path)])
    assert len(loss) == TINY.steps and np.isfinite(loss).all()
    assert loss[-10:].mean() < 0.85 * loss[:10].mean()
    feats = Dino3DEncoder.from_file(weights).encode(real_volumes[0])
    assert feats.shape == (32, 10, 12, 9)


@needs_data
def test_resume_reproduces_an_uninterrupted_run(real_volumes, tmp_path, monkeypatch):
    cfg = PretrainConfig(**{**TINY.__dict__, "steps": 6, "checkpoint_every": 3, "mask_prob": 0.5})
    pretrain(real_volumes, cfg, tmp_path / "straight", resume=False, progress=False)

    real_step = train_mod.train_step

    def interrupted(state, *args, **kwargs):
        if state.step == 4:  # step 4 done but not checkpointed: it must be redone identically
            raise KeyboardInterrupt
        return real_step(state, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain(real_volumes, cfg, tmp_path / "resumed", resume=True, progress=False)
    monkeypatch.setattr(train_mod, "train_step", real_step)
    pretrain(real_volumes, cfg, tmp_path / "resumed", resume=True, progress=False)

    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for key in ("student", "teacher", "dino_loss", "patch_loss"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert torch.equal(a["generator"], b["generator"])
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(_log(tmp_path / "straight")) == drop(_log(tmp_path / "resumed"))

    other = PretrainConfig(**{**cfg.__dict__, "lr": 5e-4})
    with pytest.raises(DinoregError, match="another config"):
        pretrain(real_volumes, other, tmp_path / "resumed", resume=True, progress=False)
    with pytest.raises(DinoregError, match="other volumes"):
        pretrain(real_volumes[:1], cfg, tmp_path / "resumed", resume=True, progress=False)
