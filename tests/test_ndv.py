"""Non-diffeomorphic volume (digital diffeomorphism, Liu et al. 2024) of voxel fields."""

from __future__ import annotations

from itertools import product

import numpy as np
import pytest

from dinoreg.errors import DinoregError
from dinoreg.metrics import evaluate_pair
from dinoreg.ndv import ndv, ndv_map


def _smooth_field(shape: tuple[int, int, int], amplitude: float) -> np.ndarray:
    i, j, k = np.meshgrid(*[np.linspace(0, np.pi, s) for s in shape], indexing="ij")
    return amplitude * np.stack([np.sin(j) * np.cos(k), np.sin(k) * np.sin(i), np.cos(i) * np.sin(j)], -1)


def _reference_ndv_map(disp: np.ndarray) -> np.ndarray:
    """Slow reference: explicit loops over voxels and their 10 tetrahedra given by vertices.

    Each voxel owns the 8 corner tetrahedra ``{p, p + s_i e_i, p + s_j e_j, p + s_k e_k}`` and
    the two central tetrahedra ``{p, p-e_i-e_j, p-e_i-e_k, p-e_j-e_k}`` and
    ``{p, p+e_i+e_j, p+e_j+e_k, p+e_i+e_k}``; the sign of each volume is taken relative to the
    identity's (orientation), the displacement is edge-padded outside the grid, and each
    tetrahedron counts half (two ways to split a cube into 5 tetrahedra).
    """
    shape = disp.shape[:3]

    def phi(q: tuple[int, int, int]) -> np.ndarray:
        clamped = tuple(min(max(c, 0), s - 1) for c, s in zip(q, shape))
        return np.asarray(q, dtype=np.float64) + disp[clamped].astype(np.float64)

    tets = []
    for s in product((1, -1), repeat=3):
        tets.append([(s[0], 0, 0), (0, s[1], 0), (0, 0, s[2])])
    tets.append([(-1, -1, 0), (-1, 0, -1), (0, -1, -1)])
    tets.append([(1, 1, 0), (0, 1, 1), (1, 0, 1)])
    orient = [np.sign(np.linalg.det(np.array(t, dtype=float))) for t in tets]
    out = np.zeros(shape)
    for p in product(*[range(s) for s in shape]):
        x0 = phi(p)
        for t, o in zip(tets, orient):
            edges = np.stack([phi(tuple(a + b for a, b in zip(p, off))) - x0 for off in t], 0)
            signed_volume = o * np.linalg.det(edges) / 6.0
            out[p] += 0.5 * max(-signed_volume, 0.0)
    return out


def test_identity_and_smooth_fields_have_zero_ndv():
    assert ndv(np.zeros((12, 13, 14, 3), np.float32)) == 0.0
    smooth = _smooth_field((24, 20, 22), 2.0)
    assert ndv(smooth) == 0.0
    assert ndv(np.zeros((12, 13, 1, 3), np.float32)) == 0.0  # 2D
    assert evaluate_pair(smooth.astype(np.float32))["ndv_percent"] == 0.0


def test_known_fold_is_detected():
    disp = np.zeros((10, 10, 10, 3), np.float32)
    disp[5, 5, 5, 0] = 3.0  # voxel (5, 5, 5) jumps two voxels, past (6, 5, 5) and (7, 5, 5): a fold
    value = ndv(disp)
    assert value > 0
    per_voxel = ndv_map(disp)
    assert per_voxel[5, 5, 5] > 0 and per_voxel[6, 5, 5] > 0
    assert per_voxel[0, 0, 0] == 0.0
    # the central-difference Jacobian misses a one-voxel checkerboard fold that NDV catches
    check = np.zeros((10, 10, 10, 3), np.float32)
    check[5, 5, 5] = (1.5, 0.0, 0.0)  # past its neighbour, central-difference detJ stays > 0
    assert ndv(check) > 0
    assert evaluate_pair(check)["folding_fraction"] == 0.0
    assert evaluate_pair(check)["ndv_percent"] == pytest.approx(ndv(check))


def test_matches_slow_reference_on_random_folded_field():
    rng = np.random.default_rng(0)
    disp = rng.normal(0.0, 0.7, (6, 7, 5, 3)).astype(np.float32)
    ref = _reference_ndv_map(disp)
    fast = ndv_map(disp)
    assert ref.sum() > 0
    np.testing.assert_allclose(fast, ref, rtol=1e-9, atol=1e-12)
    mask = rng.random(disp.shape[:3]) > 0.4
    assert ndv(disp, mask) == pytest.approx(100.0 * ref[mask].sum() / mask.sum(), rel=1e-9)
    assert ndv(disp) == pytest.approx(100.0 * ref.mean(), rel=1e-9)


def test_chunked_blocks_agree_with_one_block(monkeypatch):
    import dinoreg.ndv as module

    rng = np.random.default_rng(1)
    disp = rng.normal(0.0, 0.7, (11, 6, 7, 3))
    whole = module.ndv_map(disp)
    monkeypatch.setattr(module, "CHUNK", 3)
    np.testing.assert_array_equal(module.ndv_map(disp), whole)


def test_2d_fields_use_triangles():
    rng = np.random.default_rng(2)
    disp = np.zeros((9, 8, 1, 3))
    disp[..., :2] = rng.normal(0.0, 0.7, (9, 8, 1, 2))

    def phi(q):
        c = (min(max(q[0], 0), 8), min(max(q[1], 0), 7))
        return np.asarray(q, float) + disp[c[0], c[1], 0, :2]

    ref = np.zeros((9, 8))
    for p in product(range(9), range(8)):
        for si, sj in product((1, -1), repeat=2):
            a = phi((p[0] + si, p[1])) - phi(p)
            b = phi((p[0], p[1] + sj)) - phi(p)
            signed_area = si * sj * (a[0] * b[1] - a[1] * b[0]) / 2.0
            ref[p] += 0.5 * max(-signed_area, 0.0)
    np.testing.assert_allclose(ndv_map(disp)[..., 0], ref, rtol=1e-9, atol=1e-12)
    assert ndv(disp) == pytest.approx(100.0 * ref.mean())
    assert ndv(disp) > 0


def test_bad_input():
    with pytest.raises(DinoregError):
        ndv(np.zeros((4, 4, 4)))
    with pytest.raises(DinoregError):
        ndv(np.full((4, 4, 4, 3), np.nan))
    with pytest.raises(DinoregError):
        ndv(np.zeros((4, 4, 4, 3)), mask=np.ones((4, 4, 5)))
    assert np.isnan(ndv(np.zeros((4, 4, 4, 3)), mask=np.zeros((4, 4, 4))))
