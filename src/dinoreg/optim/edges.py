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

from dinoreg.spatial.grid import flat_field, sample

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


class EdgeAlignment:
    """The squared NGF of ``fixed`` against ``moving`` warped by candidate fields, over the samples
    ``flat`` (C-order indices into the fixed grid). The samples' neighbours, the fixed side and both
    ``eps`` are computed once, ``eps`` of the warped image under ``reference`` (the field candidates
    are compared with), whose score is :attr:`reference_score`. Scores are in ``[0, 1]``; higher
    means better-aligned edges."""

    def __init__(self, fixed: np.ndarray, moving: np.ndarray, flat: np.ndarray, reference: torch.Tensor) -> None:
        self.count = flat.size
        # per axis of 2+ voxels (a 2D image's flat axis has no gradient): the +1 and -1 neighbours
        self.axes = [(axis, _neighbours(flat, fixed.shape, axis, 1), _neighbours(flat, fixed.shape, axis, -1))
                     for axis, n in enumerate(fixed.shape) if n > 1]
        fixed_flat = np.ascontiguousarray(fixed, np.float32).ravel()
        grad_f = self._gradients(lambda index, coords: fixed_flat[index])
        self.fixed_normals = _normalised(grad_f, EPS_FRACTION * float(np.median(np.linalg.norm(grad_f, axis=1))))
        self.moving = torch.from_numpy(np.ascontiguousarray(moving, np.float32))
        grad_w = self._warped_gradients(reference)
        self.eps = EPS_FRACTION * float(np.median(np.linalg.norm(grad_w, axis=1)))
        self.reference_score = self._score(grad_w)

    def score(self, field: torch.Tensor) -> float:
        """The score of ``field`` ``(1, 3, I, J, K)`` (voxels, pull-back)."""
        return self._score(self._warped_gradients(field))

    def _gradients(self, values_at: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
        """Central differences ``(N, 3)`` at the samples of an image given as ``values_at(indices,
        coordinates) -> (N,)`` at the neighbours; 0 along an axis of one voxel."""
        out = np.zeros((self.count, 3), np.float32)
        for axis, plus, minus in self.axes:
            out[:, axis] = (values_at(*plus) - values_at(*minus)) * 0.5
        return out

    def _warped_gradients(self, field: torch.Tensor) -> np.ndarray:
        """Central differences of ``W(x) = M(x + u(x))`` at the samples, ``u`` = ``field``."""
        components = flat_field(field)
        return self._gradients(lambda index, coords: _trilinear(self.moving, coords + components[:, index].T))

    def _score(self, grad_w: np.ndarray) -> float:
        return float(((self.fixed_normals * _normalised(grad_w, self.eps)).sum(1) ** 2).mean())
