"""MIND-SSC: the modality-independent neighbourhood descriptor, self-similarity context.

Heinrich et al. (MICCAI 2013). For every voxel ``x`` the six face neighbours at distance
``dilation`` are taken; the 12 pairs of neighbours that are ``sqrt(2) * dilation`` apart give 12
patch distances ``D_c(x) = box_r((I(x + a_c) - I(x + b_c))^2)`` (``box_r`` a cubic mean filter of
side ``2 * radius + 1``). The descriptor is ``exp(-(D_c - min_c D_c) / V(x))`` with ``V`` the mean
over channels of ``D_c - min_c D_c``, clamped to ``[0.001, 1000] x`` its volume mean.

Everything is done with shifted slices and one pooling pass (no convolutions), so it runs
in about a second on a 160x192x224 volume on 2 CPU cores.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

_FACES = [(-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)]


def ssc_pairs() -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """The 12 pairs of six-neighbourhood offsets that are ``sqrt(2)`` apart (unit dilation)."""
    pairs = []
    for a, b in itertools.combinations(_FACES, 2):
        if sum((x - y) ** 2 for x, y in zip(a, b)) == 2:
            pairs.append((a, b))
    return pairs


def box_filter(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Cubic mean filter of side ``2 * radius + 1`` with replicated borders.

    ``x`` is ``(N, C, I, J, K)``; the result has the same shape.
    """
    if radius <= 0:
        return x
    padded = F.pad(x, [radius] * 6, mode="replicate")
    return F.avg_pool3d(padded, 2 * radius + 1, stride=1)


def _shifted(padded: torch.Tensor, offset: tuple[int, int, int], pad: int,
             shape: tuple[int, int, int]) -> torch.Tensor:
    sl = [slice(pad + o, pad + o + s) for o, s in zip(offset, shape)]
    return padded[:, :, sl[0], sl[1], sl[2]]


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2, eps_scale: float = 1e-3) -> torch.Tensor:
    """MIND-SSC descriptor of a volume.

    Args:
        image: ``(N, 1, I, J, K)`` float tensor (any intensity scale; the descriptor is
            invariant to affine intensity changes).
        radius: half side of the patch box filter, voxels.
        dilation: distance of the six neighbours from the centre, voxels.
        eps_scale: lower clamp of the local variance relative to its volume mean.

    Returns:
        ``(N, 12, I, J, K)`` descriptor in ``(0, 1]``, on the image grid.
    """
    if image.ndim != 5 or image.shape[1] != 1:
        raise ValueError(f"mind_ssc expects (N, 1, I, J, K), got {tuple(image.shape)}")
    shape = tuple(image.shape[2:])
    d = int(dilation)
    padded = F.pad(image, [d] * 6, mode="replicate")
    pairs = ssc_pairs()
    dist = image.new_empty((image.shape[0], len(pairs), *shape))
    for c, (a, b) in enumerate(pairs):
        va = _shifted(padded, tuple(d * x for x in a), d, shape)  # type: ignore[arg-type]
        vb = _shifted(padded, tuple(d * x for x in b), d, shape)  # type: ignore[arg-type]
        torch.sub(va, vb, out=dist[:, c:c + 1]).pow_(2)
    del padded
    dist = box_filter(dist, radius)
    dist -= dist.min(1, keepdim=True).values
    var = dist.mean(1, keepdim=True)
    mean_var = var.mean()
    var = var.clamp(mean_var * eps_scale, mean_var / eps_scale)
    return dist.div_(var).neg_().exp_()
