"""The DINO-Reg authors' instance optimisation (Adam alone, field smoothed in every iteration) and
the fixed patch grid of their slicewise encoding."""

from __future__ import annotations

import numpy as np
import torch

from conftest import needs_data
from dinoreg.api import register
from dinoreg.features.slicewise import encode_volume
from dinoreg.optim.smoothed_adam import box_smooth
from dinoreg.presets import PRESETS

pytestmark = needs_data


def test_box_smooth_keeps_constants_and_damps_noise():
    const = torch.full((1, 3, 9, 10, 11), 2.5)
    torch.testing.assert_close(box_smooth(const, 7, 5), const)
    noise = torch.randn(1, 3, 20, 20, 20, generator=torch.Generator().manual_seed(0))
    assert float(box_smooth(noise, 7, 5).std()) < 0.1 * float(noise.std())


def test_adam_alone_recovers_a_known_translation(brain_volume):
    # fixed(p) = V(p + a), moving(p) = V(p + b): the pull-back field is u = a - b
    a, shift = np.array([60, 76, 92]), np.array([2, -2, 1])
    fixed = np.ascontiguousarray(brain_volume[a[0]:a[0] + 40, a[1]:a[1] + 40, a[2]:a[2] + 40])
    b = a - shift
    moving = np.ascontiguousarray(brain_volume[b[0]:b[0] + 40, b[1]:b[1] + 40, b[2]:b[2] + 40])
    result = register(fixed, moving, method="adam", features="mind", iterations=40, lr=0.5, progress=False,
                      device="cpu")
    inside = fixed > 0.1
    error = np.linalg.norm(result.disp - shift.astype(np.float32), axis=-1)[inside].mean()
    assert error < 0.7, error
    assert result.settings["method"]["name"] == "adam"


def test_paper_preset_is_the_published_pipeline():
    spec = PRESETS["dinoreg-paper"].spec
    method, (encoder,) = spec.method, spec.encoders
    assert (method.name, method.grid_sp_adam, method.iterations, method.lr, method.lambda_weight) == \
        ("adam", 1, 1000, 3.0, 2.0)
    assert (method.smooth_kernel, method.smooth_passes) == (7, 5)
    assert (encoder.arch, encoder.patch_grid, encoder.every, encoder.pca_components) == \
        ("vitl14_reg4", (112, 96), 3, 24)


class _Grid(torch.nn.Module):
    name, patch_size, embed_dim = "grid", 14, 1

    def preprocess(self, grey):
        return grey

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x, 14), None


def test_fixed_patch_grid_ignores_the_slice_size():
    volume = np.random.default_rng(0).random((30, 40, 5)).astype(np.float32)
    feats = encode_volume(volume, _Grid(), axis=2, grid=(12, 8), every=2)
    assert tuple(feats.features.shape) == (1, 12, 8, 5)


def test_paper_preset_names_the_missing_vit_l_weights(tmp_path, capsys, monkeypatch):
    from conftest import DATA
    from dinoreg.cli import main
    from dinoreg.features import dinov2

    monkeypatch.setenv("DINOREG_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    dinov2.cached_model.cache_clear()
    image = DATA / "totalsegmentator_examples" / "example_ct_sm.nii.gz"
    code = main(["register", str(image), str(image), "-o", str(tmp_path / "o"), "--preset", "dinoreg-paper",
                 "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "dinov2_vitl14_reg4_pretrain.pth" in err[0]
    assert not (tmp_path / "o").exists()
