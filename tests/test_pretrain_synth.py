"""Dense pretraining: paired synthetic views, the correspondence InfoNCE, KoLeo, Sinkhorn centring,
and a short resumable run of the paired recipe with label maps."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import dinoreg.pretrain.train as train_mod
from dinoreg.features.vit3d import ViT3DConfig
from dinoreg.pretrain.augment import AugmentConfig
from dinoreg.pretrain.dense import dense_info_nce, koleo, token_correspondence
from dinoreg.pretrain.dino import sinkhorn_knopp
from dinoreg.pretrain.synth import (SynthConfig, label_foreground, make_pair_batch, pseudo_labels, relabel,
                                    subject_from_image, subject_from_labels, synth_pair)
from dinoreg.pretrain.train import PretrainConfig, pretrain
from dinoreg.spatial.grid import sample

torch.set_num_threads(1)

PAIRS = PretrainConfig(
    model=ViT3DConfig(embed_dim=32, depth=2, num_heads=2, window=16),
    augment=AugmentConfig(global_size=16, local_size=8, n_local=2),
    steps=40, batch_size=2, lr=1e-3, warmup_steps=5, teacher_temp=(0.04, 0.04), mask_prob=0.5,
    out_dim=64, patch_out_dim=64, head_hidden=64, head_bottleneck=32, checkpoint_every=100, dense_tokens=64)


def _phantom(shape=(40, 44, 36), seed=0) -> torch.Tensor:
    """A smooth random image in [0, 1] with a zero background margin: anatomy-like blobs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand((1, 1, 6, 6, 5), generator=g), size=shape, mode="trilinear",
                                        align_corners=True)[0, 0]
    x[:3], x[-3:], x[:, :3], x[:, -3:] = 0, 0, 0, 0
    return x


def test_relabel_and_pseudo_labels():
    assert relabel(torch.tensor([[[0, 5, 5, 9]]])).tolist() == [[[0, 1, 1, 2]]]
    assert relabel(torch.tensor([[[3, 7]]])).tolist() == [[[1, 2]]]  # 0 is kept for background
    img = _phantom()
    lab = pseudo_labels(img, n_clusters=5)
    assert lab.shape == img.shape and int(lab.max()) == 5 and bool((lab[:2] == 0).all())
    means = [float(img[lab == k].mean()) for k in range(1, 6)]
    assert means == sorted(means)  # classes follow intensity


def test_pair_correspondence_is_exact_without_rendering_changes():
    """With real intensities and no intensity change, A read at corr equals B (up to each view's
    own min-max scaling, hence a correlation)."""
    subject = subject_from_image(_phantom((48, 48, 48)))
    plain = SynthConfig(real_prob=1, lut_prob=0, blur=(0, 0), lowres_prob=0, bias=0, gamma=(1, 1), noise_std=0,
                        disp_max=1.5, pair_shift=3)
    aug = AugmentConfig(global_size=16, n_local=0, global_scale=(1.0, 1.0), foreground_prob=1.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        p = synth_pair(subject, label_foreground(subject, 2), gen, aug, plain)
        a, b = p["a"][0], p["b"][0]
        inside = ((p["corr"] >= 0) & (p["corr"] <= 15)).all(0)
        warped = sample(p["a"][None], p["corr"][None])[0, 0]
        pearson = lambda x, y: float(torch.corrcoef(torch.stack([x[inside], y[inside]]))[0, 1])  # noqa: E731
        assert pearson(warped, b) > 0.98 and pearson(warped, b) > pearson(a, b)


def test_pair_batch_is_seeded_and_contrasts_differ():
    subjects = [subject_from_image(_phantom()), subject_from_labels((_phantom(seed=1) * 6).long())]
    fgs = [label_foreground(s, 2) for s in subjects]
    aug = AugmentConfig(global_size=16, local_size=8, n_local=2)
    a = make_pair_batch(subjects, fgs, torch.ones(2), 3, torch.Generator().manual_seed(5), aug, SynthConfig())
    b = make_pair_batch(subjects, fgs, torch.ones(2), 3, torch.Generator().manual_seed(5), aug, SynthConfig())
    assert a["globals"].shape == (6, 1, 16, 16, 16) and a["locals"].shape == (6, 1, 8, 8, 8)
    assert a["corr"].shape == (3, 3, 16, 16, 16) and a["fg_b"].shape == (3, 16, 16, 16)
    for key in ("globals", "locals", "corr", "fg_b"):
        assert torch.equal(a[key], b[key])
    assert not torch.allclose(a["globals"][0], a["globals"][3], atol=0.05)


def test_token_correspondence_identity():
    g, p = 16, 4
    corr = torch.stack(torch.meshgrid(*[torch.arange(g, dtype=torch.float32)] * 3, indexing="ij"))[None]
    tok, valid = token_correspondence(corr, torch.ones(1, g, g, g, dtype=torch.bool), p)
    grid = torch.stack(torch.meshgrid(*[torch.arange(g // p, dtype=torch.float32)] * 3, indexing="ij"))[None]
    assert torch.allclose(tok, grid) and bool(valid.all())
    _, valid = token_correspondence(corr + 20, torch.ones(1, g, g, g, dtype=torch.bool), p)
    assert not bool(valid.any())


def test_dense_info_nce_rewards_matching_features():
    """Features that encode position match their correspondences (acc 1, low loss); random ones don't."""
    n = 6
    coords = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32)] * 3, indexing="ij"))
    freqs = torch.arange(1, 9, dtype=torch.float32).view(-1, 1, 1, 1, 1) * 0.7
    pos = torch.cat([torch.sin(freqs * coords), torch.cos(freqs * coords)]).reshape(-1, n, n, n)[None]
    shift = torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1, 1)
    corr = (coords[None] + shift)
    valid = ((corr >= 0) & (corr <= n - 1)).all(1)
    fb = torch.cat([torch.sin(freqs * (coords + shift[0])), torch.cos(freqs * (coords + shift[0]))]).reshape(-1, n, n, n)[None]
    gen = torch.Generator().manual_seed(0)
    good, stats = dense_info_nce(pos, fb, corr, valid, gen, temperature=0.05)
    assert stats["dense_acc"] > 0.95
    rand = torch.randn(1, pos.shape[1], n, n, n, requires_grad=True)
    bad, stats_bad = dense_info_nce(rand, torch.randn_like(rand), corr, valid, gen, temperature=0.05)
    assert float(good.detach()) < 0.5 * float(bad.detach()) and stats_bad["dense_acc"] < 0.3
    bad.backward()
    assert rand.grad is not None and float(rand.grad.abs().sum()) > 0
    none, _ = dense_info_nce(pos, fb, corr, torch.zeros_like(valid), gen)
    assert float(none) == 0.0


