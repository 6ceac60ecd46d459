"""Cubic B-spline FFD: lattice layout and reproduction of known control displacements."""

import pytest
import torch

from dinoreg.errors import DinoregError
from dinoreg.spatial.bspline import (bspline_field, control_shape, cubic_bspline,
                                     spacing_from_mm)


def test_kernel_values_and_partition_of_unity():
    t = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5])
    assert torch.allclose(cubic_bspline(t), torch.tensor([2 / 3, 1 / 6, 1 / 6, 0.0, 23 / 48]))
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    total = sum(cubic_bspline(u - k) for k in (-1, 0, 1, 2))
    assert torch.allclose(total, torch.ones_like(u))


def test_control_shape_covers_image():
    assert control_shape((33, 40), 8) == (8, 8)       # floor(32/8)+4, floor(39/8)+4
    assert control_shape((10, 10, 10), (2.5, 3, 9)) == (7, 7, 5)
    with pytest.raises(DinoregError):
        control_shape((10, 10), 0)
    assert spacing_from_mm(6.0, (1.5, 2.0, 3.0)) == (4.0, 3.0, 2.0)


def test_single_control_point_gives_kernel_values():
    shape, s = (33, 41), 4
    ctrl = torch.zeros(1, 2, *control_shape(shape, s))
    ctrl[0, 0, 3, 5] = 1.0            # control (3, 5) sits at voxel ((3-1)*4, (5-1)*4) = (8, 16)
    field = bspline_field(ctrl, shape, s)
    assert field.shape == (1, 2, *shape)
    assert field[0, 1].abs().max() == 0
    f = field[0, 0]
    assert torch.isclose(f[8, 16], torch.tensor((2 / 3) ** 2))
    assert torch.isclose(f[12, 16], torch.tensor(2 / 3 / 6))
    assert torch.isclose(f[4, 20], torch.tensor(1 / 36))
    assert torch.isclose(f[10, 16], torch.tensor(23 / 48 * 2 / 3))
    assert f[16, 16] == 0 and f[8, 24] == 0          # support is +-2 spacings (exclusive)
    assert torch.isclose(f.sum(), torch.tensor(16.0))  # integral of the kernel = s per axis


def test_constant_control_gives_constant_field_2d_and_3d():
    for shape, s in (((37, 29), 5), ((17, 20, 11), (4, 3.5, 6))):
        ctrl = torch.zeros(1, len(shape), *control_shape(shape, s))
        ctrl[0, 0] = 1.5
        ctrl[0, -1] = -2.0
        field = bspline_field(ctrl, shape, s)
        assert torch.allclose(field[0, 0], torch.full(shape, 1.5), atol=1e-5)
        assert torch.allclose(field[0, -1], torch.full(shape, -2.0), atol=1e-5)


def test_linear_control_gives_linear_field():
    shape, s = (30, 26), 3
    cs = control_shape(shape, s)
    ci = (torch.arange(cs[0], dtype=torch.float32) - 1) * s      # control positions (voxels)
    ctrl = torch.zeros(1, 2, *cs)
    ctrl[0, 0] = 0.1 * ci[:, None]
    field = bspline_field(ctrl, shape, s)
    expect = 0.1 * torch.arange(shape[0], dtype=torch.float32)[:, None].expand(shape)
    assert torch.allclose(field[0, 0], expect, atol=1e-5)


def test_evaluation_on_coarser_grid_matches_full_grid():
    shape, s = (41, 33), 4
    ctrl = torch.randn(1, 2, *control_shape(shape, s))
    full = bspline_field(ctrl, shape, s)
    half = bspline_field(ctrl, shape, s, out_shape=(21, 17))
    # coarse voxel x sits at full voxel 2x; vectors are halved (voxel units of the coarse grid)
    assert torch.allclose(half, full[:, :, ::2, ::2] / 2, atol=1e-5)


def test_field_is_differentiable_and_shape_checked():
    shape, s = (20, 20), 4
    ctrl = torch.zeros(1, 2, *control_shape(shape, s), requires_grad=True)
    bspline_field(ctrl, shape, s).pow(2).add(1).sqrt().sum().backward()
    assert ctrl.grad is not None
    with pytest.raises(DinoregError):
        bspline_field(torch.zeros(1, 2, 5, 5), shape, s)
