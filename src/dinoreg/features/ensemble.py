"""Ensembles of encoders (``--features a+b``): settings and the channel concatenation.

``ensemble="concat"`` concatenates the encoders' channels into one optimisation;
``ensemble="average"`` registers with each encoder and averages the fields with
``ensemble_weights`` (done by the pipeline, :mod:`dinoreg.pipeline`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dinoreg.errors import DinoregError
from dinoreg.features.base import PairFeatures
from dinoreg.spec import Spec, setting


@dataclass(frozen=True)
class EnsembleSpec(Spec):
    """How several encoders are combined."""

    ensemble: str = setting("concat", "concat: one optimisation on all channels; average: one per encoder, "
                                      "fields averaged", choices=("concat", "average"))
    ensemble_weights: tuple[float, ...] | None = setting(
        None, "one weight per encoder: concat block power (relative to the first) or field weight", low=0.0,
        high=1e6)
    refine_weights: tuple[float, ...] | None = setting(
        None, "concat only: block powers in the refinement (Adam) stage when they differ from ensemble_weights "
              "(e.g. 1 0: the second encoder guides the search only)", low=0.0, high=1e6)

    def weights(self, n: int, features: str) -> list[float]:
        """``n`` weights (all 1 by default); a :class:`DinoregError` when the count differs."""
        return _checked(self.ensemble_weights, "ensemble_weights", n, features) or [1.0] * n

    def refinement_weights(self, n: int, features: str) -> list[float] | None:
        """``refine_weights`` checked like :meth:`weights`; None when not set."""
        if self.refine_weights is not None and self.ensemble == "average":
            raise DinoregError("setting 'refine_weights' applies to ensemble=concat only")
        return _checked(self.refine_weights, "refine_weights", n, features)


def _checked(weights: tuple[float, ...] | None, key: str, n: int, features: str) -> list[float] | None:
    if weights is None:
        return None
    if len(weights) != n:
        raise DinoregError(f"setting {key!r} needs {n} values for features {features!r}, got {len(weights)}")
    if n > 1 and (weights[0] <= 0 or sum(weights) <= 0):
        raise DinoregError(f"setting {key!r} needs a positive first weight")
    return [float(w) for w in weights]


def combine_features(parts: Sequence[PairFeatures], weights: Sequence[float],
                     refine_weights: Sequence[float] | None = None) -> PairFeatures:
    """Ensemble by concatenating channels (:func:`concatenate`); with ``refine_weights`` the
    refinement stages get their own concatenation (``PairFeatures.refine``)."""
    combined = concatenate(parts, weights)
    if refine_weights is not None and list(refine_weights) != list(weights):
        combined.refine = concatenate(parts, refine_weights)
    return combined


def concatenate(parts: Sequence[PairFeatures], weights: Sequence[float]) -> PairFeatures:
    """Ensemble by concatenating channels. The first encoder's block keeps its own scale (the
    one its presets are tuned for); every other block is scaled so its mean squared norm per
    voxel (over both images) is ``weight_i / weight_0`` times the first block's. Blocks are
    brought to the finest grid among them. The first initial field found is kept. A block of
    weight 0 after the first contributes only its initial field (its channels are left out, so
    e.g. MIND keeps its fast 12-channel kernels)."""
    init = next((p.init for p in parts if p.init is not None), None)
    kept = [(p, w) for n, (p, w) in enumerate(zip(parts, weights)) if n == 0 or w > 0]
    if len(kept) == 1:
        return PairFeatures(kept[0][0].fixed, kept[0][0].moving, init)
    parts, weights = [p for p, _ in kept], [w for _, w in kept]
    shape = max((tuple(p.fixed.shape[2:]) for p in parts), key=lambda s: int(np.prod(s)))
    fixed, moving, reference = [], [], None
    for part, weight in zip(parts, weights):
        f, m = part.fixed, part.moving
        if tuple(f.shape[2:]) != shape:
            f = F.interpolate(f, size=shape, mode="trilinear", align_corners=False)
            m = F.interpolate(m, size=shape, mode="trilinear", align_corners=False)
        power = 0.5 * (f.pow(2).sum(1).mean() + m.pow(2).sum(1).mean())
        if reference is None:
            reference = power / weight
            scale = torch.ones(())
        else:
            scale = torch.sqrt(weight * reference / power.clamp_min(1e-12))
        fixed.append(f * scale)
        moving.append(m * scale)
    return PairFeatures(torch.cat(fixed, 1), torch.cat(moving, 1), init)