def test_koleo_penalises_collapse_and_sinkhorn_balances():
    spread = torch.eye(8)
    collapsed = torch.ones(8, 8) + 1e-3 * torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    assert float(koleo(spread)) < float(koleo(collapsed))
    logits = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    logits[:, 0] += 5.0  # everyone prefers prototype 0
    q = sinkhorn_knopp(logits, 0.5, iterations=3)
    assert torch.allclose(q.sum(1), torch.ones(32), atol=1e-4)
    plain = torch.softmax(logits / 0.5, dim=1)
    assert float(plain[:, 0].sum()) > 25 and float(q[:, 0].sum()) < 4  # prototype 0 no longer takes all


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_paired_run_learns_logs_entropy_and_resumes_exactly(tmp_path, monkeypatch):
    volumes = [_phantom(), _phantom((36, 40, 44), seed=2)]
    labels = [(_phantom((40, 40, 40), seed=3) * 7).long()]
    pretrain(volumes, PAIRS, tmp_path / "long", resume=False, progress=False, label_maps=labels)
    rows = _log(tmp_path / "long")
    assert np.isfinite([r["loss"] for r in rows]).all()
    assert all(0 < r["cls_entropy"] <= np.log(PAIRS.out_dim) + 1e-3 for r in rows)
    assert any("patch_entropy" in r for r in rows)

    cfg = replace(PAIRS, steps=6, checkpoint_every=3)
    pretrain(volumes, cfg, tmp_path / "straight", resume=False, progress=False, label_maps=labels)
    real_step = train_mod.train_step

    def interrupted(state, *args, **kwargs):
        if state.step == 4:
            raise KeyboardInterrupt
        return real_step(state, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain(volumes, cfg, tmp_path / "resumed", resume=True, progress=False, label_maps=labels, snapshots=True)
    monkeypatch.setattr(train_mod, "train_step", real_step)
    pretrain(volumes, cfg, tmp_path / "resumed", resume=True, progress=False, label_maps=labels, snapshots=True)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    for key in ("student", "teacher"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(_log(tmp_path / "straight")) == drop(_log(tmp_path / "resumed"))
    assert sorted(p.name for p in (tmp_path / "resumed" / "snapshots").iterdir()) == [
        "dino3d_step000003.safetensors", "dino3d_step000006.safetensors"]
    from dinoreg.errors import DinoregError
    with pytest.raises(DinoregError, match="other volumes"):
        pretrain(volumes, cfg, tmp_path / "resumed", resume=True, progress=False)  # label maps missing


def test_dense_only_learns_and_skips_the_teacher(tmp_path):
    cfg = replace(PAIRS, steps=60, lr=3e-3, dino_weight=0.0, ibot_weight=0.0, koleo_weight=0.0)
    pretrain([_phantom(), _phantom((36, 40, 44), seed=2)], cfg, tmp_path, resume=False, progress=False)
    rows = _log(tmp_path)
    assert all(r["dino"] == 0 and r["ibot"] == 0 and "cls_entropy" not in r for r in rows)
    dense, acc = np.array([r["dense"] for r in rows]), np.array([r["dense_acc"] for r in rows])
    assert dense[-10:].mean() < 0.95 * dense[:10].mean() and acc[-10:].mean() > acc[:10].mean()
    from dinoreg.errors import DinoregError
    with pytest.raises(DinoregError, match="views='pairs'"):
        replace(PAIRS, views="multicrop")


def test_same_contrast_pairs_share_the_rendering():
    subject = subject_from_labels((_phantom((40, 40, 40), seed=4) * 6).long())
    aug = AugmentConfig(global_size=16, n_local=0, foreground_prob=1.0)
    cfg = SynthConfig(same_contrast_prob=1.0, disp_max=0.0, pair_shift=0.0, pair_rotation_deg=0.0,
                      pair_scale=(1.0, 1.0), noise_std=0.0)
    p = synth_pair(subject, label_foreground(subject, 2), torch.Generator().manual_seed(0), aug, cfg)
    assert torch.allclose(p["a"], p["b"], atol=1e-5)  # no motion + one draw: identical views
