"""ConvexAdam recovers known motions of a real brain volume (MIND-SSC features)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from conftest import needs_data
from dinoreg.api import register
from dinoreg.optim.convex import coupled_convex, displacement_candidates, ssd_cost_volume
from dinoreg.spatial.grid import field_from_numpy, warp

pytestmark = needs_data


def _crop(volume: np.ndarray, offset: tuple[int, int, int], size: int = 96) -> np.ndarray:
    i, j, k = offset
    return np.ascontiguousarray(volume[i:i + size, j:j + size, k:k + size])


def _epe_inside(disp: np.ndarray, truth: np.ndarray, image: np.ndarray) -> float:
    mask = image > 0.1
    return float(np.linalg.norm(disp - truth, axis=-1)[mask].mean())


def test_identity_pair_gives_near_zero_field(brain_crop):
    """The convex stage returns exactly zero; Adam (lr 1 cell, scale invariant) wobbles around
    zero by a fraction of a voxel before settling, as the reference ConvexAdam does."""
    result = register(brain_crop, brain_crop, progress=False)
    assert float(np.abs(result.disp).mean()) < 0.15
    assert float(np.abs(result.disp).max()) < 1.0
    convex_only = register(brain_crop, brain_crop, progress=False, iterations=0, mi_iterations=0)
    assert float(np.abs(convex_only.disp).max()) == 0.0


def test_known_translation_is_recovered(brain_volume):
    # fixed(p) = V(p + a), moving(p) = V(p + b): the pull-back field is u = a - b
    a, shift = np.array([32, 48, 64]), np.array([3, -2, 4])
    fixed = _crop(brain_volume, tuple(a))
    moving = _crop(brain_volume, tuple(a - shift))
    result = register(fixed, moving, progress=False)
    truth = np.broadcast_to(shift.astype(np.float32), result.disp.shape)
    assert _epe_inside(result.disp, truth, fixed) < 1.0


def test_known_smooth_field_is_recovered(brain_crop):
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((3, *brain_crop.shape))
    field = np.stack([gaussian_filter(c, 10) for c in noise], -1)
    field *= 3.0 / np.abs(field).max()  # up to 3 voxels
    field = field.astype(np.float32)
    # fixed(p) = V(p + v(p)) with V the moving image: the true pull-back field is v
    fixed = warp(torch.from_numpy(brain_crop)[None, None], field_from_numpy(field))[0, 0].numpy()
    result = register(fixed, brain_crop, progress=False)
    before = _epe_inside(np.zeros_like(field), field, fixed)
    after = _epe_inside(result.disp, field, fixed)
    assert after < 1.0 and after < 0.5 * before


def test_same_seed_same_field(brain_crop):
    moving = np.roll(brain_crop, 2, axis=0)
    a = register(brain_crop, moving, progress=False, seed=3, iterations=10).disp
    b = register(brain_crop, moving, progress=False, seed=3, iterations=10).disp
    np.testing.assert_array_equal(a, b)


def test_convex_stage_finds_integer_shift():
    feat = torch.rand(1, 4, 12, 13, 14)
    moving = torch.roll(feat, shifts=(1, -2, 2), dims=(2, 3, 4))
    cost = ssd_cost_volume(feat, moving, 3)
    assert cost.shape == (12 * 13 * 14, 7 ** 3)
    field = coupled_convex(cost, (12, 13, 14), 3)
    torch.testing.assert_close(field[0, :, 4:8, 4:8, 4:8].mean((1, 2, 3)), torch.tensor([1.0, -2.0, 2.0]))
    assert displacement_candidates(1).shape == (3, 27)


def _smooth_field(shape: tuple[int, ...], peak: float, sigma: float, seed: int) -> np.ndarray:
    """``(*shape, 3)`` float32 smooth random field, largest component ``peak`` voxels."""
    noise = np.random.default_rng(seed).standard_normal((3, *shape))
    field = np.stack([gaussian_filter(c, sigma) for c in noise], -1)
    return (field * (peak / np.abs(field).max())).astype(np.float32)


def test_spec_cell_sizes_include_the_final_level():
    from dinoreg.methods.convex_adam import ConvexAdamSpec

    assert ConvexAdamSpec().cell_sizes() == (6, 2)
    assert ConvexAdamSpec(fine_iterations=5, fine_grid_sp=1).cell_sizes() == (6, 2, 1)


def test_reencoded_final_level_undoes_the_shrinkage(brain_crop):
    """MIND-SSC of a strongly warped image is not the warped MIND: the first Adam level recovers
    too small a field; the final level on the re-encoded warped moving image brings the
    magnitude back and lowers the end-point error (both without the MI level, which runs on this
    same-contrast pair by default and would sharpen both)."""
    field = _smooth_field(brain_crop.shape, 6.0, 8.0, seed=1)
    fixed = warp(torch.from_numpy(brain_crop)[None, None], field_from_numpy(field))[0, 0].numpy()
    mask = fixed > 0.1
    scores = {}
    for name, extra in (("default", {}), ("reencoded", dict(fine_iterations=30, fine_reencode=True))):
        disp = register(fixed, brain_crop, progress=False, mi_iterations=0, **extra).disp
        ratio = np.linalg.norm(disp, axis=-1)[mask].mean() / np.linalg.norm(field, axis=-1)[mask].mean()
        scores[name] = (_epe_inside(disp, field, fixed), float(ratio))
    assert abs(scores["reencoded"][1] - 1.0) < abs(scores["default"][1] - 1.0), scores
    assert scores["reencoded"][0] < scores["default"][0], scores


@pytest.mark.parametrize("extra", [dict(fine_iterations=5, fine_grid_sp=1),
                                   dict(fine_iterations=5, fine_reencode=True)])
def test_final_level_on_a_2d_pair(brain_crop, extra):
    """A 2D pair (one slice) goes through either final level: in-plane field, nothing along the flat axis."""
    fixed = np.ascontiguousarray(brain_crop[:, :, 48:49])
    moving = np.roll(fixed, 2, axis=0)
    disp = register(fixed, moving, progress=False, **extra).disp
    assert disp.shape == (*fixed.shape, 3) and np.isfinite(disp).all()
    assert float(np.abs(disp[..., 2]).max()) == 0.0
    assert float(np.abs(disp[..., 0]).mean()) > 0.5  # the 2-voxel shift is (partly) found


def test_fine_reencode_needs_one_encoder():
    from dinoreg.errors import DinoregError
    from dinoreg.methods.convex_adam import ConvexAdamSpec, convex_adam_stages
    from dinoreg.features.mind import MindSpec

    with pytest.raises(DinoregError, match="one encoder"):
        convex_adam_stages(ConvexAdamSpec(fine_iterations=5, fine_reencode=True), (MindSpec(), MindSpec()))
    assert [s.name for s in convex_adam_stages(ConvexAdamSpec(fine_iterations=5, fine_reencode=True),
                                               (MindSpec(),))] == ["convex", "adam", "adam_reencoded", "mi"]


def test_reencoding_a_joint_encoder_encodes_the_fixed_image_with_the_new_moving_one(monkeypatch):
    """A joint encoder (a PCA fitted on both images) must see the fixed image and the warped
    moving image together, and both sides of the final level come from that one encoding; a
    per-image encoder (MIND) encodes the warped moving image alone."""
    from dataclasses import dataclass

    from dinoreg.features import registry
    from dinoreg.features.base import EncoderSpec, PairFeatures
    from dinoreg.features.mind import MindSpec
    from dinoreg.methods.convex_adam import ConvexAdamSpec, moving_encoder
    from dinoreg.pair import RegistrationPair

    @dataclass(frozen=True)
    class JointSpec(EncoderSpec):
        name = "joint_probe"

    seen = []

    def joint(req):  # features centred on the mean of *both* images: a basis fitted on the pair
        seen.append((req.fixed, req.moving))
        centre = 0.5 * (req.fixed.mean() + req.moving.mean())
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a - centre, np.float32))[None, None]  # noqa: E731
        return PairFeatures(as_t(req.fixed), as_t(req.moving))

    registry.discover()
    monkeypatch.setitem(registry._ENTRIES, "joint_probe",
                        registry.EncoderEntry("joint_probe", JointSpec, "test", joint))
    rng = np.random.default_rng(0)
    fixed, moving = (rng.random((12, 13, 14)).astype(np.float32) for _ in range(2))
    mask = np.ones(fixed.shape, bool)
    pair = RegistrationPair(fixed, moving, mask, mask, None, np.eye(4), (1.0, 1.0, 1.0), torch.device("cpu"))
    warped = moving + 0.5
    feat_fix, feat_mov = moving_encoder(ConvexAdamSpec(), (JointSpec(),))(warped, mask, pair)
    assert seen[-1][0] is fixed and seen[-1][1] is warped
    centre = 0.5 * (fixed.mean() + warped.mean())
    np.testing.assert_allclose(feat_fix[0, 0].numpy(), fixed - centre, rtol=1e-6)
    np.testing.assert_allclose(feat_mov[0, 0].numpy(), warped - centre, rtol=1e-6)
    assert registry.encoder_entry("mind").per_image
    none, alone = moving_encoder(ConvexAdamSpec(), (MindSpec(),))(warped, mask, pair)
    assert none is None and alone.shape[1] == 12
