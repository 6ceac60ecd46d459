"""Edge alignment of a fixed and a warped moving image: the squared normalised gradient field
(NGF) of Haber & Modersitzki (2006), measured on samples, to compare candidate fields.

NGF looks only at where edges are and which way they run, not at the intensities on either side,
so it holds across contrasts where a global intensity relation does not. The MI level uses it to
decide, on a pair of different contrasts, whether its field or the feature stages' one aligns the
images better (see :class:`dinoreg.optim.mutual_information.MutualInformationStage`).

For each sample voxel ``p`` of the fixed grid: ``n_F = grad F(p) / sqrt(|grad F(p)|^2 + eps_F^2)``
and the same for the warped moving image ``W(x) = M(x + u(x))``, both by central differences
(``W(p +- e_a) = M(p +- e_a + u(p +- e_a))``, trilinear, border padding; an axis of one voxel, a 2D
image's flat axis, has no gradient). The score is the mean of ``(n_F . n_W)^2`` (the square: an
edge that changes sign between contrasts still counts), in ``[0, 1]``. ``eps`` is
:data:`EPS_FRACTION` times the median gradient magnitude over the samples (of ``W`` under the
first field, shared by all fields, so that only the alignment differs between them).

Layouts: images ``(I, J, K)`` float32; fields ``(1, 3, I, J, K)`` voxels; samples C-order indices.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from dinoreg.jit import fused_cpu, kernel, prange, use_torch_threads
from dinoreg.optim.convex_adam import field_from_cells
from dinoreg.spatial.grid import flat_field, sample
from dinoreg.spatial.trilinear import cell_field_at, trilinear

EDGE_SAMPLES = 200_000  # voxels per comparison: ~30 ms a field on a brain, the same scores as all voxels to 1e-3
EPS_FRACTION = 0.1  # eps = this times the median gradient magnitude (see the README for 0.25-1)


def _trilinear(volume: torch.Tensor, points: np.ndarray) -> np.ndarray:
    """``volume`` ``(I, J, K)`` at ``points`` ``(N, 3)`` voxels: trilinear, border padding, ``(N,)``."""
    coords = torch.from_numpy(np.ascontiguousarray(points.T, np.float32)).view(1, 3, -1, 1, 1)
    with torch.no_grad():
        return sample(volume[None, None], coords)[0, 0, :, 0, 0].numpy()


def _neighbours(flat: np.ndarray, shape: tuple[int, ...], axis: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """C-order indices ``(N,)`` of ``flat``'s neighbours ``step`` voxels along ``axis``, clamped to
    the grid, and their voxel coordinates ``(N, 3)`` (int64)."""
    coords = list(np.unravel_index(flat, shape))
    coords[axis] = np.clip(coords[axis] + step, 0, shape[axis] - 1)
    return np.ravel_multi_index(tuple(coords), shape), np.stack(coords, 1)


def _normalised(gradients: np.ndarray, eps: float) -> np.ndarray:
    """``gradients`` ``(N, 3)`` divided by ``sqrt(|g|^2 + eps^2)`` (0 where the image is flat and
    ``eps`` is 0: a constant image has no edges to align)."""
    norm = np.sqrt((gradients ** 2).sum(1, keepdims=True) + eps * eps)
    return np.divide(gradients, norm, out=np.zeros_like(gradients), where=norm > 0)


@kernel
def _warped_differences(moving: np.ndarray, components: np.ndarray, increment: np.ndarray, cells: np.ndarray,
                        flat: np.ndarray, out: np.ndarray) -> None:
    """Central differences ``(N, 3)`` of ``W(x) = M(x + u(x))`` at the samples ``flat`` (C-order
    indices): ``moving`` ``(I, J, K)``; ``u`` the field ``components`` ``(3, I*J*K)`` (voxels)
    plus ``increment`` ``(3, h, w, d)`` on cells of ``cells`` voxels (cell-centred, trilinear,
    border-clamped: the MI level's increment, read where needed instead of upsampled);
    neighbours clamped to the grid, trilinear with border padding; 0 along an axis of one voxel."""
    h, w, d = moving.shape
    for s in prange(flat.shape[0]):
        index = flat[s]
        i, j, k = index // (w * d), (index // d) % w, index % d
        for axis in range(3):
            n = h if axis == 0 else (w if axis == 1 else d)
            if n == 1:
                out[s, axis] = 0.0
                continue
            total = 0.0
            for sign in (1, -1):
                a, b, c = i, j, k
                if axis == 0:
                    a = min(max(i + sign, 0), h - 1)
                elif axis == 1:
                    b = min(max(j + sign, 0), w - 1)
                else:
                    c = min(max(k + sign, 0), d - 1)
                q = (a * w + b) * d + c
                vi, vj, vk = cell_field_at(increment, cells, a, b, c)
                total += sign * trilinear(moving, a + components[0, q] + vi, b + components[1, q] + vj,
                                          c + components[2, q] + vk)
            out[s, axis] = 0.5 * total


class EdgeAlignment:
    """The squared NGF of ``fixed`` against ``moving`` warped by candidate fields, over the samples
    ``flat`` (C-order indices into the fixed grid). The samples' neighbours, the fixed side and both
    ``eps`` are computed once, ``eps`` of the warped image under ``reference`` (the field candidates
    are compared with), whose score is :attr:`reference_score`. Scores are in ``[0, 1]``; higher
    means better-aligned edges."""

    def __init__(self, fixed: np.ndarray, moving: np.ndarray, flat: np.ndarray, reference: torch.Tensor) -> None:
        self.count = flat.size
        self.flat = np.ascontiguousarray(flat, np.int64)
        # per axis of 2+ voxels (a 2D image's flat axis has no gradient): the +1 and -1 neighbours
        self.axes = [(axis, _neighbours(flat, fixed.shape, axis, 1), _neighbours(flat, fixed.shape, axis, -1))
                     for axis, n in enumerate(fixed.shape) if n > 1]
        fixed_flat = np.ascontiguousarray(fixed, np.float32).ravel()
        grad_f = self._gradients(lambda index, coords: fixed_flat[index])
        self.fixed_normals = _normalised(grad_f, EPS_FRACTION * float(np.median(np.linalg.norm(grad_f, axis=1))))
        self.moving = torch.from_numpy(np.ascontiguousarray(moving, np.float32))
        self.fused = fused_cpu(reference)
        grad_w = self._warped_gradients(reference)
        self.eps = EPS_FRACTION * float(np.median(np.linalg.norm(grad_w, axis=1)))
        self.reference_score = self._score(grad_w)

    def score(self, field: torch.Tensor, increment: np.ndarray | None = None,
              cells: tuple[int, ...] | None = None) -> float:
        """The score of ``field`` ``(1, 3, I, J, K)`` (voxels, pull-back), plus ``increment``
        ``(3, h, w, d)`` on cells of ``cells`` voxels when given (read at the samples' neighbours
        on CPU, not upsampled to the image grid)."""
        if increment is not None and not self.fused:
            upsampled = field_from_cells(torch.from_numpy(np.ascontiguousarray(increment))[None],
                                         tuple(self.moving.shape), cells)
            field, increment = field + upsampled, None
        return self._score(self._warped_gradients(field, increment, cells))

    def _gradients(self, values_at: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
        """Central differences ``(N, 3)`` at the samples of an image given as ``values_at(indices,
        coordinates) -> (N,)`` at the neighbours; 0 along an axis of one voxel."""
        out = np.zeros((self.count, 3), np.float32)
        for axis, plus, minus in self.axes:
            out[:, axis] = (values_at(*plus) - values_at(*minus)) * 0.5
        return out

    def _warped_gradients(self, field: torch.Tensor, increment: np.ndarray | None = None,
                          cells: tuple[int, ...] | None = None) -> np.ndarray:
        """Central differences of ``W(x) = M(x + u(x))`` at the samples, ``u`` = ``field`` (plus
        ``increment`` on ``cells``, fused path only)."""
        components = flat_field(field)
        if self.fused:  # one pass over the samples, no gathered copies (numba)
            if increment is None:  # one cell holding zero
                increment, cells = np.zeros((3, 1, 1, 1), np.float32), tuple(self.moving.shape)
            use_torch_threads()
            out = np.empty((self.count, 3), np.float32)
            _warped_differences(self.moving.numpy(), np.ascontiguousarray(components),
                                np.ascontiguousarray(increment, np.float32), np.asarray(cells, np.float64),
                                self.flat, out)
            return out
        return self._gradients(lambda index, coords: _trilinear(self.moving, coords + components[:, index].T))

    def _score(self, grad_w: np.ndarray) -> float:
        return float(((self.fixed_normals * _normalised(grad_w, self.eps)).sum(1) ** 2).mean())
