"""B-spline FFD registration with an encoder inside the loss."""

from pathlib import Path

import pytest
import torch
from torch import nn

from dinoreg.errors import DinoregError
from dinoreg.losses import ncc
from dinoreg.optim.ffd import FFDRegistration, pyramid_level
from dinoreg.spatial.bspline import bspline_field, control_shape
from dinoreg.spatial.grid import warp

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SLICE_FILE = SHARED / "data" / "voxelmorph_brain_t1" / "test_scan_vol.nii.gz"


class TinyConvEncoder(nn.Module):
    """A minimal Encoder2D stand-in: grey -> 3 channels -> one 3x3 conv (stride 2) + tanh.
    Counts the slices it encodes."""

    name, patch_size, embed_dim = "tinyconv", 2, 8

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.slices_seen = 0

    def preprocess(self, grey):
        return grey.expand(-1, 3, -1, -1)

    def forward(self, x):
        self.slices_seen += x.shape[0]
        return torch.tanh(4 * self.conv(x)), None


def _brain_slice() -> torch.Tensor:
    if not SLICE_FILE.is_file():
        pytest.skip("shared brain data not available")
    import nibabel as nib
    import numpy as np

    vol = np.asarray(nib.load(str(SLICE_FILE)).dataobj, dtype=np.float32)
    s = vol[:, :, vol.shape[2] // 2]
    return torch.from_numpy(np.clip(s / np.percentile(s, 99), 0, 1))[None, None]


def _known_warp(fixed: torch.Tensor, spacing: int = 32, amplitude: float = 3.0):
    """Moving image ``M(p) = F(p + v(p))`` with a smooth B-spline ``v``, and the exact answer
    ``u`` with ``M(p + u(p)) = F(p)`` (fixed-point inverse of ``v``)."""
    shape = tuple(fixed.shape[2:])
    g = torch.Generator().manual_seed(0)
    v = bspline_field(torch.randn(1, 2, *control_shape(shape, spacing), generator=g) * amplitude,
                      shape, spacing)
    moving = warp(fixed, v)
    u = -v.clone()
    for _ in range(30):
        u = -warp(v, u)
    return moving, u


def test_invalid_settings_are_rejected():
    enc = TinyConvEncoder()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(DinoregError, match="alpha"):
            FFDRegistration(enc, alpha=bad)
    with pytest.raises(DinoregError, match="feature distance"):
        FFDRegistration(enc, alpha=0.5, feature_distance="l2")
    with pytest.raises(DinoregError, match="image distance"):
        FFDRegistration(enc, image_distance="mi")
    with pytest.raises(DinoregError, match="encoder"):
        FFDRegistration(None, alpha=0.3)
    with pytest.raises(DinoregError):
        FFDRegistration(levels=(2, 1), iterations=(10,))
    with pytest.raises(DinoregError, match="shape"):
        FFDRegistration().register(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 9))


def test_zero_iterations_reproduce_control_points_and_init():
    reg = FFDRegistration(iterations=0, grid_spacing=4)
    fixed = torch.rand(1, 1, 21, 18)
    init = torch.randn(1, 2, 21, 18)
    out = reg.register(fixed, fixed, init=init)
    assert torch.equal(out, init)
    with torch.no_grad():
        reg.control[0, 1, 3, 2] = 1.0          # control (3, 2) sits at voxel (8, 4)
    field = reg.field((21, 18))
    assert torch.isclose(field[0, 1, 8, 4], torch.tensor((2 / 3) ** 2))
    assert torch.isclose(field[0, 1, 12, 4], torch.tensor(2 / 3 / 6))


def test_gradient_reaches_control_points_through_the_encoder():
    fixed = torch.rand(1, 1, 24, 20)
    moving = torch.roll(fixed, 2, dims=2)
    enc = TinyConvEncoder()
    reg = FFDRegistration(enc, alpha=1.0, iterations=0, grid_spacing=6)
    reg.register(fixed, moving)
    reg.step(0, 0, (24, 20), fixed, moving)
    grad = reg.control.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert reg.history[-1]["feature"] > 0 and enc.slices_seen == 2      # fixed once + warped once
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())
    # alpha = 1 with zero regularisation: the gradient is the feature term's alone, so it
    # vanishes when the encoder ignores its input
    const = TinyConvEncoder()
    nn.init.zeros_(const.conv.weight)
    reg = FFDRegistration(const, alpha=1.0, iterations=0, grid_spacing=6, reg_weight=0.0)
    reg.register(fixed, moving)
    reg.step(0, 0, (24, 20), fixed, moving)
    assert reg.control.grad.abs().max() == 0


