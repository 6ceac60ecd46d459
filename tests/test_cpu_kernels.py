"""The fused numba CPU kernels against their torch twins, on real anatomy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinoreg import jit
from dinoreg.features import mind
from dinoreg.optim import convex, cpu_kernels, instance
from dinoreg.optim.convex_adam import features_on_cells, pooling_factor
from dinoreg.spatial.grid import resize_field, warp
from dinoreg.spatial.separable import apply_separable, apply_separable_adjoint, linear_resize_matrix

pytestmark = pytest.mark.skipif(not jit.available(), reason="numba is not installed")


@pytest.fixture(scope="module")
def odd_crop(brain_volume: np.ndarray) -> torch.Tensor:
    """A 37x41x29 crop through the brain: odd sizes exercise partial cells and edges."""
    return torch.from_numpy(np.ascontiguousarray(brain_volume[60:97, 70:111, 90:119]))[None, None]


@pytest.mark.parametrize("radius,dilation,pool", [(1, 2, 1), (1, 2, 2), (2, 1, 3), (0, 1, 2)])
def test_fused_mind_matches_torch(odd_crop, radius, dilation, pool):
    fused = mind.mind_ssc(odd_crop, radius, dilation, pool=pool)
    reference = mind._mind_ssc_torch(odd_crop, radius, dilation, 1e-3)
    if pool > 1:
        reference = F.avg_pool3d(reference, pool, stride=pool, ceil_mode=True)
    assert fused.shape == reference.shape
    torch.testing.assert_close(fused, reference, atol=2e-5, rtol=0)


def _pooled_features(brain_crop: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.from_numpy(brain_crop)[None, None]
    fix = mind.mind_ssc(img, pool=2)
    mov = mind.mind_ssc(torch.roll(img, (2, -1, 3), (2, 3, 4)), pool=2)
    return fix, mov


@pytest.mark.parametrize("channels", [12, 7])  # MIND's specialised kernel and the generic one
def test_fused_ssd_gradient_matches_autograd(brain_crop, channels):
    fix, mov = _pooled_features(brain_crop)
    fix, mov = fix[:, :channels], mov[:, :channels]
    field = 1.5 * torch.randn(1, 3, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    field = resize_field(field, tuple(fix.shape[2:]))  # smooth, a few cells, some leave the grid
    fused = cpu_kernels.ssd_gradient(cpu_kernels.channels_last(mov), cpu_kernels.channels_last(fix), field)
    leaf = field.clone().requires_grad_(True)
    (warp(mov, leaf) - fix).pow(2).sum().backward()
    assert float(leaf.grad.abs().max()) > 0.1
    # a cell whose coordinate lands on a knot may take the other one-sided derivative
    close = torch.isclose(fused, leaf.grad, atol=1e-4, rtol=1e-4)
    assert float(close.float().mean()) > 0.9999


def test_fused_adam_stage_matches_autograd(brain_crop):
    fix, mov = _pooled_features(brain_crop)
    # off the knots of the trilinear warp (at integer coordinates autograd takes whichever
    # one-sided derivative float rounding of grid_sample's normalised coordinates picks)
    start = resize_field(0.7 * torch.randn(1, 3, 4, 4, 4, generator=torch.Generator().manual_seed(3)),
                         tuple(fix.shape[2:])) + 0.013
    config = instance.InstanceConfig(iterations=10, lambda_weight=1.25)
    fused = instance.InstanceOptimiser(config).optimise(fix, mov, start)
    reference = instance.InstanceOptimiser(config)
    reference._fused_ssd_gradient = reference._autograd_gradient  # the torch path, as on GPU
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(instance, "fused_cpu", lambda tensor: False)
        slow = reference.optimise(fix, mov, start)
    def loss(field):
        return float((warp(mov, field) - fix).pow(2).sum())

    assert loss(fused) < 0.6 * loss(start)  # it registers
    # Adam normalises each parameter's gradient, so where the landscape is flat float rounding
    # steers the two paths apart a little; on average they agree and reach the same loss
    assert float((fused - slow).abs().mean()) < 0.01
    assert abs(loss(fused) - loss(slow)) < 1e-3 * loss(slow)


def test_fused_cost_volume_and_coupling_match_torch(brain_crop):
    fix, mov = _pooled_features(brain_crop)
    fix, mov = F.avg_pool3d(fix, 3, stride=3, ceil_mode=True), F.avg_pool3d(mov, 3, stride=3, ceil_mode=True)
    fused = convex.ssd_cost_volume(fix, mov, 3)
    reference = convex._ssd_cost_volume_torch(fix, mov, 3)
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-5)
    shape = tuple(fix.shape[2:])
    field = convex.coupled_convex(reference, shape, 3)
    candidates = convex.displacement_candidates(3)
    flat = field.reshape(3, -1).t().contiguous()
    penalty = 0.3 * candidates.pow(2).sum(0)
    choice = convex._coupled_argmin(reference, flat, candidates, penalty, 0.3)
    expected = torch.addmm(reference + penalty, flat, candidates, alpha=-0.6).argmin(1)
    assert float((choice == expected).float().mean()) > 0.999
    assert float(field.abs().max()) > 0.5  # the shift is found, not a zero field


def test_parameter_map_matches_filters_and_its_adjoint():
    gen = torch.Generator().manual_seed(1)
    coarse, fine = (5, 7, 6), (9, 13, 12)
    params = torch.randn(1, 3, *coarse, generator=gen)
    pmap = instance.ParameterMap(coarse, fine, torch.device("cpu"))
    expected = resize_field(instance.smooth_field(params), fine)
    torch.testing.assert_close(pmap.field(params), expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn(1, 3, *fine, generator=gen)
    lhs = (pmap.field(params) * grad).sum()
    rhs = (params * pmap.smooth_adjoint(pmap.expand_adjoint(grad))).sum()
    torch.testing.assert_close(lhs, rhs, atol=1e-3, rtol=1e-4)


def test_resize_matrix_is_interpolate():
    x = torch.randn(2, 4, 5, 3)
    mats = [linear_resize_matrix(n, m) for n, m in zip((7, 11, 3), (4, 5, 3))]
    expected = F.interpolate(x[None], size=(7, 11, 3), mode="trilinear", align_corners=False)[0]
    torch.testing.assert_close(apply_separable(x, mats), expected, atol=1e-6, rtol=1e-6)
    y = torch.randn(2, 7, 11, 3)
    torch.testing.assert_close((apply_separable(x, mats) * y).sum(), (x * apply_separable_adjoint(y, mats)).sum(),
                               atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shape,dtype", [((10,), torch.float32), ((1, 3, 4, 5, 6), torch.float32),
                                         ((1, 3, 4, 5, 6), torch.float64)])
def test_adam_matches_torch_optim(shape, dtype):
    """The fused CPU step (float32) and the torch ops (other dtypes, GPU) against torch.optim.Adam."""
    gen = torch.Generator().manual_seed(2)
    ours = torch.randn(shape, generator=gen, dtype=dtype)
    theirs = ours.clone().requires_grad_(True)
    mine = instance.Adam(ours, lr=0.5, eps=1e-4)
    reference = torch.optim.Adam([theirs], lr=0.5, eps=1e-4)
    for _ in range(5):
        grad = torch.randn(shape, generator=gen, dtype=dtype)
        mine.step(grad.transpose(0, -1).contiguous().transpose(0, -1))  # a non-contiguous gradient too
        theirs.grad = grad.clone()
        reference.step()
    torch.testing.assert_close(ours, theirs.detach(), atol=1e-6, rtol=1e-6)


def test_pooled_features_on_cells_equal_full_resolution(brain_crop):
    img = torch.from_numpy(brain_crop)[None, None]
    full = mind.mind_ssc(img)
    pooled = mind.mind_ssc(img, pool=2)
    assert pooling_factor(tuple(pooled.shape[2:]), brain_crop.shape) == 2
    assert pooling_factor((40, 40, 40), brain_crop.shape) is None
    for cell in (2, 6):
        torch.testing.assert_close(features_on_cells(pooled, brain_crop.shape, cell),
                                   features_on_cells(full, brain_crop.shape, cell), atol=2e-5, rtol=0)


def test_fused_diffusion_gradient_matches_torch():
    field = torch.randn(1, 3, 7, 9, 11, generator=torch.Generator().manual_seed(4))
    base = torch.randn(1, 3, 7, 9, 11, generator=torch.Generator().manual_seed(5))
    fused = cpu_kernels.add_diffusion_gradient(field, 3.5, base.clone())
    torch.testing.assert_close(fused, base + instance.diffusion_gradient(field, 3.5), atol=1e-5, rtol=1e-5)


def test_mind_pool_gives_the_full_resolution_registration(brain_crop):
    """``mind_pool=2`` (the mind preset) registers like MIND on the image grid, in 1/8 of the memory."""
    import dinoreg

    moving = np.ascontiguousarray(np.roll(brain_crop, (2, -3, 1), (0, 1, 2)))
    pooled = dinoreg.register(brain_crop, moving, progress=False, device="cpu", iterations=20)
    full = dinoreg.register(brain_crop, moving, progress=False, device="cpu", iterations=20, mind_pool=1)
    assert pooled.settings["encoders"][0]["mind_pool"] == 2
    inner = (slice(8, -8),) * 3
    assert float(np.abs(pooled.disp[inner]).mean()) > 1.0  # it found the shift
    assert float(np.abs(pooled.disp[inner] - full.disp[inner]).mean()) < 0.05


@pytest.mark.parametrize("kernel_size", [3, 9])
def test_box_smooth_matches_the_torch_mean_filter(kernel_size):
    """``final_smooth``'s fused path (running sums, borders clamped) against three passes of
    ``avg_pool3d`` over a replicate-padded field, on odd sizes smaller and larger than the kernel."""
    from dinoreg.optim.convex_adam import final_smooth

    field = torch.from_numpy(np.random.default_rng(3).normal(size=(1, 3, 7, 12, 23)).astype(np.float32))
    reference = field
    for _ in range(3):
        reference = F.avg_pool3d(F.pad(reference, [kernel_size // 2] * 6, mode="replicate"), kernel_size, stride=1)
    original = field.clone()
    fused = cpu_kernels.box_smooth(field, kernel_size, 3)
    torch.testing.assert_close(fused, reference, atol=2e-6, rtol=0)
    assert torch.equal(field, original)  # the input is left as it was
    torch.testing.assert_close(final_smooth(field, kernel_size), reference, atol=2e-6, rtol=0)


@pytest.mark.skipif(not jit.available(), reason="numba missing")
def test_preload_initialises_numba_once_in_the_background():
    """``register`` on CPU starts numba's set-up on a thread while it reads the images: one
    thread per process, and once joined the probe kernel is loaded (numba's CPU target is up)."""
    jit.preload()
    started = jit._preloading
    jit.preload()
    assert started is not None and jit._preloading is started
    jit.wait_for_preload()
    assert not started.is_alive() and jit._probe.signatures
