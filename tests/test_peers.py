"""The peers benchmark's field conversions: a real brain shifted by a known translation must come
back as that translation in the Learn2Reg convention (right sign, right axis) for every peer."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from conftest import load_script

SHIFT = np.array([3.0, -2.0, 1.5])  # voxels along i, j, k: all different, one negative


def _peers():
    return load_script("benchmarks/peers.py")


@pytest.fixture(scope="module")
def shifted_pair(brain_volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fixed = a half-resolution brain crop; moving(p) = fixed(p - SHIFT), so the pull-back field is +SHIFT."""
    fixed = np.ascontiguousarray(brain_volume[::2, ::2, ::2][8:72, 8:88, 8:104])
    moving = ndimage.shift(fixed, SHIFT, order=1)
    return fixed, moving, fixed > 0.1


def test_pure_conversions_axis_order() -> None:
    peers = _peers()
    field = np.zeros((4, 5, 6, 3))
    field[..., 0], field[..., 1], field[..., 2] = 2.0, -4.0, 3.0  # mm along x, y, z
    itk_layout = field.transpose(2, 1, 0, 3)  # what itk.array_from_image returns: [k, j, i, xyz]
    out = peers.itk_array_to_l2r(itk_layout, (1.0, 2.0, 1.5))
    assert out.shape == (4, 5, 6, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, 0], [2.0, -2.0, 2.0])
    np.testing.assert_allclose(peers.ants_array_to_l2r(field, (1.0, 2.0, 1.5))[1, 2, 3], [2.0, -2.0, 2.0])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["convexadam", "elastix", "ants"])
def test_peer_recovers_known_translation(method: str, shifted_pair) -> None:
    module = {"convexadam": "convexAdam", "elastix": "itk", "ants": "ants"}[method]
    pytest.importorskip(module)
    peers = _peers()
    fixed, moving, mask = shifted_pair
    # anisotropic spacing for the physical-space tools checks the mm -> voxel division per axis;
    # convexadam works in voxels whatever the spacing
    spacing = (1.0, 1.0, 1.0) if method == "convexadam" else (1.0, 2.0, 1.5)
    kwargs = {"iterations": 64} if method == "elastix" else {}
    disp = peers.PEERS[method](fixed, moving, spacing, **kwargs)
    assert disp.shape == fixed.shape + (3,) and disp.dtype == np.float32
    np.testing.assert_allclose(np.median(disp[mask], axis=0), SHIFT, atol=0.35)