def test_gradient_flows_through_litemedsam_architecture():
    from dinoreg.features.tinyvit import LiteMedSAMEncoder

    torch.manual_seed(0)
    enc = LiteMedSAMEncoder(input_size=64)          # random weights: checks the graph, not quality
    fixed = torch.rand(1, 1, 40, 36)
    reg = FFDRegistration(enc, alpha=0.5, feature_distance="l1", iterations=1, grid_spacing=8)
    reg.register(fixed, torch.roll(fixed, 3, dims=3))
    assert torch.isfinite(reg.control).all() and reg.control.abs().sum() > 0
    assert reg.history[0]["feature"] > 0


def test_3d_slicewise_encoding_cost_and_gradient():
    enc = TinyConvEncoder()
    fixed = torch.rand(1, 1, 12, 10, 9)
    moving = torch.roll(fixed, 1, dims=3)
    reg = FFDRegistration(enc, alpha=0.5, iterations=3, grid_spacing=4, slice_axis=-1,
                          slice_stride=3, slice_batch=2)
    out = reg.register(fixed, moving)
    assert out.shape == (1, 3, 12, 10, 9) and torch.isfinite(out).all()
    # 3 iterations x ceil(9 / 3) = 3 warped slices, plus the 9 fixed slices encoded once
    assert enc.slices_seen == 3 * 3 + 9
    enc.slices_seen = 0
    FFDRegistration(enc, alpha=0.5, iterations=1, grid_spacing=4, slice_axis=0).register(fixed, moving)
    assert enc.slices_seen == 12 + 12


def test_pyramid_level_is_corner_aligned():
    ramp = torch.arange(17.0).view(1, 1, 17, 1).expand(1, 1, 17, 9).contiguous()
    half = pyramid_level(ramp, (9, 5))
    # level voxel x samples full voxel 2x; the smoothing only bends the ramp at the borders
    assert torch.allclose(half[0, 0, 2:-2, 2], torch.arange(4, 13.0, 2), atol=1e-4)
    assert torch.allclose(half[0, 0, :, 2], torch.arange(0, 17.0, 2), atol=0.4)


def test_2d_registration_of_a_known_smooth_warp_on_a_real_slice():
    fixed = _brain_slice()
    moving, truth = _known_warp(fixed)
    brain = (fixed > 0.05)[:, 0]
    epe_before = truth.norm(dim=1)[brain].mean()
    reg = FFDRegistration(grid_spacing=8, iterations=(40, 60), levels=(2, 1), lr=0.1)
    disp = reg.register(fixed, moving)
    assert disp.shape == (1, 2, *fixed.shape[2:])
    epe_after = (disp - truth).norm(dim=1)[brain].mean()
    assert ncc(fixed, warp(moving, disp)) < ncc(fixed, moving) - 0.02
    assert epe_after < 0.35 * epe_before          # measured ~2.07 -> ~0.3 voxels
    assert reg.history[-1]["total"] < reg.history[0]["total"]


def test_2d_registration_with_features_in_the_loss():
    fixed = _brain_slice()
    moving, truth = _known_warp(fixed)
    brain = (fixed > 0.05)[:, 0]
    reg = FFDRegistration(TinyConvEncoder(), alpha=0.5, feature_distance="cos", grid_spacing=8,
                          iterations=60, lr=0.1)
    disp = reg.register(fixed, moving, mask=(fixed > 0.05))
    assert (disp - truth).norm(dim=1)[brain].mean() < 0.5 * truth.norm(dim=1)[brain].mean()


def test_feature_layer_compares_an_intermediate_block_of_dinov2():
    from dinoreg.features.dinov2 import DINOv2, arch_config

    torch.manual_seed(0)
    net = DINOv2(arch_config("vits14")).eval()           # random weights: checks the plumbing
    x = net.preprocess(torch.rand(1, 1, 28, 42))
    last, _ = net.forward(x)
    assert torch.equal(net.forward(x, layer=len(net.blocks))[0], last)
    mid, _ = net.forward(x, layer=3)
    tokens = net.patch_embed(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([net.cls_token, tokens], 1) + net.position_embedding(2, 3)
    for block in net.blocks[:3]:
        tokens = block(tokens)
    expected = net.norm(tokens)[:, 1:].transpose(1, 2).reshape(1, -1, 2, 3)
    assert torch.allclose(mid, expected, atol=1e-5) and not torch.allclose(mid, last)
    with pytest.raises(DinoregError, match="layer"):
        net.forward(x, layer=len(net.blocks) + 1)
    reg = FFDRegistration(net, alpha=0.3, feature_layer=3, iterations=1, grid_spacing=8)
    reg.register(torch.rand(1, 1, 28, 28), torch.rand(1, 1, 28, 28))
    assert reg.history[0]["feature"] > 0 and torch.isfinite(reg.control).all()
    with pytest.raises(DinoregError, match="feature_layer"):
        FFDRegistration(TinyConvEncoder(), alpha=0.3, feature_layer=3)   # no layer= in its forward
    FFDRegistration(TinyConvEncoder(), alpha=0.3, feature_layer=0)
